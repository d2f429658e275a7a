"""Renewal service against real Pebble and a real DNS server (pebble-challtestsrv).

A RenewalService runs in-process over a real SqliteStorage, a real AcmeIssuer
talking to Pebble, and a tiny HTTP-01 responder answering from that storage (as
the proxy does). DNS answers come from a challtestsrv owned by this module whose
default answer is *nothing*, so every name has exactly the records a test adds.
The only stand-in is ``CountingIssuer``: it forwards to the real issuer and
counts the orders that actually reached the CA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.control.acme_client import AcmeIssuer, IssuedCertificate
from edgeproxy.edge.certstore import CertStore
from conftest import Clock
from edgeproxy.devtools.upstreams import Http01Responder
from edgeproxy.devtools.pebble import ChallTestSrv, Pebble
from edgeproxy.control.domains import DnsChecker
from edgeproxy.errors import IssuanceError
from edgeproxy.control.renew import CERT_DOMAIN, FAILED_VALIDATION, ORDER, RenewalService, RenewPolicy, renewal_time
from edgeproxy.storage.base import AriState
from edgeproxy.storage.sqlite import SqliteStorage

EDGE = "edge.example.net"
UTC = dt.timezone.utc


@dataclass
class CountingIssuer:
    inner: AcmeIssuer
    calls: list[str] = field(default_factory=list)

    replaced: list[str | None] = field(default_factory=list)

    def issue(self, hostname: str, replaces: str | None = None) -> IssuedCertificate:
        self.calls.append(hostname)
        self.replaced.append(replaces)
        return self.inner.issue(hostname, replaces=replaces)

    def renewal_info(self, hostname: str, chain_pem: bytes) -> AriState:
        return self.inner.renewal_info(hostname, chain_pem)


@dataclass
class Stack:
    storage: SqliteStorage
    service: RenewalService
    issuer: CountingIssuer
    dns: ChallTestSrv
    responder: Http01Responder
    clock: Clock

    def add(self, hostname: str) -> None:
        now = self.clock()
        self.storage.add_domain(hostname, "issuing", now)
        self.storage.update_domain(hostname, now, status="issuing", next_attempt_at=now)

    def run(self, *names: str, force: bool = False) -> Any:
        return asyncio.run(self.service.run_pass(list(names) or None, force=force))

    def status(self, hostname: str) -> Any:
        return self.storage.get_domain(hostname)

    def into_renewal_window(self, hostname: str) -> None:
        """Move the clock just past the backstop renewal time of ``hostname``'s certificate."""
        cert = self.storage.get_certificate(hostname)
        assert cert is not None
        at = renewal_time(cert.not_before, cert.not_after) + dt.timedelta(seconds=1)
        self.clock.offset = at - dt.datetime.now(UTC)


@pytest.fixture(scope="module")
def dns_server() -> Iterator[ChallTestSrv]:
    with ChallTestSrv(default_ipv4="", default_ipv6="") as server:
        server.add_a(EDGE, ["127.0.0.1"])
        yield server


@pytest.fixture(scope="module")
def ca(pebble_factory_module: Any, dns_server: ChallTestSrv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pebble, Http01Responder]]:
    storage = SqliteStorage(str(tmp_path_factory.mktemp("renew") / "unused.db"))
    responder = Http01Responder(storage.get_challenge)
    pebble = pebble_factory_module(responder.port, nonce_reject=0, authz_reuse=0, dns_server=dns_server.dns_address)
    try:
        yield pebble, responder
    finally:
        responder.close()
        storage.close()


@pytest.fixture
def pebble(ca: tuple[Pebble, Http01Responder], tmp_path: Path) -> Iterator[tuple[Pebble, Http01Responder, SqliteStorage]]:
    """The module's Pebble, with a fresh store per test (the responder answers from it)."""
    storage = SqliteStorage(str(tmp_path / "edge.db"))
    ca[1].lookup = storage.get_challenge
    ca[1].refuse.clear()
    try:
        yield ca[0], ca[1], storage
    finally:
        storage.close()


def _stack(pebble: tuple[Pebble, Http01Responder, SqliteStorage], dns_server: ChallTestSrv, **policy: Any) -> Stack:
    ca, responder, storage = pebble
    clock = Clock()
    issuer = CountingIssuer(AcmeIssuer(storage=storage, directory_url=ca.directory_url,
                                       ca_bundle=str(ca.ca_bundle_path), timeout=30))
    checker = DnsChecker(cname_target=EDGE, edge_ips=("127.0.0.1",), resolver=dns_server.dns_address, timeout=2)
    service = RenewalService(storage, CertStore(storage), issuer, clock=clock,
                             policy=RenewPolicy(account=ca.directory_url, extra_suffixes=("test",), **policy),
                             dns=checker)
    return Stack(storage, service, issuer, dns_server, responder, clock)


