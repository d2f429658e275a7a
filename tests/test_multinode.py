"""Several real edge nodes on one PostgreSQL store, against real Pebble.

Every node is a real ``edgeproxy serve`` process; they share nothing but the
database (a fresh schema per test). Clients trust only Pebble's root.
The outage test runs on a private throwaway cluster, never the machine's server.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from datetime import datetime, timezone
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography import x509

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess, free_port, verified_client
from pgharness import PrivateCluster, temp_schema
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin

pytestmark = pytest.mark.e2e


def peer_certificate(port: int, server_name: str, roots: list[bytes]) -> x509.Certificate:
    """TLS with SNI ``server_name``, verified against ``roots`` with the hostname checked."""
    ctx = ssl.create_default_context(cadata="\n".join(r.decode() for r in roots))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def san_names(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def wait_served(port: int, host: str, roots: list[bytes], timeout: float = 15.0) -> x509.Certificate:
    """The certificate ``port`` serves for ``host`` once it verifies (propagation is not instant)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return peer_certificate(port, host, roots)
        except (ssl.SSLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def lock_row(url: str, name: str) -> tuple[str, Any] | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT owner, expires_at FROM locks WHERE name = %s", (name,)).fetchone()
    return None if row is None else (row[0], row[1])


class Stack:
    """Pebble, a script origin, a relay, and edge nodes on one database URL."""

    def __init__(self, tmp: Path, url: str, pebble_factory: Any, exits: ExitStack) -> None:
        self.tmp, self.url, self.exits = tmp, url, exits
        self._pebble_factory = pebble_factory
        self.origin = exits.enter_context(ScriptOrigin())
        self.relay = exits.enter_context(RecordingRelay())
        self.pebble: Any = None

    def config(self, name: str, *, poll: float = 0.5, interval: float = 600.0, **storage: Any) -> EdgeConfig:
        # renew.poll / renew.interval: how often a node's loop looks for new work /
        # for due renewals (the defaults would make the nodes take turns, not race).
        return EdgeConfig(
            state_dir=self.tmp / name, acme_directory="", acme_ca_bundle="",
            script_url=self.origin.script_url, relay_url=self.relay.url,
            extra={"storage": {"url": self.url, **storage}, "renew": {"poll": poll, "interval": interval, "jitter": 0.0},
                   "upstream": {"rewrite": {"https://relay.vendor.invalid": "https://{host}{api_path}"}}},
        )

    def start_pebble(self, http_port: int, **options: Any) -> None:
        # authz_reuse=0: every order is a fresh validation (and so a countable order);
        # nonce_reject=0: a badNonce retry would log a second new-order POST.
        self.pebble = self._pebble_factory(http_port, nonce_reject=0, authz_reuse=0, **options)

    def start(self, config: EdgeConfig) -> EdgeProcess:
        config.acme_directory = self.pebble.directory_url
        config.acme_ca_bundle = str(self.pebble.ca_bundle_path)
        node = EdgeProcess(config)
        self.exits.callback(node.stop)
        return node.start()

    @property
    def roots(self) -> list[bytes]:
        return [self.pebble.root_pem()]

    def orders(self) -> int:
        """New orders Pebble accepted (one log line per POST to its new-order endpoint)."""
        return sum(1 for line in self.pebble.log_text().splitlines() if "/order-plz" in line and "POST" in line)


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, pebble_factory: Any) -> Iterator[Stack]:
    with ExitStack() as exits:
        yield Stack(tmp_path, pg_url, pebble_factory, exits)


def issued_lines(*nodes: EdgeProcess, host: str) -> int:
    return sum(node.log_text().count(f"certificate for {host} issued") for node in nodes)


# -- the CA asks node B, the order runs on node A, both serve -----------------------------


