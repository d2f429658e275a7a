"""Run a real ``edgeproxy serve`` process on free loopback ports (tests and ``edgeproxy demo``).

Owns: writing a config for a local edge, starting/stopping the process, waiting
until it answers, and clients that talk to it the way a browser would: TLS with
SNI = the custom hostname, verified against the ACME server's root only.
Must not import: ``acme``; nothing of ours but what a client would use.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["EdgeConfig", "EdgeProcess", "free_port", "verified_client"]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


@dataclass
class EdgeConfig:
    """Everything a local edge needs; ``write()`` produces its TOML file."""

    state_dir: Path
    acme_directory: str
    acme_ca_bundle: str
    script_url: str
    relay_url: str
    http_port: int = 0
    https_port: int = 0
    admin_port: int = 0
    cname_target: str = "edge.example.net"
    admin_socket: str = ""  # serve the admin API on this Unix socket instead of a TCP port
    dns_check: bool = False  # tests that exercise the DNS pre-check opt in (with a resolver)
    extra: Mapping[str, Mapping[str, Any]] | None = None  # more [section] keys

    def __post_init__(self) -> None:
        self.http_port = self.http_port or free_port()
        self.https_port = self.https_port or free_port()
        self.admin_port = self.admin_port or free_port()

    @property
    def token_file(self) -> Path:
        return self.state_dir / "admin-token"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "edgeproxy.db"

    def sections(self) -> dict[str, dict[str, Any]]:
        data: dict[str, dict[str, Any]] = {
            "acme": {"directory": self.acme_directory, "ca_bundle": self.acme_ca_bundle, "email": "ops@example.test"},
            "listen": {
                "http": f"127.0.0.1:{self.http_port}",
                "https": f"127.0.0.1:{self.https_port}",
                "admin": f"unix:{self.admin_socket}" if self.admin_socket else f"127.0.0.1:{self.admin_port}",
            },
            "storage": {"url": f"sqlite://{self.db_path}"},
            # The spool is node-local even when storage.url is a shared PostgreSQL:
            # keep it in this node's state dir, never the system default.
            "spool": {"path": str(self.state_dir / "spool.db")},
            "upstream": {"script": self.script_url, "relay": self.relay_url},
            "dns": {"cname_target": self.cname_target, "check": self.dns_check},
            "domains": {"extra_suffixes": ["test"]},
            "admin": {"token_file": str(self.token_file), "tokens_file": str(self.state_dir / "admin-tokens.json")},
            # Every local client is 127.0.0.1: per-IP limits would throttle tests and
            # benchmarks, so they are off unless a caller opts in through ``extra``.
            "proxy": {"rate_per_ip": 0.0, "rate_per_domain": 0.0},
        }
        for section, values in (self.extra or {}).items():
            data.setdefault(section, {}).update(values)
        return data

    def write(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        for section, values in self.sections().items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
            lines.append("")
        path = self.state_dir / "edgeproxy.toml"
        path.write_text("\n".join(lines))
        return path


_SOCKET_TRAMPOLINE = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)  # inheritable, as sd_listen_fds expects
for fd in set(high) | {fd for fd in fds if fd >= 3 + len(fds)}:
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


class EdgeProcess:
    """``python -m edgeproxy serve`` as a child process, output to ``state_dir/edge.log``."""

    def __init__(self, config: EdgeConfig, workers: int = 1, env: Mapping[str, str] | None = None,
                 sockets: Mapping[str, socket.socket] | None = None) -> None:
        self.config = config
        self.workers = workers
        self.env = dict(env or {})
        # Listening sockets this test holds, handed over as systemd would
        # (LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID, fds from 3 on; edgeproxy/sockets.py).
        self.sockets = dict(sockets or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config.state_dir / "edge.log"

    def start(self, timeout: float = 20.0, attempts: int = 3) -> "EdgeProcess":
        """Start and wait until the admin API answers.

        ``free_port`` only says a port *was* free: another process may take it
        before the edge binds. Then the HTTPS and admin ports are picked again
        (up to ``attempts`` times); the HTTP port cannot be, because the ACME
        server under test was told to validate on it.
        """
        for attempt in range(attempts):
            path = self.config.write()
            env = {**os.environ, **self.env}
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            command = ["-m", "edgeproxy", "--config", str(path), "serve", "--workers", str(self.workers)]
            pass_fds: tuple[int, ...] = ()
            if self.sockets:
                names = list(self.sockets)
                pass_fds = tuple(self.sockets[name].fileno() for name in names)
                env.update(LISTEN_FDS=str(len(names)), LISTEN_FDNAMES=":".join(names))
                # A trampoline moves the fds to 3, 4, ... and sets LISTEN_PID to its own
                # pid, which exec keeps: what systemd does between fork and exec.
                command = ["-c", _SOCKET_TRAMPOLINE, ",".join(map(str, pass_fds)), *command]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, *command],
                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, pass_fds=pass_fds,
                )
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                taken = self.log_text()[log_start:]
                retry = attempt + 1 < attempts and "Address already in use" in taken and "(listen.http)" not in taken
                if not retry:
                    raise
                self.config.https_port = free_port()
                self.config.admin_port = free_port()
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def admin_url(self) -> str:
        return "http://admin.invalid" if self.config.admin_socket else f"http://127.0.0.1:{self.config.admin_port}"

    def admin_client(self, headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> httpx.Client:
        """A client for the admin API over TCP or the Unix socket."""
        transport = httpx.HTTPTransport(uds=self.config.admin_socket) if self.config.admin_socket else None
        return httpx.Client(base_url=self.admin_url, headers=dict(headers or {}), timeout=timeout,
                            transport=transport, trust_env=False)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"edgeproxy exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                with self.admin_client(timeout=1) as client:
                    if client.get("/healthz").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"edgeproxy did not become ready in {timeout}s:\n{self.log_text()[-4000:]}")

    def admin(self, timeout: float = 10.0) -> httpx.Client:
        token = self.config.token_file.read_text().strip()
        return self.admin_client({"Authorization": f"Bearer {token}"}, timeout=timeout)

    def wait_status(self, hostname: str, status: str = "active", timeout: float = 60.0) -> dict[str, Any]:
        """Poll the admin API until ``hostname`` reaches ``status``; fail fast on ``failing``."""
        deadline = time.monotonic() + timeout
        view: dict[str, Any] = {}
        with self.admin() as admin:
            while time.monotonic() < deadline:
                view = admin.get(f"/v1/domains/{hostname}").json()
                if view.get("status") == status:
                    return view
                if view.get("status") == "failing" and status != "failing":
                    raise RuntimeError(f"{hostname} failed: {view.get('error')}\n{self.log_text()[-4000:]}")
                time.sleep(0.1)
        raise TimeoutError(f"{hostname} not {status} after {timeout}s: {view}\n{self.log_text()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> "EdgeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def verified_client(root_pems: Sequence[bytes], *, http2: bool = False, timeout: float = 10.0) -> httpx.Client:
    """An HTTPS client that trusts only ``root_pems`` (e.g. Pebble's root), like a
    browser that has never heard of our fallback certificate. Use
    ``client.get(f"https://127.0.0.1:{port}/...", headers={"Host": name},
    extensions={"sni_hostname": name})`` to connect with SNI = ``name``; the
    certificate is verified against ``name``."""
    ctx = ssl.create_default_context(cadata="\n".join(p.decode() for p in root_pems))
    return httpx.Client(verify=ctx, http2=http2, timeout=timeout, trust_env=False)