@pytest.fixture
def stack(pebble: tuple[Pebble, Http01Responder, SqliteStorage], dns_server: ChallTestSrv) -> Stack:
    return _stack(pebble, dns_server)


# -- DNS and CAA pre-check --------------------------------------------------------------------


def test_dns_states_and_messages(stack: Stack) -> None:
    good, elsewhere, missing, caa = "good.dns.test", "elsewhere.dns.test", "missing.dns.test", "www.caa.dns.test"
    stack.dns.set_cname(good, EDGE)
    stack.dns.set_cname(elsewhere, "other.example.net")
    stack.dns.add_a("other.example.net", ["192.0.2.7"])
    stack.dns.set_cname(caa, EDGE)
    stack.dns.add_caa("caa.dns.test", [("issue", "pki.goog")])  # on the parent: the climb finds it
    for name in (good, elsewhere, missing, caa):
        stack.add(name)
    before = stack.clock()
    result = stack.run()
    assert result.issued == [good]
    assert stack.issuer.calls == [good]  # the other three never reached the CA
    assert stack.status(good).status == "active"

    cases = {elsewhere: ("dns_elsewhere", "other.example.net"), missing: ("dns_missing", "no DNS record"),
             caa: ("caa_forbids", 'caa.dns.test. CAA 0 issue "letsencrypt.org"')}
    for name, (code, text) in cases.items():
        record = stack.status(name)
        assert (record.status, record.error_code) == ("pending_dns", code), name
        assert text in (record.error_message or "")
        if code != "caa_forbids":
            assert f"{name}. CNAME {EDGE}." in (record.error_message or "")  # the exact record to add
        # re-checked with backoff: 1 minute after the first failed check
        assert record.attempts == 1
        assert dt.timedelta(seconds=55) < record.next_attempt_at - before < dt.timedelta(seconds=65)
        assert name in result.waiting and code in result.waiting[name]

    # The customer fixes the CNAME; the next due check orders the certificate.
    stack.dns.clear_cname(elsewhere)
    stack.dns.set_cname(elsewhere, EDGE)
    stack.clock.offset = dt.timedelta(minutes=2)
    result = stack.run()
    assert elsewhere in result.issued
    assert stack.status(elsewhere).status == "active"
    history = [e.status for e in stack.storage.status_history(elsewhere)]
    assert history[:3] == ["active", "issuing", "pending_dns"]


def test_removing_the_record_leads_to_moved_then_removal(stack: Stack) -> None:
    name = "moving.dns.test"
    stack.dns.set_cname(name, EDGE)
    stack.add(name)
    assert stack.run().issued == [name]
    cert = stack.storage.get_certificate(name)
    assert cert is not None
    stack.dns.clear_cname(name)  # the customer removed the record

    # At renewal time the pre-check sees it: moved, no order, certificate still served.
    stack.into_renewal_window(name)
    calls = len(stack.issuer.calls)
    result = stack.run()
    assert result.moved == [name] and len(stack.issuer.calls) == calls
    record = stack.status(name)
    assert (record.status, record.error_code) == ("moved", "dns_moved")
    assert stack.storage.get_certificate(name) == cert

    # Daily re-checks while moved; still gone after 7 days: removed with its key.
    stack.clock.offset += dt.timedelta(days=1, seconds=1)
    assert stack.run().moved == [name]
    stack.clock.offset += dt.timedelta(days=6, seconds=1)
    assert stack.run().removed == [name]
    assert stack.status(name) is None and stack.storage.get_certificate(name) is None
    assert len(stack.issuer.calls) == calls


def test_moved_domain_that_points_back_is_renewed(stack: Stack) -> None:
    name = "back.dns.test"
    stack.dns.set_cname(name, EDGE)
    stack.add(name)
    stack.run()
    old = stack.storage.get_certificate(name)
    assert old is not None
    stack.dns.clear_cname(name)
    stack.into_renewal_window(name)
    assert stack.run().moved == [name]
    stack.dns.set_cname(name, EDGE)
    stack.clock.offset += dt.timedelta(days=1, seconds=1)
    assert stack.run().issued == [name]
    new = stack.storage.get_certificate(name)
    assert new is not None and new.serial != old.serial
    assert stack.status(name).status == "active"


# -- budgets ------------------------------------------------------------------------------------


