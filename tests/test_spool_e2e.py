"""Zero data loss end to end: a real ``edgeproxy serve`` (two workers), a
real relay that goes down, comes back, or answers 401, real Pebble certificates.

The promise under test: every event the edge answered 2xx reaches the relay at
least once (each with one Idempotency-Key), and every event the relay refused can
be sent again with ``edgeproxy replay``, exactly once per key. Each event carries
its own id in the body, so the test knows which acknowledged events arrived.
"""

from __future__ import annotations

import datetime as dt

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess, verified_client
from edgeproxy.devtools.upstreams import RecordedRequest, RecordingRelay, ScriptOrigin

pytestmark = pytest.mark.e2e

HOST = "spool.example.test"


@dataclass
class Stack:
    config: EdgeConfig
    edge: EdgeProcess
    relay: RecordingRelay
    roots: list[bytes]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.config.https_port}/api/v1/m/collect"

    def restart(self, env: dict[str, str] | None = None) -> None:
        """Same config, state dir and ports (the certificate and the spool persist)."""
        self.edge.stop()
        self.edge = EdgeProcess(self.config, workers=2, env=env).start()
        wait_served(self)

    def spool(self) -> dict[str, Any]:
        with self.edge.admin() as admin:
            answer = admin.get("/v1/spool")
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgeproxy", "--config", str(self.config.state_dir / "edgeproxy.toml"),
                               *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pebble_factory_module) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    state = tmp_path_factory.mktemp("spool-edge")
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(
            state_dir=state, acme_directory="", acme_ca_bundle="",
            script_url=origin.script_url, relay_url=f"{relay.url}/ingest",
            extra={
                "upstream": {"connect_timeout": 1.0, "timeout": 2.0},
                "proxy": {"cert_refresh_interval": 0.2},
                # Fast retries so a test sees the relay's recovery within a second.
                "spool": {"backoff_base": 0.05, "backoff_cap": 0.5, "poll_interval": 0.1},
            },
        )
        pebble = pebble_factory_module(config.http_port)
        config.acme_directory = pebble.directory_url
        config.acme_ca_bundle = str(pebble.ca_bundle_path)
        edge = EdgeProcess(config, workers=2).start()
        try:
            with edge.admin() as admin:
                assert admin.post("/v1/domains", json={"hostname": HOST}).status_code == 201
            edge.wait_status(HOST, "active", timeout=60)
            s = Stack(config, edge, relay, [pebble.root_pem()])
            wait_served(s)
            yield s
        finally:
            s.edge.stop()


def wait_served(stack: Stack, timeout: float = 20.0) -> None:
    """Until 20 new connections in a row get the Pebble certificate: each worker loads
    certificates from the change feed on its own schedule."""
    deadline = time.monotonic() + timeout
    ok = 0
    while ok < 20:
        assert time.monotonic() < deadline, "the workers never all served the certificate"
        try:
            with verified_client(stack.roots, timeout=5) as client:
                client.get(f"https://127.0.0.1:{stack.config.https_port}/js/app.js", headers={"Host": HOST},
                           extensions={"sni_hostname": HOST})
            ok += 1
        except httpx.ConnectError:
            ok = 0
            time.sleep(0.1)


def send_events(stack: Stack, count: int, threads: int = 8, stop: threading.Event | None = None) -> dict[str, int]:
    """POST ``count`` events (or until ``stop``) from ``threads`` clients; event id -> status
    (0 when the connection failed: not acknowledged)."""
    results: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        with verified_client(stack.roots, timeout=10) as client:
            for _ in range(n):
                if stop is not None and stop.is_set():
                    return
                event = uuid.uuid4().hex
                try:
                    status = client.post(stack.url, headers={"Host": HOST, "Content-Type": "application/json"},
                                         extensions={"sni_hostname": HOST},
                                         content=json.dumps({"id": event}).encode()).status_code
                except httpx.TransportError as exc:
                    errors.append(repr(exc))
                    status = 0
                with lock:
                    results[event] = status

    per = max(1, count // threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, [per] * threads))
    if errors and stop is None:
        print("transport errors:", errors[:5])
    return results


def arrivals(relay: RecordingRelay) -> dict[str, list[str]]:
    """event id -> the Idempotency-Key of each arrival at the relay."""
    seen: dict[str, list[str]] = defaultdict(list)
    for req in relay.snapshot():
        seen[json.loads(req.body)["id"]].append(req.headers.get("idempotency-key", ""))
    return seen


def wait_delivered(stack: Stack, acked: set[str], timeout: float = 30.0) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        seen = arrivals(stack.relay)
        missing = acked - set(seen)
        if not missing:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} of {len(acked)} acknowledged events never reached the relay; "
                                 f"spool: {stack.spool()}\n{stack.edge.log_text()[-3000:]}")
        time.sleep(0.1)


