"""Lifecycle webhooks: rules, signing, the outbox deliverer, and real edges sending to a real receiver.

The receiver is a real HTTP server in this file that verifies every request with
the ``standardwebhooks`` library (a tampered body is rejected) and records what it
accepted. The deliverer runs against real stores (SQLite here; both backends in
tests/test_storage_contract.py); the end-to-end tests run real ``edgeproxy serve``
processes (``devtools/edgeproc.py``): with real Pebble, killed with SIGKILL, and
two nodes on one PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from edgeproxy.config import EventEndpointSettings, EventsSettings, Settings, load_settings
from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess, free_port
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin
from edgeproxy.errors import ConfigError, EventNotFound
from edgeproxy.control.lifecycle import LifecycleEvents, delivery_backoff, expiring_event_id, next_attempt, status_event_type
from edgeproxy.control.registry import Registry, domain_view
from edgeproxy.storage import Storage, open_storage
from edgeproxy.storage.base import CertificateRecord, DomainRecord
from edgeproxy.control.webhooks import Attempt, EventLog, WebhookDeliverer, dead_letter_alert, sign

T0 = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.timezone.utc)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


# -- a real receiver -----------------------------------------------------------------------


class Receiver:
    """A webhook receiver on 127.0.0.1: verifies each request with the library and
    records the accepted ones. ``stop()``/``start()`` take it down and bring it
    back on the same port; ``fail_ids`` are answered 500."""

    def __init__(self, secret: str, port: int = 0) -> None:
        self.secret = secret
        self.port = port or free_port()
        self.accepted: list[dict[str, Any]] = []  # {"headers", "body", "event"}
        self.rejected: list[str] = []
        self.fail_ids: set[str] = set()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> "Receiver":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    event = Webhook(owner.secret).verify(body, headers)
                except WebhookVerificationError as exc:
                    with owner.lock:
                        owner.rejected.append(str(exc))
                    self.send_response(400)
                    self.end_headers()
                    return
                if headers.get("webhook-id") in owner.fail_ids:
                    self.send_response(500)
                    self.end_headers()
                    return
                with owner.lock:
                    owner.accepted.append({"headers": headers, "body": body, "event": event})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [a["event"] for a in self.accepted]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.events()) < count:
            assert time.monotonic() < deadline, f"{len(self.events())} of {count} events arrived: {self.events()}"
            time.sleep(0.05)
        return self.events()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(new_secret()).start()
    yield r
    r.stop()


# -- the rules (pure) ------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("issuing", "active", "domain.active"),
    ("pending_dns", "active", "domain.active"),
    ("failing", "active", "domain.active"),
    ("moved", "active", "domain.active"),
    ("renewing", "active", None),  # a renewal: certificate.renewed says it
    ("active", "active", None),
    ("issuing", "failing", "domain.failing"),
    ("failing", "failing", None),
    ("active", "moved", "domain.moved"),
    ("active", "renewing", None),
    ("issuing", "pending_dns", None),
])
def test_status_event_type(old: str, new: str, expected: str | None) -> None:
    assert status_event_type(old, new) == expected


def test_backoff_doubles_to_the_cap_and_the_horizon_dead_letters() -> None:
    assert [delivery_backoff(n, 5, 60) for n in range(0, 7)] == [0, 5, 10, 20, 40, 60, 60]
    assert delivery_backoff(10_000, 5, 60) == 60
    assert next_attempt(1, T0, T0, base=5, cap=60, horizon=100) == T0 + dt.timedelta(seconds=5)
    # The next try would fall after horizon_from + horizon: dead letter.
    assert next_attempt(3, T0 + dt.timedelta(seconds=90), T0, base=5, cap=60, horizon=100) is None


def _settings(*endpoints: EventEndpointSettings, **events: Any) -> Settings:
    settings = load_settings(None, env={"EDGEPROXY_DOMAINS_EXTRA_SUFFIXES": "test"})
    from dataclasses import replace
    return replace(settings, events=replace(settings.events, endpoints=tuple(endpoints), **events))


def test_events_carry_the_domain_view_and_go_to_the_endpoints_that_want_them() -> None:
    settings = _settings(EventEndpointSettings("https://a.example/h", "/x"),
                         EventEndpointSettings("https://b.example/h", "/x", ("domain.removed",)))
    events = LifecycleEvents(settings.events.endpoints, lambda r, c: domain_view(r, c, settings))
    record = DomainRecord("shop.example.test", "active", T0, T0)
    rows = events.build("domain.active", record, None, T0)
    assert [r.endpoint for r in rows] == ["https://a.example/h"]
    body = json.loads(rows[0].payload)
    assert body == {"type": "domain.active", "id": rows[0].event_id, "occurred_at": "2026-01-05T09:00:00Z",
                    **domain_view(record, None, settings)}
    assert len(events.build("domain.removed", record, None, T0)) == 2
    assert rows[0].event_id != events.build("domain.active", record, None, T0)[0].event_id
    cert = CertificateRecord("shop.example.test", b"k", b"c", T0, T0, "0abc", "CN=x", T0)
    assert events.expiring(record, cert, T0)[0].event_id == expiring_event_id("shop.example.test", "0abc")
    assert LifecycleEvents((), lambda r, c: {}).build("domain.active", record, None, T0) == []


def test_endpoint_configuration_is_checked(tmp_path: Path) -> None:
    env = {"EDGEPROXY_EVENTS_ENDPOINTS": json.dumps([{"url": "https://app.example/hooks", "secret_file": "/s",
                                                      "types": ["domain.active", "certificate.expiring"]}])}
    assert load_settings(None, env=env).events.endpoints == (
        EventEndpointSettings("https://app.example/hooks", "/s", ("domain.active", "certificate.expiring")),)
    for bad, message in (
        ([{"url": "ftp://x", "secret_file": "/s"}], "http"),
        ([{"url": "https://x", "secret_file": ""}], "secret_file"),
        ([{"url": "https://x", "secret_file": "/s", "types": ["domain.exploded"]}], "unknown event type"),
        ([{"url": "https://x", "secret_file": "/s"}, {"url": "https://x", "secret_file": "/t"}], "twice"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings(None, env={"EDGEPROXY_EVENTS_ENDPOINTS": json.dumps(bad)})
    config = tmp_path / "edge.toml"
    config.write_text('[[events.endpoints]]\nurl = "https://app.example/hooks"\nsecret_file = "/s"\n')
    assert load_settings(config, env={}).events.endpoints[0].types == ()


# -- the deliverer against a real store and a real receiver ------------------------------------


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


class Fixture:
    """A SQLite store, a registry emitting events, and a deliverer to ``receiver``."""

    def __init__(self, tmp: Path, receiver: Receiver, *, clock: Clock | None = None, **events: Any) -> None:
        secret_file = tmp / "secret"
        secret_file.write_text(receiver.secret + "\n")
        endpoint = EventEndpointSettings(receiver.url, str(secret_file))
        self.settings = _settings(endpoint, backoff_base=0.05, backoff_cap=0.2, **events)
        self.clock = clock
        self.store: Storage = open_storage(f"sqlite://{tmp}/state/edgeproxy.db")
        settings = self.settings
        self.lifecycle = LifecycleEvents(settings.events.endpoints, lambda r, c: domain_view(r, c, settings))
        now = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self.registry = Registry(self.store, settings, clock=now, events=self.lifecycle)
        self.dead: list[Attempt] = []
        self.attempts: list[Attempt] = []

        async def on_dead(attempt: Attempt) -> None:
            self.dead.append(attempt)

        self.deliverer = WebhookDeliverer(self.store, settings.events, events=self.lifecycle, warn_days=14,
                                          on_dead=on_dead, on_attempt=self.attempts.append, clock=now)

    def set_status(self, hostname: str, status: str) -> None:
        record = self.store.get_domain(hostname)
        assert record is not None
        now = self.clock() if self.clock else dt.datetime.now(dt.timezone.utc)
        after = DomainRecord(hostname, status, record.created_at, now)
        self.store.update_domain(hostname, now, status=status,
                                 events=self.lifecycle.status_change(record.status, after, None, now))

    async def deliver_once(self) -> int:
        async with httpx.AsyncClient(timeout=5) as client:
            return await self.deliverer.run_once(client)


def test_a_real_receiver_verifies_the_signature_and_rejects_a_tampered_body(tmp_path: Path,
                                                                            receiver: Receiver) -> None:
    fx = Fixture(tmp_path, receiver)
    record = fx.registry.add("shop.example.test")
    assert asyncio.run(fx.deliver_once()) == 1
    (accepted,) = receiver.accepted
    event = accepted["event"]
    assert event["type"] == "domain.registered" and event["id"].startswith("evt_")
    assert event["id"] == accepted["headers"]["webhook-id"]
    # The same JSON as GET /v1/domains/{hostname} (without the node-local last probe), plus the three keys.
    view = fx.registry.view(record)
    assert {k: v for k, v in event.items() if k not in ("type", "id", "occurred_at")} == view
    # The same headers with a changed body: the library refuses it, and so does the receiver.
    tampered = accepted["body"].replace(b"shop.example.test", b"evil.example.test")
    with pytest.raises(WebhookVerificationError):
        Webhook(receiver.secret).verify(tampered, accepted["headers"])
    answer = httpx.post(receiver.url, content=tampered, headers=accepted["headers"])
    assert answer.status_code == 400 and len(receiver.rejected) == 1
    # A wrong secret does not verify either.
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(accepted["body"], accepted["headers"])
    (row,) = fx.store.list_deliveries()
    assert (row.state, row.attempts, row.last_status) == ("delivered", 1, 204)


def test_every_attempt_is_signed_anew(tmp_path: Path, receiver: Receiver) -> None:
    clock = Clock(dt.datetime.now(dt.timezone.utc))
    fx = Fixture(tmp_path, receiver, clock=clock)
    fx.registry.add("shop.example.test")
    (row,) = fx.store.list_deliveries()
    receiver.fail_ids.add(row.event_id)
    asyncio.run(fx.deliver_once())
    assert fx.store.list_deliveries()[0].last_status == 500
    receiver.fail_ids.clear()
    clock.now += dt.timedelta(seconds=120)  # the retry is due, two minutes later
    asyncio.run(fx.deliver_once())
    (accepted,) = receiver.accepted
    # Signed at the retry's time, not the first attempt's (receivers refuse old timestamps).
    assert int(accepted["headers"]["webhook-timestamp"]) == int(clock.now.timestamp())
    assert sign(Webhook(receiver.secret), row.event_id, row.payload, clock.now)["webhook-signature"] == \
        accepted["headers"]["webhook-signature"]


def test_receiver_down_for_a_while_every_event_arrives_in_order_per_domain(tmp_path: Path,
                                                                           receiver: Receiver) -> None:
    fx = Fixture(tmp_path, receiver, poll_interval=0.05)
    receiver.stop()  # down before the first event
    hosts = [f"shop{i}.example.test" for i in range(4)]
    for host in hosts:
        fx.registry.add(host)
    for host in hosts:
        fx.set_status(host, "failing")
        fx.set_status(host, "active")
        fx.set_status(host, "moved")
    written = {h: [d.event_id for d in reversed(fx.store.list_deliveries(hostname=h))] for h in hosts}

    async def scenario() -> None:
        stop = asyncio.Event()
        loop = asyncio.create_task(fx.deliverer.run_forever(stop))
        await asyncio.sleep(1.5)  # several failed attempts per domain (connection refused)
        receiver.start()
        deadline = time.monotonic() + 20
        while len(receiver.events()) < 4 * len(hosts) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await loop

    asyncio.run(scenario())
    assert any(a.state == "pending" for a in fx.attempts), "the receiver was never seen down"
    events = receiver.events()
    assert sorted(e["id"] for e in events) == sorted(i for ids in written.values() for i in ids)
    for host in hosts:
        got = [e for e in events if e["hostname"] == host]
        assert [e["id"] for e in got] == written[host]
        assert [e["type"] for e in got] == ["domain.registered", "domain.failing", "domain.active", "domain.moved"]
    assert fx.store.count_deliveries_by_state() == {"delivered": 16}


def test_a_dead_lettered_event_does_not_block_the_domains_later_ones(tmp_path: Path, receiver: Receiver) -> None:
    clock = Clock(dt.datetime.now(dt.timezone.utc))
    fx = Fixture(tmp_path, receiver, clock=clock, horizon=60.0)
    fx.registry.add("shop.example.test")
    fx.set_status("shop.example.test", "failing")
    first, second = reversed(fx.store.list_deliveries())
    receiver.fail_ids.add(first.event_id)  # the receiver refuses this one, every time
    tries = 0
    while not fx.dead:
        asyncio.run(fx.deliver_once())
        clock.now += dt.timedelta(seconds=1)
        tries += 1
        assert tries < 100
    assert receiver.events() == []  # nothing overtook the event being retried
    (dead,) = fx.dead
    assert dead.delivery.event_id == first.event_id and dead.state == "dead" and dead.status == 500
    alert = dead_letter_alert(dead, clock.now)
    assert alert.kind == "webhook_dead_letter" and first.event_id in alert.key
    assert alert.details["redeliver"] == f"edgeproxy events redeliver {first.event_id}"
    asyncio.run(fx.deliver_once())
    assert [e["id"] for e in receiver.events()] == [second.event_id]
    # Redelivery (the admin API and the CLI call this): the receiver now takes it.
    receiver.fail_ids.clear()
    log = EventLog(fx.store, clock)
    assert [d["state"] for d in log.list(state="dead")] == ["dead"]
    assert [d["state"] for d in log.redeliver(first.event_id)] == ["pending"]
    asyncio.run(fx.deliver_once())
    assert [e["id"] for e in receiver.events()] == [second.event_id, first.event_id]
    with pytest.raises(EventNotFound):
        log.redeliver("evt_nope")


def test_certificate_expiring_fires_once_per_certificate(tmp_path: Path, receiver: Receiver) -> None:
    clock = Clock(T0)
    fx = Fixture(tmp_path, receiver, clock=clock)
    fx.registry.add("shop.example.test")
    for serial, days in (("01", 20), ("02", 10)):
        fx.store.save_certificate(CertificateRecord("shop.example.test", b"k", b"c", T0 - dt.timedelta(days=80),
                                                    T0 + dt.timedelta(days=days), serial, "CN=x", T0))
        fx.deliverer.scan_expiring()
        clock.now += dt.timedelta(days=7)  # 20 days left -> 13: crosses cert_warn_days (14)
        assert fx.deliverer.scan_expiring() == (1 if serial == "01" else 0)
        assert fx.deliverer.scan_expiring() == 0  # once per certificate
    expiring = fx.store.list_deliveries()
    assert [d.event_type for d in expiring[:2]] == ["certificate.expiring"] * 2
    bodies = [json.loads(d.payload) for d in expiring[:2]]
    assert [b["certificate"]["serial"] for b in bodies] == ["02", "01"]


def test_a_missing_secret_fails_at_start(tmp_path: Path) -> None:
    settings = EventsSettings(endpoints=(EventEndpointSettings("https://x/", str(tmp_path / "nope")),))
    with open_storage(f"sqlite://{tmp_path}/s/e.db") as store, pytest.raises(ConfigError, match="secret_file"):
        WebhookDeliverer(store, settings, events=LifecycleEvents((), lambda r, c: {}), warn_days=14)
    (tmp_path / "bad").write_text("not base64 !!")
    bad = EventsSettings(endpoints=(EventEndpointSettings("https://x/", str(tmp_path / "bad")),))
    with open_storage(f"sqlite://{tmp_path}/s/e.db") as store, pytest.raises(ConfigError, match="whsec_"):
        WebhookDeliverer(store, bad, events=LifecycleEvents((), lambda r, c: {}), warn_days=14)


# -- real edge processes ---------------------------------------------------------------------


def edge_config(tmp: Path, name: str, receivers: list[Receiver], origin: ScriptOrigin, relay: RecordingRelay,
                *, acme: tuple[str, str] = ("", ""), extra: dict[str, dict[str, Any]] | None = None) -> EdgeConfig:
    endpoints = []
    for i, r in enumerate(receivers):
        secret_file = tmp / f"{name}-secret-{i}"
        secret_file.write_text(r.secret)
        endpoints.append({"url": r.url, "secret_file": str(secret_file)})
    directory = acme[0] or f"https://127.0.0.1:{free_port()}/dir"  # no CA: issuance fails (domain.failing)
    sections: dict[str, dict[str, Any]] = {
        "events": {"endpoints": endpoints, "backoff_base": 0.2, "backoff_cap": 1.0, "poll_interval": 0.1},
        "renew": {"poll": 0.2},
        "monitor": {"interval": 0.0},
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    return EdgeConfig(state_dir=tmp / name, acme_directory=directory, acme_ca_bundle=acme[1],
                      script_url=origin.script_url, relay_url=relay.url, extra=sections)


@pytest.fixture
def upstreams() -> Iterator[tuple[ScriptOrigin, RecordingRelay]]:
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        yield origin, relay


@pytest.mark.e2e
def test_edge_with_pebble_sends_the_lifecycle_signed_in_order(tmp_path: Path, receiver: Receiver,
                                                               upstreams: tuple[ScriptOrigin, RecordingRelay],
                                                               pebble_factory: Any) -> None:
    origin, relay = upstreams
    alerts = RecordingRelay().__enter__()
    try:
        dead_end = Receiver(new_secret())  # never started: every attempt is refused
        config = edge_config(tmp_path, "edge", [receiver, dead_end], origin, relay,
                             extra={"events": {"horizon": 1.0}, "alerts": {"webhook_url": alerts.url}})
        pebble = pebble_factory(config.http_port)
        config.acme_directory, config.acme_ca_bundle = pebble.directory_url, str(pebble.ca_bundle_path)
        host = "shop.example.test"
        with EdgeProcess(config).start() as edge:
            with edge.admin() as admin:
                assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
                view = edge.wait_status(host, "active", timeout=60)
                events = receiver.wait_for(3)
                assert [e["type"] for e in events] == ["domain.registered", "certificate.issued", "domain.active"]
                active = events[2]
                assert active["certificate"] == view["certificate"] and active["status"] == "active"
                assert admin.delete(f"/v1/domains/{host}").status_code == 204
                removed = receiver.wait_for(4)[3]
                assert removed["type"] == "domain.removed" and removed["certificate"] == view["certificate"]
                # The dead end's deliveries are dead-lettered past the 1 s horizon: alert and metrics.
                deadline = time.monotonic() + 20
                while len(admin.get("/v1/events", params={"state": "dead"}).json()["deliveries"]) < 4:
                    assert time.monotonic() < deadline, edge.log_text()[-3000:]
                    time.sleep(0.1)
                listed = admin.get("/v1/events", params={"limit": 1000}).json()["deliveries"]
                assert sorted((d["endpoint"], d["state"]) for d in listed) == sorted(
                    [(receiver.url, "delivered")] * 4 + [(dead_end.url, "dead")] * 4)
                metrics = admin.get("/metrics").text
                assert 'edgeproxy_webhook_outbox{state="dead"} 4.0' in metrics
                assert 'edgeproxy_webhook_outbox{state="delivered"} 4.0' in metrics
                assert 'edgeproxy_webhook_attempts_total{outcome="dead"} 4.0' in metrics
                deadline = time.monotonic() + 20
                while sum(1 for r in alerts.snapshot() if b"webhook_dead_letter" in r.body) < 4:
                    assert time.monotonic() < deadline, "no dead-letter alert reached the alert webhook"
                    time.sleep(0.1)
                # Redeliver through the API: the event goes to both endpoints again.
                answer = admin.post(f"/v1/events/{active['id']}/redeliver")
                assert answer.status_code == 200 and {d["state"] for d in answer.json()["deliveries"]} == {"pending"}
                again = receiver.wait_for(5)[4]
                assert again["id"] == active["id"]
                assert admin.post("/v1/events/evt_unknown/redeliver").json()["error"]["code"] == "event_not_found"
    finally:
        alerts.__exit__(None, None, None)


@pytest.mark.e2e
def test_an_event_survives_kill_9_between_the_change_and_its_delivery(
        tmp_path: Path, upstreams: tuple[ScriptOrigin, RecordingRelay]) -> None:
    origin, relay = upstreams
    receiver = Receiver(new_secret())  # down: nothing can be delivered before the kill
    config = edge_config(tmp_path, "edge", [receiver], origin, relay)
    host = "shop.example.test"
    edge = EdgeProcess(config).start()
    try:
        with edge.admin() as admin:
            assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
        edge.kill(signal.SIGKILL)
    finally:
        edge.stop()
    receiver.start()
    try:
        with EdgeProcess(config).start():
            # (Its issuance waits for the killed process's order lease, storage.lock_ttl:
            # the registration is the event this test is about.)
            registered = receiver.wait_for(1, timeout=60)[0]  # a claim cut by the kill: 30 s lease
            assert (registered["type"], registered["hostname"]) == ("domain.registered", host)
    finally:
        receiver.stop()


@pytest.mark.e2e
def test_two_nodes_on_postgresql_deliver_each_event_once(tmp_path: Path, pg_url: str, receiver: Receiver,
                                                         upstreams: tuple[ScriptOrigin, RecordingRelay]) -> None:
    origin, relay = upstreams
    hosts = [f"shop{i}.example.test" for i in range(6)]
    with ExitStack() as exits:
        nodes = []
        for name in ("a", "b"):
            config = edge_config(tmp_path, name, [receiver], origin, relay, extra={"storage": {"url": pg_url}})
            node = EdgeProcess(config)
            exits.callback(node.stop)
            nodes.append(node.start())
        for i, host in enumerate(hosts):  # registrations on both nodes
            with nodes[i % 2].admin() as admin:
                assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
        events = receiver.wait_for(2 * len(hosts), timeout=60)  # registered + failing (no CA) per domain
        time.sleep(2)  # both deliverers have polled many times since: a duplicate would show now
        events = receiver.events()
        with nodes[0].admin() as admin:
            listed = admin.get("/v1/events", params={"limit": 1000}).json()["deliveries"]
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)) == len(listed) == 2 * len(hosts)
    assert {d["state"] for d in listed} == {"delivered"} and {d["attempts"] for d in listed} == {1}
    for host in hosts:
        assert [e["type"] for e in events if e["hostname"] == host] == ["domain.registered", "domain.failing"]


def test_events_api_refuses_what_it_does_not_understand(tmp_path: Path) -> None:
    from edgeproxy.control.admin import create_admin_app
    from edgeproxy.config import AdminSettings
    from edgeproxy.control.tokens import TokenStore

    (tmp_path / "token").write_text("t0ken-0123456789abcdef")
    with open_storage(f"sqlite://{tmp_path}/s/e.db") as store:
        store.append_events([LifecycleEvents((EventEndpointSettings("https://a/", "/s"),), lambda r, c: {}).build(
            "domain.active", DomainRecord("shop.example.test", "active", T0, T0), None, T0)[0]])
        tokens = TokenStore(AdminSettings(str(tmp_path / "token"), str(tmp_path / "tokens.json")))
        app = create_admin_app(Registry(store, _settings()), tokens, event_log=EventLog(store))
        asyncio.run(_probe_events_api(app))


async def _probe_events_api(app: Any) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin",
                                 headers={"Authorization": "Bearer t0ken-0123456789abcdef"}) as client:
        ok = await client.get("/v1/events", params={"hostname": "shop.example.test", "state": "pending"})
        assert ok.status_code == 200 and [d["type"] for d in ok.json()["deliveries"]] == ["domain.active"]
        assert (await client.get("/v1/events", params={"state": "delivered"})).json() == {"deliveries": []}
        for params in ({"hostnme": "x"}, {"state": "lost"}, {"hostname": ""}, {"limit": "0"}, {"limit": "x"}):
            answer = await client.get("/v1/events", params=params)
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request", params
        missing = await client.post("/v1/events/evt_missing/redeliver")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "event_not_found"


def test_cli_events_list_and_redeliver(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeproxy.cli import main

    (tmp_path / "secret").write_text(new_secret())
    config = tmp_path / "edge.toml"
    config.write_text(f'[storage]\nurl = "sqlite://{tmp_path}/state/edgeproxy.db"\n'
                      '[domains]\nextra_suffixes = ["test"]\n'
                      f'[[events.endpoints]]\nurl = "https://app.example/hooks"\nsecret_file = "{tmp_path}/secret"\n')
    assert main(["--config", str(config), "domains", "add", "shop.example.test"]) == 0
    capsys.readouterr()
    assert main(["--config", str(config), "events", "list", "--json"]) == 0
    (delivery,) = json.loads(capsys.readouterr().out)["deliveries"]
    assert (delivery["type"], delivery["hostname"], delivery["state"]) == (
        "domain.registered", "shop.example.test", "pending")
    assert main(["--config", str(config), "events", "list", "--state", "dead"]) == 0
    assert capsys.readouterr().out.strip() == "0 listed"
    assert main(["--config", str(config), "events", "redeliver", delivery["id"]]) == 0
    assert "https://app.example/hooks" in capsys.readouterr().out
    assert main(["--config", str(config), "events", "redeliver", "evt_nope"]) == 1
    assert "[event_not_found]" in capsys.readouterr().err