def test_sixth_failed_validation_within_an_hour_is_never_sent(stack: Stack) -> None:
    name = "fails.budget.test"
    stack.dns.set_cname(name, EDGE)
    stack.responder.refuse.add(name)  # the CA's HTTP-01 fetch gets a 404: a real failed validation
    stack.add(name)
    for attempt in range(1, 6):
        result = stack.run(name, force=True)
        assert name in result.failed, attempt
        assert result.failed[name].code == "acme_unauthorized"
    assert stack.issuer.calls.count(name) == 5
    # Budgets are kept per CA: "<name> <directory URL>".
    failures = stack.storage.events_since(FAILED_VALIDATION, f"{name} {stack.service.policy.account}",
                                          stack.clock() - dt.timedelta(hours=1))
    assert len(failures) == 5

    result = stack.run(name, force=True)  # even an operator's forced retry respects the budget
    assert stack.issuer.calls.count(name) == 5  # the sixth was never sent
    assert "rate_budget" in result.waiting[name]
    record = stack.status(name)
    assert record.error_code == "rate_budget"
    assert record.next_attempt_at == failures[0] + dt.timedelta(hours=1)
    assert "failed validations" in (record.error_message or "")


def test_exhausted_registered_domain_budget_queues_the_order(
    pebble: tuple[Pebble, Http01Responder, SqliteStorage], dns_server: ChallTestSrv
) -> None:
    stack = _stack(pebble, dns_server, certs_per_domain=2)
    first, second, third = "a.shop-budget.test", "b.shop-budget.test", "c.shop-budget.test"
    for name in (first, second, third):
        stack.dns.set_cname(name, EDGE)
        stack.add(name)
    result = stack.run(first, second)
    assert sorted(result.issued) == [first, second]
    assert len(stack.storage.events_since(CERT_DOMAIN, f"shop-budget.test {stack.service.policy.account}",
                                          stack.clock() - dt.timedelta(days=7))) == 2
    orders = len(stack.storage.events_since(ORDER, stack.service.policy.account, stack.clock() - dt.timedelta(hours=3)))
    result = stack.run(third)
    assert third in result.waiting and third not in stack.issuer.calls
    record = stack.status(third)
    assert record.status == "issuing" and record.error_code == "rate_budget"
    assert "certificates for shop-budget.test per 7 days" in (record.error_message or "")
    assert record.next_attempt_at > stack.clock() + dt.timedelta(days=6)
    assert len(stack.storage.events_since(ORDER, stack.service.policy.account,
                                          stack.clock() - dt.timedelta(hours=3))) == orders