def assert_one_key_per_event(seen: dict[str, list[str]], events: set[str]) -> None:
    for event in events:
        keys = set(seen[event])
        assert len(keys) == 1 and len(next(iter(keys))) == 32, (event, seen[event])


def test_relay_down_under_load_then_back_delivers_every_acknowledged_event(stack: Stack) -> None:
    stack.relay.down = True
    try:
        results = send_events(stack, 400)
        acked = {e for e, status in results.items() if status == 202}
        assert len(acked) == len(results) == 400  # the spool takes everything while the relay is down
        spooled = stack.spool()
        assert spooled["depth"] >= 1 and spooled["oldest_age_seconds"] >= 0
        # The same figures reach /metrics (and the spool alerts) through the monitor's hook.
        with stack.edge.admin_client() as client:
            metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in client.get("/metrics").text.splitlines()
                       if line.startswith("edgeproxy_spool_")}
        assert metrics["edgeproxy_spool_depth"] >= 1
        assert not acked & set(arrivals(stack.relay))
    finally:
        stack.relay.down = False
    seen = wait_delivered(stack, acked)
    assert_one_key_per_event(seen, acked)
    deadline = time.monotonic() + 10
    while stack.spool()["depth"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.spool()["depth"] == 0
    # Relay up: events go straight through (200-class answer from the relay itself).
    direct = send_events(stack, 16, threads=4)
    assert set(direct.values()) == {202} and set(direct) <= set(arrivals(stack.relay))


def test_kill_9_with_a_full_spool_and_load_running_loses_nothing_acknowledged(stack: Stack) -> None:
    stack.relay.down = True
    try:
        before = send_events(stack, 100)
        stop = threading.Event()
        during: dict[str, int] = {}

        def load() -> None:
            during.update(send_events(stack, 10_000, threads=4, stop=stop))

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(1.0)  # the load is running and spooling
        stack.edge.kill()  # SIGKILL to the whole process group: primary and worker
        stop.set()
        loader.join(30)
        acked = {e for e, s in {**before, **during}.items() if s == 202}
        assert len(acked) >= 100 + 10
        assert not acked & set(arrivals(stack.relay))
        stack.edge = EdgeProcess(stack.config, workers=2).start()
        wait_served(stack)
        assert stack.spool()["depth"] >= len(acked)  # it all survived on disk
    finally:
        stack.relay.down = False
    seen = wait_delivered(stack, acked)
    assert_one_key_per_event(seen, acked)


def test_relay_401_is_logged_and_replay_delivers_each_key_once(stack: Stack) -> None:
    # Only this test's events: the module's edge keeps replaying in the background,
    # and an entry left over from an earlier test (at-least-once: delivered, then
    # replayed again after a kill -9) may be refused by this test's 401 relay too.
    since = dt.datetime.now(dt.timezone.utc).isoformat()
    stack.relay.status = 401
    try:
        refused = send_events(stack, 24, threads=4)
    finally:
        stack.relay.status = 202
    assert set(refused.values()) == {401}  # the client is told; nothing was acknowledged
    first = arrivals(stack.relay)
    keys = {e: first[e][0] for e in refused}
    with stack.edge.admin() as admin:
        dry = admin.post("/v1/replay", json={"status": 401, "dry_run": True, "since": since}).json()
    assert dry["selected"] == 24 and dry["delivered"] == 0

    listed = stack.cli("replay", "--status", "401", "--domain", HOST, "--since", since, "--dry-run")
    assert listed.returncode == 0 and "24 would be sent" in listed.stdout, listed.stderr
    run = stack.cli("replay", "--status", "401", "--since", since)
    assert run.returncode == 0, run.stderr
    assert "24 selected, 24 delivered, 0 failed" in run.stdout
    assert "24/24" in run.stderr  # progress
    seen = arrivals(stack.relay)
    for event, key in keys.items():
        assert seen[event] == [key, key]  # the refused attempt, then exactly one replay, same key
    again = stack.cli("replay", "--status", "401", "--since", since)
    assert again.returncode == 0 and "0 selected, 0 delivered" in again.stdout
    assert arrivals(stack.relay) == seen


def test_spool_full_answers_503_and_refused_requests_are_logged_not_spooled(stack: Stack) -> None:
    stack.restart(env={"EDGEPROXY_SPOOL_MAX_BYTES": "6000"})  # room for about 15 events
    stack.relay.down = True
    try:
        results = send_events(stack, 40, threads=2)
        acked = {e for e, s in results.items() if s == 202}
        assert set(results.values()) == {202, 503}
        assert 5 <= len(acked) < 40
        depth = stack.spool()["depth"]
        assert depth == len(acked)
        with verified_client(stack.roots) as client:
            big = client.post(stack.url, headers={"Host": HOST}, extensions={"sni_hostname": HOST},
                              content=b"x" * 70_000)
            assert big.status_code == 413
        assert bad_content_length(stack) == 400  # refused by the HTTP parser: never reaches a route
        assert raw_request(stack, "POST /api/v1/m/a#b HTTP/1.1", b'{"e":1}') == 400  # refused by the route
        assert stack.spool()["depth"] == depth
        with stack.edge.admin() as admin:
            # Nothing refused silently: the 400 and the 413 are in the failed-request log too.
            for status in (400, 413):
                assert admin.post("/v1/replay", json={"status": status, "dry_run": True}).json()["selected"] == 1
            # The 413's body was never kept: it is listed, not resent.
            too_large = admin.post("/v1/replay", json={"status": 413}).json()
            assert (too_large["delivered"], too_large["failures"]) == (0, {"body not kept": 1})
            # The 503s the edge gave are in the failed-request log (resendable); the acks are not.
            assert admin.post("/v1/replay", json={"status": 503, "dry_run": True}).json()["selected"] == \
                40 - len(acked)
        # ... and counted by reason in /metrics (earlier tests of the module may have added some).
        with stack.edge.admin_client() as client:
            refusals = {line.split(" ")[0]: float(line.split(" ")[1]) for line in client.get("/metrics").text.splitlines()
                        if line.startswith("edgeproxy_event_refusals_total{")}
        assert refusals['edgeproxy_event_refusals_total{reason="spool_full"}'] >= 40 - len(acked)
        assert refusals['edgeproxy_event_refusals_total{reason="malformed_target"}'] >= 1
        assert refusals['edgeproxy_event_refusals_total{reason="body_too_large"}'] >= 1
    finally:
        stack.relay.down = False
    seen = wait_delivered(stack, acked)
    assert_one_key_per_event(seen, acked)
    assert not (set(results) - acked) & set(seen)  # refused with 503 -> never acknowledged, not spooled
    stack.restart()  # back to the default cap for the tests that follow


def bad_content_length(stack: Stack) -> int:
    """A POST whose Content-Length is not a number, over a raw TLS socket."""
    ctx = ssl.create_default_context(cadata="\n".join(r.decode() for r in stack.roots))
    with socket.create_connection(("127.0.0.1", stack.config.https_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
            tls.sendall(f"POST /api/v1/m/collect HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1x\r\n"
                        "Connection: close\r\n\r\n{}".encode())
            head = tls.recv(4096).decode("latin-1")
    return int(head.split()[1])


def raw_request(stack: Stack, request_line: str, body: bytes) -> int:
    """The status of one request sent as written (no client normalizes its target)."""
    ctx = ssl.create_default_context(cadata="\n".join(r.decode() for r in stack.roots))
    with socket.create_connection(("127.0.0.1", stack.config.https_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
            tls.sendall(f"{request_line}\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n".encode() + body)
            head = tls.recv(4096).decode("latin-1")
    return int(head.split()[1])


def test_cli_spool_list_and_drain_while_the_edge_is_stopped(stack: Stack) -> None:
    # Start from an empty spool: the module's edge may still be replaying an entry
    # left over from an earlier test (the relay is up here, so it drains).
    deadline = time.monotonic() + 20
    while stack.spool()["depth"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.spool()["depth"] == 0
    stack.relay.down = True
    try:
        results = send_events(stack, 12, threads=2)
        acked = {e for e, s in results.items() if s == 202}
        assert len(acked) == 12
        stack.edge.stop()  # graceful: the spool stays on disk
    finally:
        stack.relay.down = False
    stats = stack.cli("spool", "stats")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["depth"] == 12
    listed = stack.cli("spool", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 12
    drained = stack.cli("spool", "drain")
    assert drained.returncode == 0, drained.stderr
    assert "12 delivered" in drained.stdout and "0 left in the spool" in drained.stdout
    assert_one_key_per_event(wait_delivered(stack, acked, timeout=5), acked)
    stack.edge = EdgeProcess(stack.config, workers=2).start()
    wait_served(stack)
    assert stack.spool()["depth"] == 0
