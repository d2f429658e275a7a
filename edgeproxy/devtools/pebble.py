"""Run Let's Encrypt's test CA (Pebble) and its mock DNS server (challtestsrv) on loopback.

Owns: starting, readiness-checking and stopping the Debian ``pebble`` and
``pebble-challtestsrv`` binaries for the test suite and ``edgeproxy demo``; the
throwaway CA that Pebble's own HTTPS listener presents; the management calls
that mock DNS records and fetch Pebble's (per-run, random) issuing root.
Must not import: ``acme``/``josepy`` (a harness must not share code with the
client it tests), ``pytest`` (this is library code), anything of ours but ``devtools.binaries``.

Both servers keep all state in memory: every start is a new CA with new roots
and no accounts. Each process runs in its own process group and is killed with
its group on ``stop()``; start-up failures raise :class:`HarnessError` carrying
the tail of the process log.

Typical use::

    with ChallTestSrv() as dns, Pebble(http_port=5002, dns_server=dns.dns_address) as ca:
        ca.directory_url      # https://127.0.0.1:<port>/dir
        ca.ca_bundle_path     # trust this for the ACME API (acme.ca_bundle)
        ca.root_pem()         # trust this to verify certificates Pebble issued
"""

from __future__ import annotations

import abc

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import dns.exception
import dns.message
import dns.query
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .binaries import missing, require

__all__ = [
    "CHALLTESTSRV_BINARY",
    "PEBBLE_BINARY",
    "ChallTestSrv",
    "HarnessError",
    "Pebble",
    "missing_binaries",
]

PEBBLE_BINARY = "pebble"
CHALLTESTSRV_BINARY = "pebble-challtestsrv"
INSTALL_HINT = "install Debian's pebble package (`apt-get install pebble`, or `make pebble`)"

_LOG_TAIL = 4000  # characters of a process log quoted in an exception
_PORT_ATTEMPTS = 3  # a "free" port can be taken between probing and binding: retry


class HarnessError(RuntimeError):
    """A harness process is missing, did not start, or answered unexpectedly."""


def missing_binaries() -> list[str]:
    """Names of the Pebble binaries that cannot be found (empty when both are installed)."""
    return missing((PEBBLE_BINARY, CHALLTESTSRV_BINARY))


def _require(name: str) -> str:
    return require(name, HarnessError, INSTALL_HINT)


