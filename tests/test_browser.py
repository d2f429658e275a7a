"""A real browser against a real edge.

Headless Chromium (Debian's, installed by ``make chromium``) opens a customer's
page served over plain HTTP from one loopback address; the page loads the tracker
from the custom domain ``https://cdn.shop.test/js/app.js``, served by a real
``edgeproxy serve`` on port 443 of another loopback address, with a certificate
Pebble issued after validating HTTP-01 on port 80 there. The browser trusts
Pebble's root through a throwaway NSS database, nothing else: a certificate error
fails the page as it would for a visitor.

The tracker (``tests/fixtures/tracker.js``, written here) sends one event in each
shape real trackers use: an image beacon (GET with a query string), sendBeacon
(text/plain POST), fetch keepalive (text/plain POST) and a preflighted JSON POST.
The page (``tests/fixtures/customer.html``) reports what the browser saw: whether
the image loaded, what sendBeacon returned, each fetch's status.

Two visits: relay up (each event reaches the relay once, as sent, with the
forwarding headers) and relay down (each event is still acknowledged, and arrives
once the relay is back: the spool replays it).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from browserharness import INSTALL_HINT, HeadlessChromium, free_loopback_address, missing_binaries
from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.pebble import ChallTestSrv
from edgeproxy.devtools.upstreams import RecordedRequest, RecordingRelay, ScriptOrigin

pytestmark = pytest.mark.e2e

CUSTOM = "cdn.shop.test"  # the customer's custom domain, served by the edge
PAGE_HOST = "www.customer.test"  # the customer's own site
PAGE_PATH = "/landing"
VENDOR_COLLECTOR = "https://collect.vendor.invalid"  # what tracker.js names; the edge rewrites it
SCRIPT_PATH = "/js/app.js"  # routes.script_path default
API_PATH = "/api/v1/m"  # routes.api_path default
RELAY_BASE = "/ingest"  # upstream.relay = <relay>/ingest
FIXTURES = Path(__file__).parent / "fixtures"
PAGE_TIMEOUT = 60.0  # seconds for a page to report (a loaded 2-core machine starts Chromium slowly)
ARRIVAL_TIMEOUT = 30.0  # seconds for events to reach the relay (sendBeacon, spool replay)


# ---------------------------------------------------------------------------------------
# The four shapes: how the page sees each one, and what the relay must receive.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str  # the page's outcome kind: "image", "beacon" or "fetch"
    method: str
    name: str  # path below routes.api_path
    content_type: str | None  # what the browser sends (and the relay must receive)

    def relay_target(self, run: str) -> str:
        """The request target the relay must see: path and raw query as the browser sent them."""
        if self.method == "GET":
            return (f"{RELAY_BASE}{self.name}?type=pv&hostname={PAGE_HOST}"
                    f"&path={PAGE_PATH.replace('/', '%2F')}&run={run}")
        return f"{RELAY_BASE}{self.name}"

    def body(self, run: str) -> dict[str, str] | None:
        if self.method == "GET":
            return None
        return {"type": self.name.strip("/"), "hostname": PAGE_HOST, "path": PAGE_PATH, "run": run}


SHAPES = {
    "image-get": Shape("image", "GET", "/p.gif", None),
    # A string given to sendBeacon is sent as text/plain;charset=UTF-8 (Beacon spec, Fetch "extract a body").
    "sendbeacon": Shape("beacon", "POST", "/beacon", "text/plain;charset=UTF-8"),
    "fetch-keepalive": Shape("fetch", "POST", "/keepalive", "text/plain"),
    "json-preflight": Shape("fetch", "POST", "/json", "application/json"),
}


def _shape_of(outcome: dict[str, Any]) -> str | None:
    url = urlsplit(str(outcome.get("url", "")))
    for name, shape in SHAPES.items():
        if outcome.get("kind") == shape.kind and url.path == API_PATH + shape.name:
            return name
    return None


def _belongs_to(request: RecordedRequest, run: str) -> bool:
    """Every event carries its page view's run id: in the query (GET) or the body (POST)."""
    if request.method == "GET":
        return parse_qs(urlsplit(request.path).query).get("run") == [run]
    try:
        body = json.loads(request.body)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("run") == run


def _records(relay: RecordingRelay, run: str, shape: Shape) -> list[RecordedRequest]:
    return [r for r in relay.snapshot()
            if _belongs_to(r, run) and urlsplit(r.path).path == RELAY_BASE + shape.name]


