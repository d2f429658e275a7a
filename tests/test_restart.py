"""Start-up and restarts lose nothing when the sockets outlive the process.

The test holds the listening sockets itself, as systemd does with socket
activation (deploy/edgeproxy-*.socket), and hands them to each edge process
(LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID). Then:
- a client that connects before any edge runs waits in the listen backlog and
  gets the name's own certificate, never the fallback (no handshake before the
  certificates are loaded);
- 8 clients send events while the edge is stopped with SIGTERM (it drains) and
  a new one is started: 0 refused connections, 0 certificate errors, 0 failed
  requests, and the relay received every acknowledged event;
- inherited sockets are matched by name and checked against the config.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeproxy.config import load_settings
from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin
from edgeproxy.errors import ConfigError
from edgeproxy.server import listening_sockets

from tlshelpers import seed

HOST = "restart.example.test"


def _listen(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    return sock


class Held:
    """Three listening sockets that outlive every edge process of a test."""

    def __init__(self) -> None:
        self.sockets = {"http": _listen(), "https": _listen(), "admin": _listen()}

    def port(self, name: str) -> int:
        return int(self.sockets[name].getsockname()[1])

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()


@pytest.fixture
def held() -> Iterator[Held]:
    sockets = Held()
    try:
        yield sockets
    finally:
        sockets.close()


def _config(tmp: Path, held: Held, origin: ScriptOrigin, relay: RecordingRelay) -> tuple[EdgeConfig, bytes]:
    config = EdgeConfig(state_dir=tmp, acme_directory="https://127.0.0.1:9/directory", acme_ca_bundle="",
                        script_url=origin.script_url, relay_url=f"{relay.url}/ingest",
                        http_port=held.port("http"), https_port=held.port("https"), admin_port=held.port("admin"),
                        extra={"renew": {"interval": 3600.0}, "monitor": {"interval": 0.0}})
    root = seed(config.db_path, HOST)
    return config, root


def _client_context(root: bytes) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=root.decode())


def _event(port: int, ctx: ssl.SSLContext, n: int, timeout: float = 30.0, keep_alive: bool = False,
           responses: list[bytes] | None = None) -> str:
    """One event over a new verified TLS connection; the outcome's category."""
    body = f'{{"n":{n}}}'.encode()
    close = "" if keep_alive else "Connection: close\r\n"
    request = (f"POST /api/v1/m HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n{close}\r\n").encode() + body
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
                tls.sendall(request)
                response = b""
                while chunk := tls.recv(65536):
                    response += chunk
    except ConnectionRefusedError:
        return "refused"
    except ssl.SSLCertVerificationError:
        return "cert_error"
    except (OSError, ssl.SSLError) as exc:
        return f"failed:{type(exc).__name__}"
    if responses is not None:
        responses.append(response)
    if response.startswith(b"HTTP/1.1 202 "):
        return "ok"
    return f"failed:{response[:40]!r}"


def test_a_client_waiting_before_start_up_gets_the_real_certificate(tmp_path: Path, held: Held) -> None:
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config, root = _config(tmp_path, held, origin, relay)
        ctx = _client_context(root)
        outcome: list[str] = []
        early = threading.Thread(target=lambda: outcome.append(_event(held.port("https"), ctx, 0)))
        early.start()  # connects now: the kernel queues it, nobody accepts yet
        time.sleep(0.3)
        assert not outcome
        with EdgeProcess(config, sockets=held.sockets):
            early.join(30)
        assert outcome == ["ok"]  # verified against the name's root: not the fallback


def test_restart_under_load_refuses_and_fails_nothing(tmp_path: Path, held: Held) -> None:
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config, root = _config(tmp_path, held, origin, relay)
        ctx = _client_context(root)
        port = held.port("https")
        stop = threading.Event()
        outcomes: Counter[str] = Counter()
        lock = threading.Lock()

        def client(k: int) -> None:
            n = 0
            while not stop.is_set():
                result = _event(port, ctx, k * 1_000_000 + n)
                n += 1
                with lock:
                    outcomes[result] += 1

        edge = EdgeProcess(config, workers=2, sockets=held.sockets).start()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2)
            before = sum(outcomes.values())
            edge.stop()  # SIGTERM: stop accepting, drain, exit
            assert edge.proc is not None and edge.proc.returncode == 0, edge.log_text()[-3000:]
            edge = EdgeProcess(config, workers=2, sockets=held.sockets).start()
            time.sleep(2)
            assert sum(outcomes.values()) > before  # traffic went on through the restart
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
            edge.stop()
        assert outcomes["ok"] > 50, outcomes
        assert set(outcomes) == {"ok"}, outcomes  # 0 refused, 0 certificate errors, 0 failed
        assert len(relay.snapshot()) == outcomes["ok"]  # every acknowledged event reached the relay


def _settings(held: Held, **listen: str) -> object:
    env = {"EDGEPROXY_LISTEN_HTTP": f"127.0.0.1:{held.port('http')}",
           "EDGEPROXY_LISTEN_HTTPS": f"127.0.0.1:{held.port('https')}",
           "EDGEPROXY_LISTEN_ADMIN": f"127.0.0.1:{held.port('admin')}"}
    env.update({f"EDGEPROXY_LISTEN_{k.upper()}": v for k, v in listen.items()})
    return load_settings(env=env)