def test_http01_answered_by_the_other_node_and_both_serve(stack: Stack) -> None:
    host = "multi.example.test"
    config_a, config_b = stack.config("a"), stack.config("b")
    # B polls its change feed only every 30 s: serving within seconds proves the
    # NOTIFY sent by A's commit woke it (the poll is only the backstop).
    config_b.extra = {**(config_b.extra or {}), "proxy": {"cert_refresh_interval": 30.0}}
    stack.start_pebble(config_b.http_port)  # the CA only ever talks to node B
    b = stack.start(config_b)
    a = stack.start(config_a)
    with a.admin() as admin:
        assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
    view = a.wait_status(host, "active", timeout=60)
    # A ordered (its loop was woken by the registration); B answered the token from storage.
    assert issued_lines(a, host=host) == 1 and issued_lines(b, host=host) == 0
    for node in (a, b):
        cert = wait_served(node.config.https_port, host, stack.roots, timeout=5)
        assert san_names(cert) == [host]
        assert format(cert.serial_number, "x") == view["certificate"]["serial"]
    # B serves the script and forwards events for the name it never ordered.
    with verified_client(stack.roots) as client:
        sni = {"sni_hostname": host}
        base = f"https://127.0.0.1:{b.config.https_port}"
        assert client.get(f"{base}/js/app.js", headers={"Host": host}, extensions=sni).status_code == 200
        before = len(stack.relay.snapshot())
        sent = client.post(f"{base}/api/v1/m/collect", headers={"Host": host}, content=b'{"e":1}', extensions=sni)
        assert sent.status_code < 300
        assert len(stack.relay.snapshot()) == before + 1
    # A removal on A reaches B within seconds: B stops serving the name.
    with a.admin() as admin:
        assert admin.delete(f"/v1/domains/{host}").status_code == 204
    deadline = time.monotonic() + 5
    while True:
        try:
            peer_certificate(b.config.https_port, host, stack.roots)
        except ssl.SSLCertVerificationError:
            break  # the fallback certificate: the name is gone on B too
        assert time.monotonic() < deadline, "B still serves a removed domain"
        time.sleep(0.1)


# -- two nodes racing for the same name: one order -----------------------------------


def test_two_nodes_racing_for_one_name_make_one_order(stack: Stack) -> None:
    host = "race.example.test"
    config_a, config_b = stack.config("a", poll=0.1, interval=0.3), stack.config("b", poll=0.1, interval=0.3)
    # 30-second certificates: renewal is due 15 s after issuance (half the
    # lifetime), and both nodes' loops, with a full pass every 0.3 s, race for it.
    stack.start_pebble(config_a.http_port, validity_seconds=30)
    a, b = stack.start(config_a), stack.start(config_b)
    # Registration wakes A's loop; a retry on B in the same instant wakes B's.
    with a.admin() as admin_a, b.admin() as admin_b:
        assert admin_a.post("/v1/domains", json={"hostname": host}).status_code == 201
        assert admin_b.post(f"/v1/domains/{host}/retry").status_code == 200
    first = a.wait_status(host, "active", timeout=60)
    assert stack.orders() == 1
    assert issued_lines(a, b, host=host) == 1

    deadline = time.monotonic() + 45
    while issued_lines(a, b, host=host) < 2:
        assert time.monotonic() < deadline, a.log_text()[-3000:] + b.log_text()[-3000:]
        time.sleep(0.1)
    time.sleep(2)  # both loops have looked several times since: a duplicate would show now
    assert stack.orders() == 2 and issued_lines(a, b, host=host) == 2
    renewed = a.wait_status(host, "active", timeout=30)
    assert renewed["certificate"]["serial"] != first["certificate"]["serial"]
    for node in (a, b):
        deadline = time.monotonic() + 10
        cert = wait_served(node.config.https_port, host, stack.roots)
        while format(cert.serial_number, "x") != renewed["certificate"]["serial"]:
            assert time.monotonic() < deadline, "a node kept serving the old certificate"
            time.sleep(0.1)
            cert = peer_certificate(node.config.https_port, host, stack.roots)


# -- a node killed while it holds the issuance lock -----------------------------------


class Gate:
    """A TCP front for Pebble's HTTP-01 requests: first it swallows them (the
    order hangs in validation, its lock held), then it forwards to a node."""

    def __init__(self) -> None:
        self.port = free_port()
        self.target: int | None = None
        self.held: list[socket.socket] = []
        self.seen = threading.Event()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            if self.target is None:
                self.held.append(conn)  # never answered
                self.seen.set()
            else:
                threading.Thread(target=self._forward, args=(conn, self.target), daemon=True).start()

    @staticmethod
    def _forward(conn: socket.socket, port: int) -> None:
        with conn, socket.create_connection(("127.0.0.1", port)) as upstream:
            def pump(src: socket.socket, dst: socket.socket) -> None:
                try:
                    while data := src.recv(65536):
                        dst.sendall(data)
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the peer closed first: the exchange is over either way

            back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
            back.start()
            pump(conn, upstream)
            back.join(timeout=10)

    def forward_to(self, port: int) -> None:
        self.target = port
        for conn in self.held:
            conn.close()  # the stalled validation fails: that order is dead anyway

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()