def test_ca_503_with_retry_after_is_honoured(tmp_path: Path) -> None:
    """A CA that answers 503 + Retry-After (RFC 8555 section 6.6): no attempt before then."""

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = json.dumps({"type": "urn:ietf:params:acme:error:serverInternal",
                               "detail": "down for maintenance"}).encode()
            self.send_response(503)
            self.send_header("Retry-After", "900")
            self.send_header("Content-Type", "application/problem+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    storage = SqliteStorage(str(tmp_path / "edge.db"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dir"
        clock = Clock()
        service = RenewalService(storage, CertStore(storage), AcmeIssuer(storage=storage, directory_url=url, timeout=5),
                                 clock=clock, policy=RenewPolicy(account=url))
        now = clock()
        storage.add_domain("busy.example.test", "issuing", now)
        storage.update_domain("busy.example.test", now, status="issuing", next_attempt_at=now)
        result = asyncio.run(service.run_pass())
        error = result.failed["busy.example.test"]
        assert isinstance(error, IssuanceError) and error.retry_after == 900
        record = storage.get_domain("busy.example.test")
        assert record is not None and record.status == "failing"
        assert dt.timedelta(seconds=895) < record.next_attempt_at - now < dt.timedelta(seconds=905)
        assert asyncio.run(service.run_pass()).failed == {}  # not due again before Retry-After
    finally:
        storage.close()
        server.shutdown()
        server.server_close()


# -- ARI (RFC 9773) -----------------------------------------------------------------------------
# Pebble 2.4 has no renewalInfo. AriFront is a transparent HTTPS front for Pebble
# (Pebble's own TLS identity, Host preserved so Pebble's JWS URL checks and the
# URLs it hands out name the front) that adds ``renewalInfo`` to the directory,
# answers it with a window the test chooses, and records every newOrder payload.
# Orders, validation and issuance are still real Pebble.


class AriFront:
    def __init__(self, pebble: Pebble) -> None:
        import base64
        import ssl

        import httpx

        self.window: tuple[dt.datetime, dt.datetime] = (dt.datetime.now(UTC) + dt.timedelta(days=30),
                                                         dt.datetime.now(UTC) + dt.timedelta(days=31))
        self.orders: list[dict[str, Any]] = []
        self.ari_queries: list[str] = []
        upstream = pebble.directory_url.split("/dir")[0]
        client = httpx.Client(verify=ssl.create_default_context(cafile=str(pebble.ca_bundle_path)), timeout=30)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.path.startswith("/renewal-info/"):
                    outer.ari_queries.append(self.path.rsplit("/", 1)[-1])
                    start, end = outer.window
                    data = json.dumps({"suggestedWindow": {"start": start.isoformat(), "end": end.isoformat()}})
                    self._reply(200, {"Content-Type": "application/json", "Retry-After": "3600"}, data.encode())
                    return
                if method == "POST" and "order-plz" in self.path:
                    payload = json.loads(body)["payload"]
                    outer.orders.append(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "connection")}
                response = client.request(method, upstream + self.path, content=body, headers=headers)
                content = response.content
                if self.path == "/dir":
                    directory = response.json()
                    directory["renewalInfo"] = f"https://{self.headers['Host']}/renewal-info"
                    content = json.dumps(directory).encode()
                out = {k: v for k, v in response.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")}
                self._reply(response.status_code, out, content)

            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self._forward("GET")

            def do_HEAD(self) -> None:  # noqa: N802
                self._forward("HEAD")

            def do_POST(self) -> None:  # noqa: N802
                self._forward("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pebble.workdir / "https-cert.pem", pebble.workdir / "https-key.pem")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.directory_url = f"https://127.0.0.1:{self.server.server_address[1]}/dir"
        self._client = client
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._client.close()


def test_ari_window_decides_and_the_renewal_order_carries_replaces(
    pebble: tuple[Pebble, Http01Responder, SqliteStorage], dns_server: ChallTestSrv
) -> None:
    from edgeproxy.control.acme_client import ari_cert_id

    ca, _responder, storage = pebble
    front = AriFront(ca)
    try:
        stack = _stack(pebble, dns_server)
        stack.issuer.inner = AcmeIssuer(storage=storage, directory_url=front.directory_url,
                                        ca_bundle=str(ca.ca_bundle_path), timeout=30)
        name = "ari.dns.test"
        stack.dns.set_cname(name, EDGE)
        stack.add(name)
        assert stack.run().issued == [name]
        first = stack.storage.get_certificate(name)
        assert first is not None
        assert "replaces" not in front.orders[-1]  # a first order replaces nothing
        record = stack.status(name)
        assert record.next_attempt_at <= stack.clock() + dt.timedelta(hours=12)  # ARI polled twice a day

        # At the poll the CA's window is a month away: nothing is ordered, the window is stored.
        stack.clock.offset = record.next_attempt_at - dt.datetime.now(UTC) + dt.timedelta(seconds=1)
        orders = len(front.orders)
        result = stack.run()
        assert result.issued == [] and len(front.orders) == orders
        state = stack.storage.get_ari(name)
        assert state is not None and state.cert_id == ari_cert_id(first.chain_pem) == front.ari_queries[-1]
        assert front.window[0] <= state.renew_at <= front.window[1]
        # next look: the CA's Retry-After (1 h), well before the window
        assert stack.status(name).next_attempt_at <= stack.clock() + dt.timedelta(hours=1, seconds=5)

        # The CA moves the window into the past (e.g. a revocation is coming): renew now, with replaces.
        front.window = (dt.datetime.now(UTC) - dt.timedelta(hours=2), dt.datetime.now(UTC) - dt.timedelta(hours=1))
        stack.clock.offset += dt.timedelta(hours=1, seconds=10)
        result = stack.run()
        assert result.issued == [name]
        assert front.orders[-1]["replaces"] == ari_cert_id(first.chain_pem)
        assert stack.issuer.replaced[-1] == ari_cert_id(first.chain_pem)
        second = stack.storage.get_certificate(name)
        assert second is not None and second.serial != first.serial

        # Emergency: under 1/20 of the lifetime left, renew even though ARI says "later".
        front.window = (dt.datetime.now(UTC) + dt.timedelta(days=3000), dt.datetime.now(UTC) + dt.timedelta(days=3001))
        lifetime = second.not_after - second.not_before
        stack.clock.offset = second.not_after - lifetime / 30 - dt.datetime.now(UTC)
        stack.storage.update_domain(name, stack.clock(), status="active", next_attempt_at=stack.clock())  # a check
        result = stack.run(name)
        assert result.issued == [name]
        assert front.orders[-1]["replaces"] == ari_cert_id(second.chain_pem)
    finally:
        front.close()
