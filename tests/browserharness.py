"""Run Debian's headless Chromium against local servers, trusting only the roots it is given.

Owns: a throwaway NSS database holding the roots a browser trusts (Pebble's, in
tests), one headless ``chromium`` process showing one URL with host names mapped
to loopback addresses, and picking loopback addresses of our own so that servers
can listen on the default ports 80/443 without colliding with parallel runs.
Must not import: ``pytest`` (library code), anything of ours but ``devtools.binaries``.

Why these choices:

- Certificates are trusted the way a user's machine trusts them, never by
  ``--ignore-certificate-errors``: Chromium on Linux reads the NSS database in
  ``$HOME/.pki/nssdb``, so ``HOME`` points into a temporary directory whose
  database holds exactly the given roots (``certutil -t "C,,"``: a CA trusted to
  issue server certificates). A chain the edge serves wrong fails as it would
  for a visitor.
- ``--host-resolver-rules`` maps each host name to its address and every other
  name to "not found": the browser reaches the custom domain on the default port,
  as a visitor's would, and never asks a real DNS server anything.
- No DevTools protocol: the page under test reports its own results to the server
  that served it (see ``tests/test_browser.py``); the harness only starts the
  process, keeps its log and kills its process group.

Typical use::

    edge_ip = free_loopback_address(ports=(80, 443))
    with HeadlessChromium("http://www.customer.test:8000/", roots=[pebble.root_pem()],
                          hosts={"www.customer.test": page_ip, "cdn.shop.test": edge_ip}):
        ...  # wait for what the page reports
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from edgeproxy.devtools.binaries import missing, require

__all__ = [
    "CERTUTIL_BINARY",
    "CHROMIUM_BINARY",
    "INSTALL_HINT",
    "BrowserError",
    "HeadlessChromium",
    "free_loopback_address",
    "missing_binaries",
    "trust_roots",
]

CHROMIUM_BINARY = "chromium"
CERTUTIL_BINARY = "certutil"
INSTALL_HINT = "install Debian's chromium and libnss3-tools packages (`make chromium`)"

# Headless, as root in a container: no sandbox (it needs user namespaces root does
# not get there), no GPU, and nothing that talks to Google or to the network on its
# own (QUIC, sync, component updates, background fetches, first-run pages).
# /dev/shm is often 64 MB in containers: Chromium's shared memory goes to /tmp.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

_LOG_TAIL = 4000  # characters of the browser log quoted in an exception


class BrowserError(RuntimeError):
    """A binary is missing, the trust store could not be built, or the browser did not start."""


def missing_binaries() -> list[str]:
    """Names of the browser binaries that cannot be found (empty when both are installed)."""
    return missing((CHROMIUM_BINARY, CERTUTIL_BINARY))


def _require(name: str) -> str:
    return require(name, BrowserError, INSTALL_HINT)


def free_loopback_address(ports: Iterable[int] = (), *, exclude: Iterable[str] = (), attempts: int = 200) -> str:
    """A random ``127.x.y.z`` (never ``127.0.0.1``) on which every port in ``ports`` was free a moment ago.

    Linux routes all of 127.0.0.0/8 to the loopback interface, so a server can
    listen on port 80/443 of an address nobody else on the machine uses, and
    parallel runs each pick their own. Port 0 checks only that the address binds.
    """
    wanted = list(ports) or [0]
    taken = {str(ipaddress.IPv4Address(a)) for a in exclude} | {"127.0.0.1"}
    rng = random.SystemRandom()
    for _ in range(attempts):
        address = f"127.{rng.randrange(0, 256)}.{rng.randrange(0, 256)}.{rng.randrange(2, 255)}"
        if address in taken:
            continue
        try:
            for port in wanted:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
                    sock.bind((address, port))
        except OSError:
            continue
        return address
    raise BrowserError(f"no loopback address with ports {wanted} free after {attempts} attempts")


def trust_roots(home: Path, roots: Sequence[bytes]) -> Path:
    """Create ``home/.pki/nssdb`` trusting exactly ``roots`` (PEM) to issue server certificates.

    Returns the database directory. Chromium on Linux reads this database when
    ``HOME`` is ``home``; nothing outside ``home`` is touched.
    """
    certutil = _require(CERTUTIL_BINARY)
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True, exist_ok=True)
    database = f"sql:{nssdb}"

    def run(*args: str) -> str:
        try:
            done = subprocess.run([certutil, "-d", database, *args], capture_output=True, text=True,
                                  timeout=30, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BrowserError(f"certutil {' '.join(args)}: {exc}") from exc
        if done.returncode != 0:
            raise BrowserError(f"certutil {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    run("-N", "--empty-password")
    for index, pem in enumerate(roots):
        path = nssdb / f"root-{index}.pem"
        path.write_bytes(pem)
        run("-A", "-n", f"edgeproxy test root {index}", "-t", "C,,", "-i", str(path))
    listed = run("-L")
    for index in range(len(roots)):
        if f"edgeproxy test root {index}" not in listed:
            raise BrowserError(f"root {index} missing from the NSS database after certutil -A:\n{listed}")
    return nssdb


def host_resolver_rules(hosts: Mapping[str, str]) -> str:
    """``--host-resolver-rules``: each name to its address, every other name not found.

    Rules are tried in order; the catch-all keeps the browser off real DNS.
    """
    rules = [f"MAP {name} {str(ipaddress.ip_address(address))}" for name, address in hosts.items()]
    rules.append("MAP * ~NOTFOUND")
    return ", ".join(rules)


class HeadlessChromium:
    """One headless ``chromium`` process showing ``url``, in a fresh profile.

    ``roots``: PEM roots the browser trusts (a new NSS database; nothing else is
    trusted beyond Chromium's built-in store). ``hosts``: host name -> IPv4/IPv6
    address. ``workdir``: where the profile, ``HOME`` and ``chromium.log`` go
    (a temporary directory, removed on ``stop()``, when not given).

    The process runs in its own process group and is killed with it on ``stop()``.
    It keeps running until then: the caller waits for what it needs (the page
    reporting its results, say) and stops it.
    """

    def __init__(self, url: str, *, roots: Sequence[bytes], hosts: Mapping[str, str],
                 workdir: str | os.PathLike[str] | None = None, extra_args: Sequence[str] = ()) -> None:
        self.url = url
        self.roots = list(roots)
        self.hosts = dict(hosts)
        self.extra_args = list(extra_args)
        self._owned = workdir is None
        self._workdir_arg = workdir
        self.workdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        if self.workdir is None:
            raise BrowserError("the browser has not been started")
        return self.workdir / "chromium.log"

    def argv(self, binary: str, profile: Path) -> list[str]:
        return [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--host-resolver-rules={host_resolver_rules(self.hosts)}",
            *self.extra_args,
            self.url,
        ]

    def start(self) -> Self:
        if self.proc is not None:
            return self
        binary = _require(CHROMIUM_BINARY)
        self.workdir = (Path(tempfile.mkdtemp(prefix="chromium-")) if self._workdir_arg is None
                        else Path(self._workdir_arg))
        try:
            home = self.workdir / "home"
            profile = self.workdir / "profile"  # new and empty: no state from any earlier run
            profile.mkdir(parents=True, exist_ok=True)
            trust_roots(home, self.roots)
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(home),  # where Chromium finds .pki/nssdb
                "XDG_CONFIG_HOME": str(home / ".config"),
                "XDG_CACHE_HOME": str(home / ".cache"),
                "TMPDIR": str(self.workdir),
            }
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(self.argv(binary, profile), stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and not self._exited()

    def _exited(self) -> bool:
        """True once the browser has exited, WITHOUT reaping it: while it is an unreaped
        zombie its pid, and so its process-group id, cannot belong to anyone else."""
        assert self.proc is not None
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return True
        return info is not None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, BrowserError):
            return ""

    def log_tail(self) -> str:
        status = "not started" if self.proc is None else "running" if self.alive() else "exited"
        return f"--- chromium ({status}) log ---\n{self.log_text()[-_LOG_TAIL:]}"

    def stop(self, timeout: float = 10.0) -> None:
        """Kill the browser's process group (idempotent) and remove an owned workdir."""
        if self.proc is not None and self.proc.returncode is None:
            # TERM lets Chromium close its renderers; KILL then takes whatever of the group
            # is left. Both before the leader is reaped, so the group id is still ours.
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not self._exited() and time.monotonic() < deadline:
                time.sleep(0.05)
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout)
        if self._owned and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