def test_killed_lock_holder_is_taken_over_after_the_lease_expires(stack: Stack) -> None:
    host = "crash.example.test"
    ttl = 3.0
    gate = Gate()
    stack.exits.callback(gate.close)
    stack.start_pebble(gate.port)
    a = stack.start(stack.config("a", lock_ttl=ttl))
    b = stack.start(stack.config("b", lock_ttl=ttl))
    with a.admin() as admin:
        assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
    assert gate.seen.wait(30), "no node started validating"
    row = lock_row(stack.url, f"order:{host}")
    assert row is not None
    pids = {a.proc.pid: a, b.proc.pid: b}  # type: ignore[union-attr]
    holder = pids[int(row[0].split(":")[1])]
    survivor = b if holder is a else a
    time.sleep(ttl)  # the holder's lease keeper extends it while the order hangs
    extended = lock_row(stack.url, f"order:{host}")
    assert extended is not None and extended[0] == row[0] and extended[1] > row[1]

    holder.kill()  # SIGKILL: no finally, no unlock
    dead = lock_row(stack.url, f"order:{host}")
    assert dead is not None and dead[0] == row[0]  # the dead node still "holds" it
    gate.forward_to(survivor.config.http_port)
    # Watch the lease change hands: only once the dead node's lease has expired.
    deadline = time.monotonic() + ttl + 20
    while True:
        current = lock_row(stack.url, f"order:{host}")
        if current is None or current[0] != dead[0]:
            taken_at = datetime.now(timezone.utc)
            break
        assert time.monotonic() < deadline, "the lease was never taken over"
        time.sleep(0.05)
    assert taken_at >= dead[1], "the survivor took a lease that had not expired"
    assert (taken_at - dead[1]).total_seconds() < 8  # and soon after (loop interval 5 s)
    view = survivor.wait_status(host, "active", timeout=60)
    assert lock_row(stack.url, f"order:{host}") is None  # the survivor released it
    assert issued_lines(survivor, host=host) == 1
    cert = wait_served(survivor.config.https_port, host, stack.roots)
    assert format(cert.serial_number, "x") == view["certificate"]["serial"]


# -- PostgreSQL stopped mid-traffic ---------------------------------------------------


def test_store_outage_keeps_serving_and_recovers_without_restart(
    tmp_path: Path, private_pg: PrivateCluster, pebble_factory: Any
) -> None:
    host, later = "outage.example.test", "after.example.test"
    with ExitStack() as exits, temp_schema(private_pg.url) as url:
        stack = Stack(tmp_path, url, pebble_factory, exits)
        config = stack.config("a")
        stack.start_pebble(config.http_port)
        node = stack.start(config)
        with node.admin() as admin:
            assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
        node.wait_status(host, "active", timeout=60)
        pid = node.proc.pid  # type: ignore[union-attr]
        base = f"https://127.0.0.1:{config.https_port}"
        sni = {"sni_hostname": host}

        private_pg.stop()
        try:
            with verified_client(stack.roots) as client, node.admin() as admin:
                for i in range(5):  # serving goes on from memory
                    assert san_names(peer_certificate(config.https_port, host, stack.roots)) == [host]
                    script = client.get(f"{base}/js/app.js", headers={"Host": host}, extensions=sni)
                    assert script.status_code == 200 and host in script.text
                    before = len(stack.relay.snapshot())
                    sent = client.post(f"{base}/api/v1/m/collect", headers={"Host": host},
                                       content=b'{"n":%d}' % i, extensions=sni)
                    assert sent.status_code < 300
                    assert len(stack.relay.snapshot()) == before + 1
                    time.sleep(0.3)
                refused = admin.post("/v1/domains", json={"hostname": later})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "storage_unavailable"
                health = admin.get("/healthz")
                assert health.status_code == 503  # degraded: the store is down, serving is not
                assert health.json()["status"] == "degraded" and health.json()["serving"] is True
                assert health.json()["error"]["code"] == "storage_unavailable"
        finally:
            private_pg.start()

        # Back without a restart: health, registration, issuance, propagation.
        with node.admin() as admin:
            deadline = time.monotonic() + 20
            while admin.get("/healthz").status_code != 200:
                assert time.monotonic() < deadline, node.log_text()[-3000:]
                time.sleep(0.2)
            assert admin.post("/v1/domains", json={"hostname": later}).status_code == 201
        node.wait_status(later, "active", timeout=60)
        assert san_names(wait_served(config.https_port, later, stack.roots)) == [later]
        assert node.proc is not None and node.proc.pid == pid and node.proc.poll() is None
        deadline = time.monotonic() + 15  # the refresh loop notices on its next successful poll
        while "storage is reachable again" not in node.log_text():
            assert time.monotonic() < deadline, node.log_text()[-3000:]
            time.sleep(0.2)
        assert node.log_text().count("storage unavailable, serving from memory") == 1  # said once, not per poll