def _activate(held: Held, names: list[str], code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child that inherited sockets the systemd way: ``names`` are
    "name" (the held socket of that role) or "name=role" (another role's socket)."""
    from edgeproxy.devtools.edgeproc import _SOCKET_TRAMPOLINE

    pairs = [n.split("=") if "=" in n else (n, n) for n in names]
    names = [name for name, _ in pairs]
    fds = [held.sockets[role].fileno() for _, role in pairs]
    env = {**os.environ, "LISTEN_FDS": str(len(names)), "LISTEN_FDNAMES": ":".join(names)}
    return subprocess.run([sys.executable, "-c", _SOCKET_TRAMPOLINE, ",".join(map(str, fds)), "-c", code],
                          env=env, pass_fds=fds, capture_output=True, text=True, timeout=60)


_PROBE = """
import json, os, sys
from edgeproxy.config import load_settings
from edgeproxy.server import listening_sockets
try:
    sockets = listening_sockets(load_settings(env=json.loads(os.environ["PROBE_ENV"])))
except Exception as exc:
    print("ERROR", exc); sys.exit(0)
print("OK", {k: (s.fileno(), s.getsockname()[1]) for k, s in sorted(sockets.items())}, "LISTEN_FDS" in os.environ)
"""


def _probe(held: Held, names: list[str], **listen: str) -> str:
    import json

    env = {"EDGEPROXY_LISTEN_HTTP": f"127.0.0.1:{held.port('http')}",
           "EDGEPROXY_LISTEN_HTTPS": f"127.0.0.1:{held.port('https')}",
           "EDGEPROXY_LISTEN_ADMIN": f"127.0.0.1:{held.port('admin')}"}
    env.update({f"EDGEPROXY_LISTEN_{k.upper()}": v for k, v in listen.items()})
    os.environ["PROBE_ENV"] = json.dumps(env)
    try:
        result = _activate(held, names, _PROBE)
    finally:
        del os.environ["PROBE_ENV"]
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_inherited_sockets_are_matched_by_name_not_order(held: Held) -> None:
    # Passed in another order than the roles: fd 3 is https, 4 admin, 5 http.
    out = _probe(held, ["https", "admin", "http"])
    assert out.startswith("OK")
    assert f"'https': (3, {held.port('https')})" in out
    assert f"'admin': (4, {held.port('admin')})" in out
    assert f"'http': (5, {held.port('http')})" in out
    assert out.endswith("False")  # LISTEN_* removed: workers and later commands do not reuse them


def test_a_public_socket_named_admin_is_refused(held: Held) -> None:
    # The public https socket handed over under the name "admin": its address is not
    # listen.admin, so it is refused instead of serving the admin API to the world.
    from edgeproxy.devtools.edgeproc import free_port

    out = _probe(held, ["http", "https", "admin=https"], admin=f"127.0.0.1:{free_port()}")
    assert out.startswith("ERROR") and "inherited socket 'admin'" in out and "listen.admin" in out, out
    out = _probe(held, ["http", "https=admin", "admin"], https=f"127.0.0.1:{held.port('https')}")
    assert out.startswith("ERROR") and "inherited socket 'https'" in out, out


def test_unnamed_or_unknown_sockets_are_refused(held: Held) -> None:
    fds = [held.sockets["https"].fileno()]
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "public"}
    from edgeproxy.devtools.edgeproc import _SOCKET_TRAMPOLINE

    code = ("from edgeproxy.sockets import inherited_sockets; import os\n"
            "try:\n    inherited_sockets(os.environ)\nexcept Exception as exc:\n    print(exc)")
    out = subprocess.run([sys.executable, "-c", _SOCKET_TRAMPOLINE, str(fds[0]), "-c", code], env=env,
                         pass_fds=fds, capture_output=True, text=True, timeout=60).stdout
    assert "named 'public'" in out
    with pytest.raises(ConfigError):
        listening_sockets(_settings(held), {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"})  # type: ignore[arg-type]


def test_sigterm_lets_a_relay_call_in_flight_finish(tmp_path: Path, held: Held) -> None:
    """The drain waits for a relay call longer than hypercorn's 5 s grace (upstream
    timeout 6 s + connect 2 s + 1): the event is forwarded and acknowledged."""
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config, root = _config(tmp_path, held, origin, relay)
        config.extra = {**(config.extra or {}), "upstream": {"timeout": 6.0, "connect_timeout": 2.0}}
        relay.delay = 5.5
        ctx = _client_context(root)
        outcome: list[str] = []
        edge = EdgeProcess(config, sockets=held.sockets).start()
        try:
            response: list[bytes] = []
            client = threading.Thread(target=lambda: outcome.append(
                _event(held.port("https"), ctx, 1, keep_alive=True, responses=response)))
            client.start()
            deadline = time.monotonic() + 5
            while not relay.snapshot() and time.monotonic() < deadline:
                time.sleep(0.05)  # the relay has the request: the call is in flight
            assert relay.snapshot()
            started = time.monotonic()
            edge.stop()
            client.join(30)
            assert edge.proc is not None and edge.proc.returncode == 0
            assert time.monotonic() - started > 4.0  # it waited for the call
        finally:
            edge.stop()
        assert outcome == ["ok"]
        # A keep-alive request answered during the drain says the connection closes (RFC 9112 9.6).
        assert b"\r\nconnection: close\r\n" in response[0].lower()