# ---------------------------------------------------------------------------------------
# The customer's site: the page, and /report where the page posts what it saw.
# ---------------------------------------------------------------------------------------


class CustomerSite:
    """``http://www.customer.test:<port>/landing?run=<id>`` on a loopback address of its own."""

    def __init__(self, address: str, script_url: str) -> None:
        self.script_url = script_url
        self.template = (FIXTURES / "customer.html").read_text()
        self.reports: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                url = urlsplit(self.path)
                run = parse_qs(url.query).get("run", [""])[0]
                if url.path != PAGE_PATH or not re.fullmatch(r"[a-z0-9-]{1,64}", run):
                    self._answer(404, b"not found\n", "text/plain")
                    return
                page = site.template.replace("{{SCRIPT_URL}}", site.script_url).replace("{{RUN}}", run)
                self._answer(200, page.encode(), "text/html; charset=utf-8")

            def do_POST(self) -> None:  # noqa: N802 - stdlib naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if urlsplit(self.path).path != "/report":
                    self._answer(404, b"not found\n", "text/plain")
                    return
                report = json.loads(body)
                with site.lock:
                    site.reports[str(report["run"])] = report
                self._answer(204, b"", "text/plain")

        self.httpd = ThreadingHTTPServer((address, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="CustomerSite", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def report(self, run: str) -> dict[str, Any] | None:
        with self.lock:
            return self.reports.get(run)

    def __enter__(self) -> "CustomerSite":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------
# The stack: Pebble validating on port 80 of the edge's own loopback address.
# ---------------------------------------------------------------------------------------


@dataclass
class BrowserStack:
    edge: EdgeProcess
    relay: RecordingRelay
    site: CustomerSite
    edge_ip: str
    page_ip: str
    roots: list[bytes]

    @property
    def page_origin(self) -> str:
        return f"http://{PAGE_HOST}:{self.site.port}"

    def spool_depth(self) -> int:
        with self.edge.admin() as admin:
            answer = admin.get("/v1/spool")
            assert answer.status_code == 200, answer.text
            return int(answer.json()["depth"])

    def diagnostics(self) -> str:
        return f"--- edge log ---\n{self.edge.log_text()[-4000:]}"


@pytest.fixture(scope="module")
def browser_stack(tmp_path_factory: pytest.TempPathFactory, challtestsrv: ChallTestSrv,
                  pebble_factory_module: Any) -> Iterator[BrowserStack]:
    missing = missing_binaries()
    if missing:  # never a skip: `make test` installs them
        pytest.fail(f"{', '.join(missing)} not found: {INSTALL_HINT}", pytrace=False)
    # The browser must reach the custom domain on the default ports, so the edge gets
    # 80 and 443 of an address nobody else uses; the page lives on another address.
    edge_ip = free_loopback_address(ports=(80, 443))
    page_ip = free_loopback_address(exclude=[edge_ip])
    state = tmp_path_factory.mktemp("browser-edge")
    tracker = (FIXTURES / "tracker.js").read_text()
    challtestsrv.add_a(CUSTOM, [edge_ip])  # Pebble's HTTP-01 check goes to edge_ip:80
    try:
        with ScriptOrigin(script=tracker) as origin, RecordingRelay() as relay, \
                CustomerSite(page_ip, f"https://{CUSTOM}{SCRIPT_PATH}") as site:
            relay.pixel = True  # a pixel endpoint answers image beacons with a GIF
            config = EdgeConfig(
                state_dir=state, acme_directory="", acme_ca_bundle="",
                script_url=origin.script_url, relay_url=f"{relay.url}{RELAY_BASE}",
                http_port=80, https_port=443,
                extra={
                    "listen": {"http": f"{edge_ip}:80", "https": f"{edge_ip}:443"},
                    "upstream": {"rewrite": {VENDOR_COLLECTOR: "https://{host}{api_path}"},
                                 "connect_timeout": 1.0, "timeout": 2.0},
                    "proxy": {"cert_refresh_interval": 0.2},
                    # Fast retries: the replay is seen within a second of the relay's return.
                    "spool": {"backoff_base": 0.05, "backoff_cap": 0.5, "poll_interval": 0.1},
                    # No probe rounds: the relay sees the browser's events only.
                    "monitor": {"interval": 0.0},
                },
            )
            pebble = pebble_factory_module(80)
            config.acme_directory = pebble.directory_url
            config.acme_ca_bundle = str(pebble.ca_bundle_path)
            with EdgeProcess(config) as edge:
                with edge.admin() as admin:
                    created = admin.post("/v1/domains", json={"hostname": CUSTOM})
                    assert created.status_code == 201, created.text
                edge.wait_status(CUSTOM, "active", timeout=90)
                yield BrowserStack(edge, relay, site, edge_ip, page_ip, [pebble.root_pem()])
    finally:
        challtestsrv.clear_a(CUSTOM)


def _unrelated_root() -> bytes:
    """A self-signed CA certificate that has never signed anything the edge serves."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unrelated test root")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _acknowledged(report: dict[str, Any]) -> list[str]:
    """The shapes the browser saw acknowledged (loaded, queued, or answered 2xx)."""
    return [name for name in (_shape_of(o) for o in report["outcomes"] if o.get("ok")) if name is not None]


def visit(stack: BrowserStack, run: str, until: Callable[[dict[str, Any]], bool],
          roots: list[bytes] | None = None) -> dict[str, Any]:
    """One headless Chromium on the customer's page; its report once ``until(report)`` holds.

    The browser stays open until then: sendBeacon only queues its request, so closing
    the browser right after the page reports could cancel a beacon still in flight.
    ``roots``: what the browser trusts (default: Pebble's root).
    """
    url = f"{stack.page_origin}{PAGE_PATH}?run={run}"
    with HeadlessChromium(url, roots=stack.roots if roots is None else roots,
                          hosts={CUSTOM: stack.edge_ip, PAGE_HOST: stack.page_ip}) as browser:
        if not _wait(lambda: stack.site.report(run) is not None or not browser.alive(), PAGE_TIMEOUT):
            pytest.fail(f"the page did not report within {PAGE_TIMEOUT:.0f}s\n{browser.log_tail()}\n"
                        f"{stack.diagnostics()}")
        report = stack.site.report(run)
        if report is None:
            pytest.fail(f"chromium exited before the page reported\n{browser.log_tail()}")
        _wait(lambda: until(report), ARRIVAL_TIMEOUT)  # the tests say what did not happen
    return report


@dataclass(frozen=True)
class Visit:
    run: str
    report: dict[str, Any]
    spooled: int = 0  # spool depth once the page had its answers (relay down)


@pytest.fixture(scope="module")
def relay_up(browser_stack: BrowserStack) -> Visit:
    run = f"up-{uuid.uuid4().hex[:12]}"
    relay = browser_stack.relay

    def arrived(report: dict[str, Any]) -> bool:
        return all(_records(relay, run, SHAPES[name]) for name in _acknowledged(report))

    return Visit(run, visit(browser_stack, run, arrived))


@pytest.fixture(scope="module")
def relay_down(browser_stack: BrowserStack) -> Iterator[Visit]:
    run = f"down-{uuid.uuid4().hex[:12]}"
    stack = browser_stack
    assert _wait(lambda: stack.spool_depth() == 0, ARRIVAL_TIMEOUT), "the spool did not drain before the outage"
    stack.relay.down = True  # reads each request and drops the connection, recording nothing
    try:
        # Everything the browser saw acknowledged must be in the spool before the relay
        # comes back, or a late sendBeacon could reach the live relay and prove nothing.
        report = visit(stack, run, lambda report: stack.spool_depth() >= len(_acknowledged(report)))
        spooled = stack.spool_depth()
    finally:
        stack.relay.down = False
    yield Visit(run, report, spooled)


# ---------------------------------------------------------------------------------------
# Assertions shared by both visits.
# ---------------------------------------------------------------------------------------


def _outcome(visit: Visit, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [o for o in visit.report["outcomes"] if _shape_of(o) == name]
    assert len(found) == 1, f"the page saw {len(found)} {name} events from the tracker, not 1: {visit.report}"
    return found[0]


def assert_acknowledged(visit: Visit, name: str) -> None:
    """What the visitor's browser saw: the event went to the custom domain and was accepted."""
    shape = SHAPES[name]
    outcome = _outcome(visit, name)
    assert str(outcome["url"]).startswith(f"https://{CUSTOM}{API_PATH}/"), outcome  # the rewrite took effect
    if shape.kind == "image":
        assert outcome["ok"] is True, f"the image beacon did not load (onerror): {outcome}"
        assert (outcome["width"], outcome["height"]) == (1, 1), outcome
    elif shape.kind == "beacon":
        assert outcome["ok"] is True, f"sendBeacon returned false: {outcome}"
    else:
        assert 200 <= int(outcome["status"]) < 300, f"{name}: fetch saw {outcome}"


def assert_forwarded(stack: BrowserStack, request: RecordedRequest, name: str, run: str) -> None:
    """What the relay got: the browser's event unchanged, plus the edge's forwarding headers."""
    shape = SHAPES[name]
    assert request.method == shape.method, request
    assert request.path == shape.relay_target(run), request.path
    if shape.method == "POST":
        assert json.loads(request.body) == shape.body(run), request.body
        assert request.headers.get("content-type") == shape.content_type, request.headers
        assert request.headers.get("origin") == stack.page_origin, request.headers  # a CORS POST names its page
    else:
        assert request.body == b"", request.body
    headers = request.headers
    assert headers.get("x-forwarded-host") == CUSTOM, headers
    assert headers.get("x-forwarded-proto") == "https", headers
    assert ipaddress.ip_address(headers.get("x-forwarded-for", "")).is_loopback, headers  # the browser's address
    assert re.fullmatch(r"[0-9a-f]{32}", headers.get("idempotency-key", "")), headers
    assert "Chrome" in headers.get("user-agent", ""), headers  # the visitor's browser, not the edge's client
    assert "cookie" not in headers and "authorization" not in headers, headers
    assert "host" in headers and headers["host"] != CUSTOM, headers  # the relay's own name, not the customer's


# ---------------------------------------------------------------------------------------
# The tests.
# ---------------------------------------------------------------------------------------


def test_the_page_loads_the_tracker_from_the_custom_domain(relay_up: Visit) -> None:
    report = relay_up.report
    assert report["errors"] == [], report
    assert report["reason"] == "settled", f"not every event settled within 30 s: {report}"
    assert {_shape_of(o) for o in report["outcomes"]} == set(SHAPES), report


def test_the_browser_refuses_the_edge_without_pebbles_root(browser_stack: BrowserStack) -> None:
    """The harness proves nothing unless certificates are really checked: trusting an
    unrelated CA instead of Pebble's, the tracker script must not load."""
    report = visit(browser_stack, f"untrusted-{uuid.uuid4().hex[:12]}", lambda report: True,
                   roots=[_unrelated_root()])
    assert report["reason"] == "script-error", report
    assert report["outcomes"] == [], report


@pytest.mark.parametrize("name", SHAPES)
def test_relay_up_each_event_reaches_the_relay_once(browser_stack: BrowserStack, relay_up: Visit, name: str) -> None:
    assert_acknowledged(relay_up, name)
    records = _records(browser_stack.relay, relay_up.run, SHAPES[name])
    assert len(records) == 1, f"{name}: the relay got {len(records)} requests: {records}"
    assert_forwarded(browser_stack, records[0], name, relay_up.run)
    if name == "json-preflight":  # the edge answers the preflight itself; the relay never sees OPTIONS
        assert not [r for r in browser_stack.relay.snapshot() if r.method == "OPTIONS"]


def test_relay_up_every_event_has_its_own_idempotency_key(browser_stack: BrowserStack, relay_up: Visit) -> None:
    keys = [r.headers.get("idempotency-key") for r in browser_stack.relay.snapshot() if _belongs_to(r, relay_up.run)]
    assert len(keys) == len(set(keys)), keys


def test_relay_down_every_acknowledged_event_was_spooled(relay_down: Visit) -> None:
    acknowledged = _acknowledged(relay_down.report)
    assert relay_down.spooled >= len(acknowledged) > 0, (relay_down.spooled, relay_down.report)


@pytest.mark.parametrize("name", SHAPES)
def test_relay_down_each_event_is_acknowledged_then_replayed(browser_stack: BrowserStack, relay_down: Visit,
                                                            name: str) -> None:
    assert_acknowledged(relay_down, name)
    shape = SHAPES[name]
    relay = browser_stack.relay
    assert _wait(lambda: bool(_records(relay, relay_down.run, shape)), ARRIVAL_TIMEOUT), (
        f"{name}: acknowledged while the relay was down but not replayed within {ARRIVAL_TIMEOUT:.0f}s "
        f"(spool depth {browser_stack.spool_depth()})\n{browser_stack.diagnostics()}")
    records = _records(relay, relay_down.run, shape)
    # At least once; a duplicate (a replay whose answer was lost) carries the same key.
    assert len({r.headers.get("idempotency-key") for r in records}) == 1, records
    assert_forwarded(browser_stack, records[0], name, relay_down.run)