def _free_tcp_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_dns_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (challtestsrv serves DNS on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise HarnessError("no port free for both TCP and UDP on 127.0.0.1")


def _fqdn(host: str) -> str:
    # challtestsrv normalises A/AAAA/CNAME/CAA names but matches TXT names
    # literally as FQDNs; always sending the trailing dot makes every call agree.
    return host if host.endswith(".") else host + "."


class _Process:
    """One child process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str],
                 append: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab" if append else "wb")
        try:
            # A new session makes pid == process-group id, so stop() can kill
            # the whole group without touching any process we did not start.
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            self._log.close()
            raise HarnessError(f"cannot start {name} ({argv[0]}): {exc}") from exc

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def failure(self, what: str) -> HarnessError:
        """An exception whose message ends with the tail of this process's log."""
        status = "running" if self.alive() else f"exited with status {self.popen.returncode}"
        tail = self.log_text()[-_LOG_TAIL:]
        return HarnessError(f"{what} ({self.name} {status})\n--- {self.name} log ---\n{tail}")

    def port_in_use(self) -> bool:
        return "address already in use" in self.log_text()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers; idempotent."""
        # Only signal while the child is unreaped: after wait() its pid (and
        # group id) may belong to an unrelated process.
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(timeout)
        if not self._log.closed:
            self._log.close()

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass


class _Workdir:
    """A directory for configs, certificates and logs; removed on cleanup only if we created it."""

    def __init__(self, path: str | os.PathLike[str] | None, prefix: str) -> None:
        self._owned = path is None
        self.path = Path(tempfile.mkdtemp(prefix=prefix)) if path is None else Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def cleanup(self) -> None:
        if self._owned:
            shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------------------------
# challtestsrv: the mock DNS that Pebble (and our DNS pre-check) resolve through
# ---------------------------------------------------------------------------------


class _ManagedServer(abc.ABC):
    """Lifecycle shared by the harness servers: one process, one HTTP client, one workdir."""

    _name = "server"
    _proc: _Process | None
    _http: httpx.Client | None
    _workdir: _Workdir | None

    @abc.abstractmethod
    def start(self) -> Self:
        """Start the process and wait until it answers."""

    def stop(self) -> None:
        """Stop the process (idempotent) and remove its temporary directory."""
        if self._proc is not None:
            self._proc.stop()
            self._proc = None
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _require_running(self) -> None:
        if self._proc is None:
            raise HarnessError(f"{self._name} is not running (call start() or use it as a context manager)")

    @abc.abstractmethod
    def _wait_ready(self, proc: _Process) -> None:
        """Return once ``proc`` answers; raise ``HarnessError`` if it does not."""

    def _launch(self, spawn: Callable[[], _Process]) -> Self:
        """Run ``spawn()`` (which picks fresh ports each call) until the process answers.

        A port another process took between choosing and binding it is retried
        up to ``_PORT_ATTEMPTS`` times; any other failure stops everything."""
        try:
            for attempt in range(_PORT_ATTEMPTS):
                proc = spawn()
                self._proc = proc
                try:
                    self._wait_ready(proc)
                    return self
                except HarnessError:
                    retry = proc.port_in_use() and attempt + 1 < _PORT_ATTEMPTS
                    proc.stop()
                    if not retry:
                        raise
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self.stop()
            raise


class ChallTestSrv(_ManagedServer):
    """``pebble-challtestsrv`` as a mock DNS server (its challenge responders are disabled).

    Every name answers ``A default_ipv4`` (and ``AAAA default_ipv6`` unless empty)
    unless a more specific mock is added. A queries follow one level of mocked
    CNAME. Mocks are process-wide: a test that adds records should clear them.

    Management endpoints used (verified against pebble-challtestsrv 2.4 with
    dnspython queries): ``/add-a``, ``/clear-a``, ``/add-aaaa``, ``/clear-aaaa``,
    ``/set-cname``, ``/clear-cname``, ``/add-caa`` (appends), ``/clear-caa``,
    ``/set-servfail``, ``/clear-servfail``, ``/set-txt``, ``/clear-txt``,
    ``/set-default-ipv4``, ``/set-default-ipv6``, ``/dns-request-history``,
    ``/clear-request-history``. All are ``POST`` with a JSON body and answer 200.
    """

    _name = "pebble-challtestsrv"

    def __init__(
        self,
        *,
        default_ipv4: str = "127.0.0.1",
        default_ipv6: str = "",
        workdir: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.default_ipv4 = default_ipv4
        self.default_ipv6 = default_ipv6
        self.start_timeout = start_timeout
        self._workdir_arg = workdir
        self._workdir: _Workdir | None = None
        self._proc: _Process | None = None
        self._dns_port = 0
        self._management_port = 0
        self._http: httpx.Client | None = None

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> Self:
        """Start the server and wait until both DNS and management answer."""
        if self._proc is not None:
            return self
        binary = _require(CHALLTESTSRV_BINARY)
        workdir = self._workdir = _Workdir(self._workdir_arg, "challtestsrv-")
        self._http = httpx.Client(timeout=5.0, trust_env=False)

        def spawn() -> _Process:
            self._dns_port, self._management_port = _free_dns_port(), _free_tcp_port()
            argv = [
                binary,
                "-http01", "",
                "-https01", "",
                "-tlsalpn01", "",
                "-dns01", f"127.0.0.1:{self._dns_port}",
                "-management", f"127.0.0.1:{self._management_port}",
                "-defaultIPv4", self.default_ipv4,
                "-defaultIPv6", self.default_ipv6,
            ]
            return _Process("pebble-challtestsrv", argv, workdir.path / "challtestsrv.log", env={})

        return self._launch(spawn)

    def _wait_ready(self, proc: _Process) -> None:
        deadline = time.monotonic() + self.start_timeout
        management_ok = dns_ok = False
        query = dns.message.make_query("ready.challtestsrv.invalid.", "A")
        while time.monotonic() < deadline:
            if not proc.alive():
                raise proc.failure("pebble-challtestsrv exited during start-up")
            if not management_ok:
                try:
                    # Idempotent (re-sets the configured default) and proves the API is up.
                    self._raw_post("/set-default-ipv4", {"ip": self.default_ipv4})
                    management_ok = True
                except (httpx.HTTPError, HarnessError):
                    pass
            if management_ok and not dns_ok:
                try:
                    dns.query.udp(query, "127.0.0.1", port=self._dns_port, timeout=0.5)
                    dns_ok = True
                except (dns.exception.DNSException, OSError):
                    pass
            if management_ok and dns_ok:
                return
            time.sleep(0.05)
        raise proc.failure(f"pebble-challtestsrv not ready after {self.start_timeout:.0f}s")

    # -- addresses ------------------------------------------------------------------
    @property
    def dns_port(self) -> int:
        self._require_running()
        return self._dns_port

    @property
    def dns_address(self) -> str:
        """``127.0.0.1:PORT`` of the mock DNS server (UDP and TCP)."""
        return f"127.0.0.1:{self.dns_port}"

    @property
    def management_url(self) -> str:
        self._require_running()
        return f"http://127.0.0.1:{self._management_port}"

    def log_text(self) -> str:
        return self._proc.log_text() if self._proc is not None else ""


    # -- management API ---------------------------------------------------------------
    def _raw_post(self, path: str, payload: Mapping[str, Any]) -> httpx.Response:
        assert self._http is not None
        response = self._http.post(f"http://127.0.0.1:{self._management_port}{path}", json=dict(payload))
        if response.status_code != 200:
            raise HarnessError(f"challtestsrv {path} {payload!r} answered {response.status_code}: {response.text!r}")
        return response

    def _post(self, path: str, payload: Mapping[str, Any]) -> httpx.Response:
        self._require_running()
        return self._raw_post(path, payload)

    def add_a(self, host: str, addresses: Iterable[str]) -> None:
        """Answer ``A`` queries for ``host`` with ``addresses`` instead of the default."""
        self._post("/add-a", {"host": _fqdn(host), "addresses": [str(ipaddress.IPv4Address(a)) for a in addresses]})

    def clear_a(self, host: str) -> None:
        self._post("/clear-a", {"host": _fqdn(host)})

    def add_aaaa(self, host: str, addresses: Iterable[str]) -> None:
        """Answer ``AAAA`` queries for ``host`` with ``addresses``."""
        self._post("/add-aaaa", {"host": _fqdn(host), "addresses": [str(ipaddress.IPv6Address(a)) for a in addresses]})

    def clear_aaaa(self, host: str) -> None:
        self._post("/clear-aaaa", {"host": _fqdn(host)})

    def set_cname(self, host: str, target: str) -> None:
        """Make ``host`` a CNAME to ``target`` (A queries for ``host`` then answer ``target``'s A)."""
        self._post("/set-cname", {"host": _fqdn(host), "target": _fqdn(target)})

    def clear_cname(self, host: str) -> None:
        self._post("/clear-cname", {"host": _fqdn(host)})

    def add_caa(self, host: str, policies: Iterable[tuple[str, str]]) -> None:
        """Append CAA records, e.g. ``[("issue", "letsencrypt.org")]`` (flags are always 0)."""
        self._post("/add-caa", {"host": _fqdn(host), "policies": [{"tag": t, "value": v} for t, v in policies]})

    def clear_caa(self, host: str) -> None:
        self._post("/clear-caa", {"host": _fqdn(host)})

    def set_servfail(self, host: str) -> None:
        """Answer SERVFAIL to every query for ``host`` (overrides all other mocks)."""
        self._post("/set-servfail", {"host": _fqdn(host)})

    def clear_servfail(self, host: str) -> None:
        self._post("/clear-servfail", {"host": _fqdn(host)})

    def set_txt(self, host: str, value: str) -> None:
        self._post("/set-txt", {"host": _fqdn(host), "value": value})

    def clear_txt(self, host: str) -> None:
        self._post("/clear-txt", {"host": _fqdn(host)})

    def set_default_ipv4(self, ip: str) -> None:
        """Default ``A`` answer for names without a mock; ``""`` answers no A at all."""
        self._post("/set-default-ipv4", {"ip": ip})
        self.default_ipv4 = ip

    def set_default_ipv6(self, ip: str) -> None:
        """Default ``AAAA`` answer for names without a mock; ``""`` answers no AAAA at all."""
        self._post("/set-default-ipv6", {"ip": ip})
        self.default_ipv6 = ip

    def dns_queries(self, host: str) -> list[dict[str, Any]]:
        """DNS questions received for ``host`` since start (or the last clear), oldest first."""
        response = self._post("/dns-request-history", {"host": _fqdn(host)})
        data = response.json()
        return list(data) if isinstance(data, list) else []

    def clear_dns_queries(self, host: str) -> None:
        self._post("/clear-request-history", {"host": _fqdn(host), "type": "dns"})

    def clear_host(self, host: str) -> None:
        """Remove every mock for ``host`` (back to the defaults)."""
        for path in ("/clear-a", "/clear-aaaa", "/clear-cname", "/clear-caa", "/clear-servfail", "/clear-txt"):
            self._post(path, {"host": _fqdn(host)})


# ---------------------------------------------------------------------------------
# Pebble
# ---------------------------------------------------------------------------------


def _write_https_identity(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a localhost/127.0.0.1/::1 certificate it signed.

    Returns (ca_bundle, certificate, private_key) paths. Built to pass strict
    X.509 checks (key identifiers, critical basicConstraints/keyUsage), which
    Python 3.13's default ``VERIFY_X509_STRICT`` requires.
    """
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=7)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeproxy throwaway Pebble HTTPS CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                x509.IPAddress(ipaddress.IPv6Address("::1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_path, cert_path, key_path = directory / "https-ca.pem", directory / "https-cert.pem", directory / "https-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class Pebble(_ManagedServer):
    """A running Pebble ACME server on 127.0.0.1 with a throwaway HTTPS identity.

    ``http_port`` is where Pebble connects for HTTP-01 validation (the edge's
    HTTP listener under test); Pebble resolves identifiers through
    ``dns_server`` (a :class:`ChallTestSrv` ``dns_address``; empty = system
    resolver). Options map to Pebble 2.4's knobs:

    - ``nonce_reject``: ``PEBBLE_WFE_NONCEREJECT`` (percent of valid nonces
      rejected as ``badNonce``). ``None`` keeps Pebble's default of 5 %, which a
      correct client must survive; 0 for determinism.
    - ``authz_reuse``: ``PEBBLE_AUTHZREUSE`` (percent of new orders that reuse
      a valid authorization; Pebble's default is 50). 0 forces a fresh HTTP-01
      challenge per order.
    - ``validity_seconds``: config ``certificateValidityPeriod`` (default: ~5 years).
    - ``chain_length``: ``PEBBLE_CHAIN_LENGTH`` (1 = leaf + one intermediate).
    - ``always_valid``: ``PEBBLE_VA_ALWAYS_VALID`` (skip validation entirely).
    - ``va_sleep_max``: ``None`` sets ``PEBBLE_VA_NOSLEEP=1``; an int sets
      ``PEBBLE_VA_SLEEPTIME`` (Pebble then sleeps 0..n s before validating).
    - ``domain_blocklist``: config ``domainBlocklist`` (orders for these names
      fail with ``rejectedIdentifier``).
    - ``strict``: run with ``-strict`` (upcoming breaking changes enabled).
    - ``eab_keys``: config ``externalAccountMACKeys`` (key id -> base64url MAC
      key) with ``externalAccountBindingRequired: true``: new accounts without a
      valid binding are refused with ``externalAccountRequired``.
    - ``extra_env``: any further ``PEBBLE_*`` variables.

    Pebble 2.4 has no ARI, no ACME profiles, no rate limits and no CAA checks.
    ``halt()`` stops the process and ``resume()`` starts it again on the same
    ports (the same directory URL and HTTPS identity; a new CA state): a CA outage.
    """

    _name = "pebble"

    def __init__(
        self,
        *,
        http_port: int,
        dns_server: str = "",
        tls_port: int | None = None,
        nonce_reject: int | None = None,
        authz_reuse: int | None = None,
        validity_seconds: int | None = None,
        chain_length: int | None = None,
        always_valid: bool = False,
        va_sleep_max: int | None = None,
        domain_blocklist: Sequence[str] = (),
        strict: bool = False,
        eab_keys: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.http_port = http_port
        self.dns_server = dns_server
        self.tls_port = tls_port
        self.nonce_reject = nonce_reject
        self.authz_reuse = authz_reuse
        self.validity_seconds = validity_seconds
        self.chain_length = chain_length
        self.always_valid = always_valid
        self.va_sleep_max = va_sleep_max
        self.domain_blocklist = tuple(domain_blocklist)
        self.strict = strict
        self.eab_keys = dict(eab_keys or {})
        self.extra_env = dict(extra_env or {})
        self.start_timeout = start_timeout
        self._workdir_arg = workdir
        self._workdir: _Workdir | None = None
        self._proc: _Process | None = None
        self._listen_port = 0
        self._management_port = 0
        self._ca_bundle: Path | None = None
        self._http: httpx.Client | None = None

    def environment(self) -> dict[str, str]:
        """The exact environment Pebble runs with (nothing inherited from ours)."""
        env: dict[str, str] = {}
        if self.va_sleep_max is None:
            env["PEBBLE_VA_NOSLEEP"] = "1"
        else:
            env["PEBBLE_VA_SLEEPTIME"] = str(self.va_sleep_max)
        if self.nonce_reject is not None:
            env["PEBBLE_WFE_NONCEREJECT"] = str(self.nonce_reject)
        if self.authz_reuse is not None:
            env["PEBBLE_AUTHZREUSE"] = str(self.authz_reuse)
        if self.chain_length is not None:
            env["PEBBLE_CHAIN_LENGTH"] = str(self.chain_length)
        if self.always_valid:
            env["PEBBLE_VA_ALWAYS_VALID"] = "1"
        env.update(self.extra_env)
        return env

    def _config(self, cert: Path, key: Path) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self._listen_port}",
            "managementListenAddress": f"127.0.0.1:{self._management_port}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": self.http_port,
            # Only dialled for TLS-ALPN-01, which edgeproxy never answers.
            "tlsPort": self.tls_port if self.tls_port is not None else _free_tcp_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(self.eab_keys),
        }
        if self.eab_keys:
            conf["externalAccountMACKeys"] = dict(self.eab_keys)
        if self.domain_blocklist:
            conf["domainBlocklist"] = list(self.domain_blocklist)
        if self.validity_seconds is not None:
            conf["certificateValidityPeriod"] = int(self.validity_seconds)
        return {"pebble": conf}

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> Self:
        """Write the HTTPS identity and config, start Pebble, wait until its directory answers."""
        if self._proc is not None:
            return self
        binary = _require(PEBBLE_BINARY)
        workdir = self._workdir = _Workdir(self._workdir_arg, "pebble-")
        try:
            ca_path, cert_path, key_path = _write_https_identity(workdir.path)
        except BaseException:
            self.stop()
            raise
        self._ca_bundle = ca_path
        self._http = httpx.Client(verify=ssl.create_default_context(cafile=str(ca_path)), timeout=5.0, trust_env=False)

        def spawn() -> _Process:
            self._listen_port, self._management_port = _free_tcp_port(), _free_tcp_port()
            return self._spawn(binary, cert_path, key_path, append=False)

        return self._launch(spawn)

    def _spawn(self, binary: str, cert_path: Path, key_path: Path, *, append: bool) -> _Process:
        assert self._workdir is not None
        workdir = self._workdir
        config_path = workdir.path / "pebble-config.json"
        config_path.write_text(json.dumps(self._config(cert_path, key_path), indent=2))
        argv = [binary, "-config", str(config_path)]
        if self.dns_server:
            argv += ["-dnsserver", self.dns_server]
        if self.strict:
            argv += ["-strict"]
        return _Process("pebble", argv, workdir.path / "pebble.log", self.environment(), append=append)

    _halted = False

    def halt(self) -> None:
        """Stop the process, keeping the ports, workdir and HTTPS identity for
        ``resume()``: clients now get connection refused (a CA outage)."""
        self._require_running()
        assert self._proc is not None
        self._proc.stop()
        self._halted = True

    def resume(self) -> None:
        """Start again after ``halt()`` on the same ports (same ``directory_url``);
        Pebble's state is new (accounts, orders, roots), as after any restart."""
        if not self._halted or self._workdir is None:
            raise HarnessError("pebble.resume() without halt()")
        workdir = self._workdir.path
        proc = self._spawn(_require(PEBBLE_BINARY), workdir / "https-cert.pem", workdir / "https-key.pem",
                           append=True)
        self._proc, self._halted = proc, False
        try:
            self._wait_ready(proc)
        except HarnessError:
            self.stop()
            raise

    def _wait_ready(self, proc: _Process) -> None:
        """Poll the directory and the root until both answer over verified HTTPS."""
        assert self._http is not None
        deadline = time.monotonic() + self.start_timeout
        last_error = ""
        while time.monotonic() < deadline:
            if not proc.alive():
                raise proc.failure("pebble exited during start-up")
            try:
                directory = self._http.get(self.directory_url)
                root = self._http.get(f"{self.management_url}/roots/0")
                if directory.status_code == 200 and "newOrder" in directory.json() and root.status_code == 200:
                    return
                last_error = f"directory {directory.status_code}, roots/0 {root.status_code}"
            except (httpx.HTTPError, ValueError) as exc:
                last_error = repr(exc)
            time.sleep(0.05)
        raise proc.failure(f"pebble not ready after {self.start_timeout:.0f}s (last: {last_error})")

    # -- addresses ------------------------------------------------------------------
    @property
    def directory_url(self) -> str:
        """The ACME directory, ``https://127.0.0.1:<port>/dir``."""
        return f"https://127.0.0.1:{self._listen_port}/dir"

    @property
    def management_url(self) -> str:
        """Pebble's management API (same HTTPS identity as the ACME API)."""
        return f"https://127.0.0.1:{self._management_port}"

    @property
    def ca_bundle_path(self) -> Path:
        """PEM of the throwaway CA behind Pebble's HTTPS listeners: what ``acme.ca_bundle`` points at."""
        self._require_running()
        assert self._ca_bundle is not None
        return self._ca_bundle

    @property
    def workdir(self) -> Path:
        self._require_running()
        assert self._workdir is not None
        return self._workdir.path

    def log_text(self) -> str:
        """Pebble's log so far (useful in assertion messages)."""
        return self._proc.log_text() if self._proc is not None else ""

    # -- management API ---------------------------------------------------------------
    def _get(self, path: str) -> httpx.Response:
        self._require_running()
        assert self._http is not None
        response = self._http.get(f"{self.management_url}{path}")
        if response.status_code != 200:
            raise HarnessError(f"pebble {path} answered {response.status_code}: {response.text[:200]!r}")
        return response

    def root_pem(self, index: int = 0) -> bytes:
        """The issuing root (regenerated on every start): trust it to verify issued chains."""
        return self._get(f"/roots/{index}").content

    def intermediate_pem(self, index: int = 0) -> bytes:
        """The intermediate that signs leaves (extra ones from ``chain_length`` are not exposed)."""
        return self._get(f"/intermediates/{index}").content

    def write_trust_bundle(self, path: str | os.PathLike[str]) -> Path:
        """Write Pebble's root to ``path`` (for TLS clients verifying served certificates)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.root_pem())
        return target

    def cert_status(self, serial_hex: str) -> dict[str, Any]:
        """Pebble's record of an issued certificate: ``Status``, ``Serial``, ``Certificate``..."""
        data = self._get(f"/cert-status-by-serial/{serial_hex}").json()
        if not isinstance(data, dict):
            raise HarnessError(f"unexpected cert-status answer: {data!r}")
        return data
