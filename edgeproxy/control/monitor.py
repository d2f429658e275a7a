"""Acceptance probes and alert delivery: know within minutes when a custom domain stops working.

Owns: the probe a real client would make against one custom domain (resolve or
``--connect``, TLS with hostname verification, days left on the certificate,
GET the script, POST a probe event), the alert conditions derived from probe
results and edge state, the alert state machine (dedup, resend interval,
resolve), and the sinks that carry alerts out (JSON webhook, Telegram Bot API,
PagerDuty Events v2, SMTP). ``MonitorService`` is the loop inside ``serve``;
``edgeproxy check`` and ``edgeproxy alert test`` call the same pieces.
Must not import: ``acme``, storage backends, ``proxy``, ``hypercorn``. Domains
come from the ``Storage`` protocol; spool and relay figures come through small
callables (``SpoolStats``, ``Relay4xxTotal``), so this module knows nothing of
how they are measured.

Pure parts (``conditions``, ``AlertState.evaluate``, ``increase_over``) take
``now`` (house rule 2). A sink that fails is retried and logged; nothing in
this module raises into the edge ("never takes the edge down").
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import smtplib
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol

import httpx

from ..config import RoutesSettings, Settings, parse_hostport
from ..rules.routes import SiteRoutes, configured_routes, route_table, site_routes
from ..edge.scripts import Rewriter, script_rules
from ..storage.base import DomainRecord, FiringAlert, ProbeRecord, Storage

__all__ = [
    "Alert",
    "AlertDispatcher",
    "AlertSink",
    "AlertState",
    "Condition",
    "MonitorService",
    "PagerDutySink",
    "ProbeResult",
    "Prober",
    "Relay4xxTotal",
    "SmtpSink",
    "SpoolStats",
    "Step",
    "TelegramSink",
    "WebhookSink",
    "build_sinks",
    "conditions",
    "increase_over",
    "probe_hosts",
    "probe_rate",
    "probe_port",
    "build_test_alert",
    "MIN_PROBE_RATE",
    "PROBE_HEADER",
    "PROBED_STATUSES",
]

log = logging.getLogger("edgeproxy.monitor")

PROBE_HEADER = "X-Edgeproxy-Probe"  # the relay may discard events carrying it
PROBED_STATUSES = ("active", "renewing")  # domains that serve a certificate and are checked by the loop
_GET_EACH_MAX = 1000  # more failing domains than this: one list_domains() scan, not a get_domain() each

SpoolStats = Callable[[], tuple[int, float] | None]
"""(depth, age in seconds of the oldest entry) of the durable spool; None while there is no spool."""

Relay4xxTotal = Callable[[], float]
"""Monotonic count of relay 4xx answers, all workers together (from the metrics)."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(value: dt.datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------


# slots: the monitor keeps one ProbeResult per domain, 100,000 at scale;
# without a __dict__ per object a result with its steps takes ~550 bytes, not ~760.
@dataclass(frozen=True, slots=True)
class Step:
    """One check of a probe: ``dns``, ``tls``, ``script`` or ``event``."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class ProbeResult:
    hostname: str
    ok: bool
    steps: tuple[Step, ...]
    checked_at: dt.datetime
    duration: float  # seconds
    days_left: float | None = None  # on the certificate the edge served, when the handshake succeeded
    address: str | None = None

    @property
    def failure(self) -> str | None:
        """``step: detail`` of the first failed step, or None."""
        for step in self.steps:
            if not step.ok:
                return f"{step.name}: {step.detail}"
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "ok": self.ok,
            "checked_at": _iso(self.checked_at),
            "duration": round(self.duration, 3),
            "days_left": None if self.days_left is None else round(self.days_left, 2),
            "address": self.address,
            "error": self.failure,
            "steps": [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in self.steps],
        }

    def line(self) -> str:
        """The one line ``edgeproxy check`` prints for this domain."""
        if self.ok:
            details = "  ".join(f"{s.name} {s.detail}" for s in self.steps)
            return f"ok    {self.hostname}  {details}  ({self.duration:.2f}s)"
        return f"FAIL  {self.hostname}  {self.failure}  ({self.duration:.2f}s)"


def probe_port(settings: Settings) -> int:
    """The HTTPS port probes connect to: ``monitor.port``, else the port of ``listen.https``."""
    if settings.monitor.port:
        return settings.monitor.port
    return parse_hostport(settings.listen.https, what="listen.https")[1]


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


MIN_PROBE_RATE = 50.0
"""Probes started per second at the least when a round is paced: 10 domains all start within
0.2 s; from ``50 * interval * spread`` domains up (7,500 by default) the spread rules."""


def probe_rate(count: int, interval: float, spread: float) -> float | None:
    """Probe starts per second so that ``count`` starts span ``interval * spread`` seconds,
    never fewer than ``MIN_PROBE_RATE``; None (no pacing) without a window or without hosts.

    A round then starts its probes over ``min(interval * spread, count / MIN_PROBE_RATE)``
    seconds instead of all at once at our own listener.
    """
    window = interval * spread
    if count <= 0 or window <= 0:
        return None
    return max(count / window, MIN_PROBE_RATE)


async def probe_hosts(
    probe: Callable[[str], Awaitable[ProbeResult]],
    hostnames: Sequence[str],
    *,
    concurrency: int,
    rate: float | None = None,
) -> list[ProbeResult]:
    """``probe`` every host with ``concurrency`` workers; results in the order of ``hostnames``.

    One task per host behind a semaphore was 100,000 tasks (100+ MB, a CPU burst
    at start-up) at 100,000 domains. Here the workers take hosts from one shared iterator,
    so what is in flight is O(concurrency); only the small results grow with the list.
    With ``rate``, the i-th probe starts no earlier than ``i / rate`` seconds after the
    first: a fixed schedule, so slow probes delay the round only when the workers are the
    limit. If a probe raises, the other workers are cancelled and the error propagates.
    """
    results: list[ProbeResult | None] = [None] * len(hostnames)
    # Shared by every worker: next() runs between awaits, so each host goes to one worker.
    pending = iter(enumerate(hostnames))
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def worker() -> None:
        for index, host in pending:
            if rate is not None:
                delay = start + index / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            results[index] = await probe(host)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(max(1, concurrency), len(hostnames)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()  # a no-op for the finished ones; stops the rest if one failed
    return [r for r in results if r is not None]  # every slot is filled once gather returns


class Prober:
    """Checks custom domains the way a browser reaches them.

    Concurrency: ``probe`` may run concurrently for many hosts; each probe uses
    its own connections (a probe must see what a new visitor sees, not a pooled
    connection from a minute ago).
    """

    def __init__(
        self,
        *,
        script_path: str,
        api_path: str,
        port: int,
        ca_bundle: str = "",
        timeout: float = 10.0,
        connect: str = "",
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.script_path = script_path
        self.api_path = api_path.rstrip("/")
        self.routes: RoutesSettings | None = None  # set by from_settings: the route table, per-domain paths
        # What the script step checks (from_settings): every configured rewrite took effect.
        self.rewriter: Rewriter | None = None
        self.relay_origin = ""
        self.has_event_route = True
        self.port = port
        self.timeout = timeout
        self.connect = connect
        self.clock = clock
        # System roots, or only the configured bundle (Pebble's root in tests): a
        # probe that trusted anything would not notice a wrong certificate.
        self.context = ssl.create_default_context(cafile=ca_bundle or None)

    @classmethod
    def from_settings(cls, settings: Settings, *, connect: str | None = None, port: int | None = None) -> "Prober":
        prober = cls(
            script_path=settings.routes.script_path,
            api_path=settings.routes.api_path,
            port=port or probe_port(settings),
            ca_bundle=settings.monitor.ca_bundle,
            timeout=settings.monitor.timeout,
            connect=settings.monitor.connect if connect is None else connect,
        )
        prober.routes = settings.routes
        first = next((r for r in configured_routes(settings.routes) if r.kind == "script"), None)
        if first is not None:
            prober.rewriter = Rewriter(script_rules(first, settings.upstream, first=True))
            prober.relay_origin = settings.upstream.relay.rstrip("/")
        prober.has_event_route = any(r.kind == "event" for r in configured_routes(settings.routes))
        return prober

    def paths(self, hostname: str) -> SiteRoutes:
        """The first script route's and the first event route's path on this domain."""
        if self.routes is not None:
            return site_routes(hostname, self.routes)
        return SiteRoutes(self.script_path, self.api_path)

    async def probe(self, hostname: str) -> ProbeResult:
        """Run every check for ``hostname``; never raises for network trouble."""
        started = time.monotonic()
        checked_at = self.clock()
        steps: list[Step] = []
        days_left: float | None = None

        def done(address: str | None) -> ProbeResult:
            return ProbeResult(hostname, all(s.ok for s in steps), tuple(steps), checked_at,
                               time.monotonic() - started, days_left, address)

        # 1. where the name leads
        address = self.connect
        if address:
            steps.append(Step("dns", True, f"--connect {address}"))
        else:
            try:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(hostname, self.port, type=socket.SOCK_STREAM),
                    self.timeout)
                address = str(infos[0][4][0])
                steps.append(Step("dns", True, address))
            except (OSError, TimeoutError) as exc:
                steps.append(Step("dns", False, f"cannot resolve: {exc}"))
                return done(None)

        # 2. TLS handshake, hostname verified, days left
        try:
            days_left = await self._handshake(hostname, address, checked_at)
            steps.append(Step("tls", True, f"{days_left:.1f}d left"))
        except ssl.SSLCertVerificationError as exc:
            steps.append(Step("tls", False, f"certificate rejected: {exc.verify_message or exc}"))
            return done(address)
        except (OSError, TimeoutError, ValueError) as exc:
            steps.append(Step("tls", False, f"handshake failed: {type(exc).__name__}: {exc}"))
            return done(address)

        # 3 and 4. the script and one probe event over the same verified TLS
        base = f"https://{_url_host(address)}:{self.port}"
        ext = {"sni_hostname": hostname}
        async with httpx.AsyncClient(verify=self.context, trust_env=False, timeout=self.timeout,
                                     follow_redirects=False) as client:
            try:
                response = await client.get(base + self.paths(hostname).script_path, headers={"Host": hostname},
                                            extensions=ext)
                steps.append(self._script_step(hostname, response))
            except httpx.HTTPError as exc:
                steps.append(Step("script", False, f"{type(exc).__name__}: {exc}"))
            if not self.has_event_route:
                return done(address)
            # POST: every event route takes it (and GET beacons); the probe header keeps
            # it out of the spool, so a relay outage fails the probe instead of hiding.
            body = json.dumps({"type": "edgeproxy-probe", "ts": _iso(checked_at)}).encode()
            try:
                response = await client.post(
                    base + self.paths(hostname).api_path, content=body, extensions=ext,
                    headers={"Host": hostname, PROBE_HEADER: "1", "Content-Type": "application/json"})
                if 200 <= response.status_code < 300:
                    steps.append(Step("event", True, str(response.status_code)))
                else:
                    steps.append(Step("event", False, f"relay answered {response.status_code} (expected 2xx)"))
            except httpx.HTTPError as exc:
                steps.append(Step("event", False, f"{type(exc).__name__}: {exc}"))
        return done(address)

    async def _handshake(self, hostname: str, address: str, now: dt.datetime) -> float:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address, self.port, ssl=self.context, server_hostname=hostname,
                                    ssl_handshake_timeout=self.timeout),
            self.timeout)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            cert = ssl_object.getpeercert() if ssl_object is not None else None
            if not cert or "notAfter" not in cert:
                raise ValueError("no peer certificate")
            not_after = ssl.cert_time_to_seconds(str(cert["notAfter"]))
        finally:
            writer.close()
        return (not_after - now.timestamp()) / 86400.0

    def _script_step(self, hostname: str, response: httpx.Response) -> Step:
        if response.status_code != 200:
            return Step("script", False, f"status {response.status_code} (expected 200)")
        content_type = response.headers.get("content-type", "")
        if "javascript" not in content_type.lower():
            return Step("script", False, f"content type {content_type!r} (expected JavaScript)")
        if self.rewriter is None:  # built without settings: the default rewrite only
            api_path = self.paths(hostname).api_path
            if f"https://{hostname}{api_path}" not in response.text:
                return Step("script", False, f"not rewritten: no https://{hostname}{api_path} in the script")
            return Step("script", True, "200 rewritten")
        return self._rewrites_step(hostname, response.content)

    def _rewrites_step(self, hostname: str, body: bytes) -> Step:
        """Every configured rewrite took effect for this host: no rule's search string is
        left and its replacement is there. The relay-origin rule is added to every
        script; a script that never named the relay needs no rewrite for it."""
        assert self.rewriter is not None and self.routes is not None
        resolved = self.rewriter.resolved(hostname, route_table(hostname, self.routes))
        applied = 0
        for search, replacement in resolved.items():
            if search in body:
                return Step("script", False, f"not rewritten: {search.decode(errors='replace')!r} is still "
                                             "in the script")
            if replacement in body:
                applied += 1
            elif search.decode(errors="replace") != self.relay_origin:
                return Step("script", False, f"not rewritten: no {replacement.decode(errors='replace')!r} "
                                             "in the script")
        if not applied:
            return Step("script", True, "200, nothing to rewrite")
        return Step("script", True, f"200 rewritten ({applied} rule{'s' if applied > 1 else ''})")


# ---------------------------------------------------------------------------------------
# Alert conditions and the state machine (pure)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """Something that may be wrong right now. ``key`` identifies it across rounds (dedup)."""

    key: str
    kind: str  # probe_failing | cert_expiring | domain_stuck | spool_depth | spool_age | relay_4xx_burst | test
    firing: bool
    severity: str  # critical | warning | info
    summary: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Alert:
    """One message to the sinks: ``action`` is ``trigger`` (new or resent) or ``resolve``."""

    key: str
    kind: str
    action: str
    severity: str
    summary: str
    details: Mapping[str, Any]
    at: dt.datetime
    resent: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "source": "edgeproxy",
            "node": socket.gethostname(),
            "key": self.key,
            "kind": self.kind,
            "action": self.action,
            "severity": self.severity,
            "summary": self.summary,
            "details": dict(self.details),
            "at": _iso(self.at),
            "resent": self.resent,
        }

    def text(self) -> str:
        head = "RESOLVED" if self.action == "resolve" else self.severity.upper()
        return f"[edgeproxy {head}] {self.summary}"


def increase_over(samples: Sequence[tuple[float, float]], now: float, window: float) -> float:
    """How much a monotonic counter grew within ``window`` seconds before ``now``.

    ``samples`` are (time, value), oldest first. The baseline is the newest
    sample at or before ``now - window`` (or the oldest one we have); a counter
    that went down (a restarted worker) counts from zero.
    """
    if not samples:
        return 0.0
    start = now - window
    baseline = samples[0]
    for sample in samples:
        if sample[0] <= start:
            baseline = sample
        else:
            break
    latest = samples[-1][1]
    return latest if latest < baseline[1] else latest - baseline[1]


def conditions(
    *,
    results: Iterable[ProbeResult],
    domains: Iterable[DomainRecord],
    failing_since: Mapping[str, dt.datetime],
    now: dt.datetime,
    consecutive_failures: Mapping[str, int] | None = None,
    settings: Settings,
    spool: tuple[int, float] | None = None,
    relay_4xx: float | None = None,
    firing: Container[str] | None = None,
    node: str = "",
) -> list[Condition]:
    """Every condition the monitor tracks, firing or not, for one round.

    A probe alert fires after ``monitor.fail_after`` consecutive failures
    (``consecutive_failures``, counting this round; 1 when not given).

    With ``firing`` (the keys ``AlertState`` holds as firing), a per-domain
    condition (probe, certificate, stuck) that is not firing and whose key is not
    in it is left out before its summary and details are built:
    ``AlertState.evaluate`` would do nothing with it (it can only resolve a firing
    alert), so the alerts are the same, and a round at 100,000 domains builds a
    handful of conditions, not ~300,000.

    ``node`` names this node in the keys of the conditions only it can see (its
    spool, its relay counter: ``spool:depth@edge-1``), so nodes sharing a store
    never resolve each other's; per-domain keys are shared, so a domain that
    fails is announced once whichever node saw it first.
    """
    at_node = f"@{node}" if node else ""
    mon = settings.monitor
    out: list[Condition] = []

    def wanted(key: str, is_firing: bool) -> bool:
        return is_firing or firing is None or key in firing

    for result in results:
        host = result.hostname
        failures = (consecutive_failures or {}).get(host, 0 if result.ok else 1)
        key, is_firing = f"probe:{host}", not result.ok and failures >= mon.fail_after
        if wanted(key, is_firing):
            out.append(Condition(
                key, "probe_failing", is_firing, "critical",
                f"{host}: probe failing: {result.failure}" if not result.ok else f"{host}: probe ok",
                {"hostname": host, "check": result.to_json()},
            ))
        if result.days_left is not None:
            key, is_firing = f"cert:{host}", result.days_left < mon.cert_warn_days
            if wanted(key, is_firing):
                out.append(Condition(
                    key, "cert_expiring", is_firing, "warning",
                    f"{host}: certificate expires in {result.days_left:.1f} days",
                    {"hostname": host, "days_left": round(result.days_left, 2)},
                ))
    for domain in domains:
        since = failing_since.get(domain.hostname)
        stuck = domain.status == "failing" and since is not None and (now - since).total_seconds() >= mon.stuck_after
        key = f"stuck:{domain.hostname}"
        if not wanted(key, stuck):
            continue
        out.append(Condition(
            key, "domain_stuck", stuck, "warning",
            f"{domain.hostname}: stuck in failing since {_iso(since) if since else '-'}: "
            f"{domain.error_code or ''} {domain.error_message or ''}".rstrip(),
            {"hostname": domain.hostname, "status": domain.status, "error_code": domain.error_code,
             "error_message": domain.error_message},
        ))
    if spool is not None:
        depth, age = spool
        out.append(Condition(f"spool:depth{at_node}", "spool_depth", bool(mon.spool_max_depth) and depth > mon.spool_max_depth,
                             "critical", f"spool holds {depth} events (threshold {mon.spool_max_depth})",
                             {"depth": depth}))
        out.append(Condition(f"spool:age{at_node}", "spool_age", bool(mon.spool_max_age) and age > mon.spool_max_age,
                             "critical", f"oldest spooled event is {age:.0f}s old (threshold {mon.spool_max_age:.0f}s)",
                             {"age_seconds": age}))
    if relay_4xx is not None and mon.relay_4xx_burst > 0:
        out.append(Condition(
            f"relay:4xx{at_node}", "relay_4xx_burst", relay_4xx >= mon.relay_4xx_burst, "warning",
            f"relay answered 4xx {relay_4xx:.0f} times in {mon.relay_4xx_window:.0f}s "
            f"(threshold {mon.relay_4xx_burst})",
            {"count": relay_4xx, "window_seconds": mon.relay_4xx_window},
        ))
    return out


class AlertState:
    """Which alerts are firing, and what to send when a round's conditions come in.

    - a condition that starts firing: one ``trigger``;
    - still firing: nothing until ``resend_interval`` has passed since the last send
      (then the trigger is sent again, ``resent=True``);
    - stops firing, or disappears (a domain removed): one ``resolve``.
    Pure: ``MonitorService`` loads ``firing`` from the store before each round and
    claims each alert in the store before sending it, so a restart or a second
    node does not announce again what is already firing.
    """

    def __init__(self, resend_interval: float) -> None:
        self.resend_interval = resend_interval
        self.firing: dict[str, tuple[Condition, dt.datetime]] = {}

    def evaluate(self, round_conditions: Iterable[Condition], now: dt.datetime) -> list[Alert]:
        alerts: list[Alert] = []
        seen: set[str] = set()
        for cond in round_conditions:
            seen.add(cond.key)
            previous = self.firing.get(cond.key)
            if cond.firing:
                if previous is None:
                    alerts.append(Alert(cond.key, cond.kind, "trigger", cond.severity, cond.summary, cond.details, now))
                    self.firing[cond.key] = (cond, now)
                elif (now - previous[1]).total_seconds() >= self.resend_interval:
                    alerts.append(Alert(cond.key, cond.kind, "trigger", cond.severity, cond.summary, cond.details,
                                        now, resent=True))
                    self.firing[cond.key] = (cond, now)
            elif previous is not None:
                alerts.append(Alert(cond.key, cond.kind, "resolve", cond.severity, cond.summary, cond.details, now))
                del self.firing[cond.key]
        for key in [k for k in self.firing if k not in seen]:
            cond, _ = self.firing.pop(key)
            alerts.append(Alert(key, cond.kind, "resolve", cond.severity, f"{cond.summary} (no longer checked)",
                                cond.details, now))
        return alerts


def build_test_alert(now: dt.datetime) -> Alert:
    """What ``edgeproxy alert test`` sends to every sink."""
    return Alert(f"test:{socket.gethostname()}", "test", "trigger", "info",
                 f"test alert from edgeproxy on {socket.gethostname()}: this sink works", {}, now)




# ---------------------------------------------------------------------------------------
# Sinks
# ---------------------------------------------------------------------------------------


class AlertSink(Protocol):
    """Delivers one alert or raises (any exception): the dispatcher retries and logs."""

    name: str

    async def send(self, alert: Alert, client: httpx.AsyncClient) -> None: ...


def _read_secret(path: str, what: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise RuntimeError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    if not value:
        raise RuntimeError(f"{what}: {path} is empty")
    return value


def _expect(response: httpx.Response, ok: Callable[[httpx.Response], bool], what: str) -> None:
    if not ok(response):
        raise RuntimeError(f"{what} answered {response.status_code}: {response.text[:200]}")


@dataclass
class WebhookSink:
    """POSTs ``Alert.to_json()``; any 2xx is success."""

    url: str
    name: str = "webhook"

    async def send(self, alert: Alert, client: httpx.AsyncClient) -> None:
        response = await client.post(self.url, json=alert.to_json())
        _expect(response, lambda r: r.is_success, "webhook")


@dataclass
class TelegramSink:
    """Telegram Bot API ``sendMessage``; the token is read from a file at each send (rotation)."""

    chat_id: str
    token_file: str
    api: str = "https://api.telegram.org"
    name: str = "telegram"

    async def send(self, alert: Alert, client: httpx.AsyncClient) -> None:
        token = _read_secret(self.token_file, "alerts.telegram_token_file")
        text = alert.text()
        if alert.action == "trigger" and alert.details.get("hostname"):
            text += f"\nkey: {alert.key}"
        response = await client.post(f"{self.api.rstrip('/')}/bot{token}/sendMessage",
                                     json={"chat_id": self.chat_id, "text": text[:4096],
                                           "disable_web_page_preview": True})
        # The Bot API answers {"ok": true, "result": ...} on success.
        _expect(response, lambda r: r.is_success and r.json().get("ok") is True, "telegram")


@dataclass
class PagerDutySink:
    """PagerDuty Events API v2: ``trigger``/``resolve`` with ``dedup_key`` = the alert key."""

    routing_key_file: str
    url: str = "https://events.pagerduty.com/v2/enqueue"
    name: str = "pagerduty"

    async def send(self, alert: Alert, client: httpx.AsyncClient) -> None:
        routing_key = _read_secret(self.routing_key_file, "alerts.pagerduty_routing_key_file")
        await self._event(client, routing_key, alert, alert.action)
        if alert.kind == "test":
            # A test must not leave an open incident behind.
            await self._event(client, routing_key, alert, "resolve")

    async def _event(self, client: httpx.AsyncClient, routing_key: str, alert: Alert, action: str) -> None:
        body: dict[str, Any] = {"routing_key": routing_key, "event_action": action, "dedup_key": alert.key}
        if action == "trigger":
            body["payload"] = {
                "summary": alert.summary[:1024],
                "source": socket.gethostname(),
                "severity": alert.severity if alert.severity in ("critical", "error", "warning", "info") else "error",
                "timestamp": _iso(alert.at),
                "component": "edgeproxy",
                "group": alert.kind,
                "custom_details": dict(alert.details),
            }
        response = await client.post(self.url, json=body)
        _expect(response, lambda r: r.status_code == 202, "pagerduty")


@dataclass
class SmtpSink:
    """E-mail over SMTP (``smtplib`` in a thread: it blocks)."""

    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    starttls: bool = False
    username: str = ""
    password_file: str = ""
    timeout: float = 10.0
    name: str = "smtp"

    async def send(self, alert: Alert, client: httpx.AsyncClient) -> None:
        await asyncio.to_thread(self._send_blocking, alert)

    def message(self, alert: Alert) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = alert.text()
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg.set_content(f"{alert.summary}\n\n{json.dumps(alert.to_json(), indent=2, sort_keys=True)}\n")
        return msg

    def _send_blocking(self, alert: Alert) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.username:
                smtp.login(self.username, _read_secret(self.password_file, "alerts.smtp_password_file"))
            smtp.send_message(self.message(alert))


def build_sinks(settings: Settings) -> list[AlertSink]:
    """Every sink the configuration names (a sink with no destination is off)."""
    cfg = settings.alerts
    sinks: list[AlertSink] = []
    if cfg.webhook_url:
        sinks.append(WebhookSink(cfg.webhook_url))
    if cfg.telegram_chat_id and cfg.telegram_token_file:
        sinks.append(TelegramSink(cfg.telegram_chat_id, cfg.telegram_token_file, cfg.telegram_api))
    if cfg.pagerduty_routing_key_file:
        sinks.append(PagerDutySink(cfg.pagerduty_routing_key_file, cfg.pagerduty_url))
    if cfg.smtp_host and cfg.smtp_to:
        sinks.append(SmtpSink(cfg.smtp_host, cfg.smtp_port, cfg.smtp_from or f"edgeproxy@{socket.gethostname()}",
                              tuple(cfg.smtp_to), cfg.smtp_starttls, cfg.smtp_username, cfg.smtp_password_file,
                              cfg.timeout))
    return sinks


class AlertDispatcher:
    """Sends alerts to every sink concurrently; retries each failing sink with doubling
    delays, logs what finally failed, and never raises."""

    def __init__(
        self,
        sinks: Sequence[AlertSink],
        *,
        retries: int = 3,
        retry_delay: float = 2.0,
        timeout: float = 10.0,
        on_delivery: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.sinks = list(sinks)
        self.retries = max(1, retries)
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.on_delivery = on_delivery

    async def dispatch(self, alerts: Sequence[Alert]) -> dict[str, list[str]]:
        """Deliver ``alerts`` in order; returns sink name -> errors of deliveries that failed."""
        failures: dict[str, list[str]] = {sink.name: [] for sink in self.sinks}
        if not alerts or not self.sinks:
            return failures
        async with httpx.AsyncClient(trust_env=False, timeout=self.timeout, follow_redirects=False) as client:
            for alert in alerts:
                log.info("alert %s %s: %s", alert.action, alert.key, alert.summary)
                errors = await asyncio.gather(*(self._deliver(sink, alert, client) for sink in self.sinks))
                for sink, error in zip(self.sinks, errors):
                    if error is not None:
                        failures[sink.name].append(error)
        return failures

    async def _deliver(self, sink: AlertSink, alert: Alert, client: httpx.AsyncClient) -> str | None:
        delay = self.retry_delay
        error = ""
        for attempt in range(1, self.retries + 1):
            try:
                await asyncio.wait_for(sink.send(alert, client), self.timeout)
                if self.on_delivery is not None:
                    self.on_delivery(sink.name, True)
                return None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any sink failure is retried, logged, and contained
                error = f"{type(exc).__name__}: {exc}"
                log.warning("alert sink %s failed (attempt %d/%d) for %s: %s",
                            sink.name, attempt, self.retries, alert.key, error)
            if attempt < self.retries:
                await asyncio.sleep(delay)
                delay *= 2
        log.error("alert sink %s gave up on %s %s after %d attempts: %s",
                  sink.name, alert.action, alert.key, self.retries, error)
        if self.on_delivery is not None:
            self.on_delivery(sink.name, False)
        return error


# ---------------------------------------------------------------------------------------
# The loop inside `serve`
# ---------------------------------------------------------------------------------------


class MonitorService:
    """Probes every served domain each ``monitor.interval``, keeps ``last_check`` per
    domain, and turns each round's conditions into alerts.

    Runs in the primary process of each node. What it knows outlives it in the
    store (``MonitorLedger``): each domain's last probe, and which alerts are
    firing. Before a round it loads the firing alerts (its own node-local ones
    and every shared one); before sending, it claims each alert in the store,
    which answers exactly one claimant: a restart, or a second node that sees
    the same failing domain, does not page again, and a resolve is sent once.
    Consecutive probe failures are loaded from the store when the service
    starts (a restart keeps counting toward ``monitor.fail_after``); from then
    on each node counts its own rounds. ``last_check(host)`` is read by the admin API from another thread: this
    node's latest round (one dict the loop replaces whole), or before its first
    round the store.
    """

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        prober: Prober,
        dispatcher: AlertDispatcher,
        *,
        spool_stats: SpoolStats | None = None,
        relay_4xx_total: Relay4xxTotal | None = None,
        on_result: Callable[[ProbeResult], None] | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        concurrency: int = 8,
        node: str | None = None,
    ) -> None:
        self.settings = settings
        self.node = node or socket.gethostname()
        self.storage = storage
        self.prober = prober
        self.dispatcher = dispatcher
        self.spool_stats = spool_stats
        self.relay_4xx_total = relay_4xx_total
        self.on_result = on_result
        self.clock = clock
        self.concurrency = concurrency
        self.state = AlertState(settings.alerts.resend_interval)
        self.results: dict[str, ProbeResult] = {}
        self.failing_since: dict[str, dt.datetime] = {}
        self.consecutive_failures: dict[str, int] = {}
        self._resumed = False
        self._probed = False  # a round has filled ``results``
        self._relay_samples: list[tuple[float, float]] = []

    def last_check(self, hostname: str) -> dict[str, Any] | None:
        result = self.results.get(hostname)
        if result is not None:
            return result.to_json()
        if self._probed:
            # This node has run a round: a domain it did not probe is not served. The
            # store is asked only before that, so listing 100,000 domains is not
            # 100,000 queries on every node.
            return None
        record = self.storage.get_probe(hostname)  # after a restart, before this node's first round
        return None if record is None else dict(json.loads(record.result_json))

    def _load_firing(self) -> None:
        """``state.firing`` as the store has it: the shared alerts and this node's own
        (another node's spool or relay alerts are not ours to resolve). Blocking."""
        mine = f"@{self.node}"
        self.state.firing = {
            alert.key: (Condition(alert.key, alert.kind, True, alert.severity, alert.summary,
                                  json.loads(alert.details_json)), alert.last_sent)
            for alert in self.storage.firing_alerts() if "@" not in alert.key or alert.key.endswith(mine)
        }
        if not self._resumed:  # after a restart, a domain failing for a while stays counted
            self.consecutive_failures = self.storage.probe_failures()
            self._resumed = True

    def _claim(self, alerts: Sequence[Alert]) -> list[Alert]:
        """The alerts this node sends: those the store lets it claim. Blocking."""
        resend = self.settings.alerts.resend_interval
        mine: list[Alert] = []
        for alert in alerts:
            if alert.action == "resolve":
                if self.storage.release_alert(alert.key) is not None:
                    mine.append(alert)
                continue
            answer = self.storage.claim_alert(FiringAlert(
                alert.key, alert.kind, alert.severity, alert.summary, json.dumps(dict(alert.details), default=str),
                alert.at, alert.at), resend_after=resend)
            if answer is not None:
                mine.append(dataclasses.replace(alert, resent=answer == "resend"))
        return mine

    def _save_probes(self, results: Sequence[ProbeResult]) -> None:
        self.storage.save_probes([
            ProbeRecord(r.hostname, r.checked_at, r.ok, json.dumps(r.to_json()),
                        self.consecutive_failures.get(r.hostname, 0))
            for r in results])

    async def probe_all(self, hostnames: Sequence[str]) -> list[ProbeResult]:
        """One probe per host, ``concurrency`` at a time, their starts spread over
        ``monitor.spread`` of the interval (``probe_rate``); results in the order of ``hostnames``."""
        mon = self.settings.monitor
        rate = probe_rate(len(hostnames), mon.interval, mon.spread)
        return await probe_hosts(self.prober.probe, hostnames, concurrency=self.concurrency, rate=rate)

    async def run_round(self) -> list[Alert]:
        """One round: probe, derive conditions, send what changed. Returns the alerts sent."""
        # (hostname, status) pairs, not whole records: 100,000 DomainRecords were ~60 MB
        # built and freed twice a round, and the freed memory stayed fragmented
        # around the hostnames kept for the probes.
        statuses = await asyncio.to_thread(self.storage.domain_statuses)
        await asyncio.to_thread(self._load_firing)
        now = self.clock()
        failing_now: set[str] = set()
        for host, status in statuses:
            if status == "failing":
                failing_now.add(host)
                self.failing_since.setdefault(host, now)
        # No longer failing, or removed: the stuck clock stops.
        for host in [h for h in self.failing_since if h not in failing_now]:
            del self.failing_since[host]
        hosts = [host for host, status in statuses if status in PROBED_STATUSES]
        # A paced round lasts minutes: the conditions below read the statuses again, as they are then.
        del statuses
        results = await self.probe_all(hosts)
        fresh = {r.hostname: r for r in results}
        self.consecutive_failures = {
            r.hostname: 0 if r.ok else self.consecutive_failures.get(r.hostname, 0) + 1 for r in results}
        self.results = fresh  # replaced whole: readers in other threads see one round or the other
        self._probed = True
        await asyncio.to_thread(self._save_probes, results)
        if self.on_result is not None:
            for result in results:
                self.on_result(result)
        for result in results:
            if not result.ok:
                log.warning("probe failed for %s: %s", result.hostname, result.failure)
        # Both hooks may read files or a database: off the event loop (house rule 4).
        spool = await asyncio.to_thread(self.spool_stats) if self.spool_stats is not None else None
        relay_4xx: float | None = None
        if self.relay_4xx_total is not None:
            total = await asyncio.to_thread(self.relay_4xx_total)
            mono = time.monotonic()
            self._relay_samples.append((mono, total))
            window = self.settings.monitor.relay_4xx_window
            while len(self._relay_samples) > 2 and self._relay_samples[1][0] <= mono - window:
                self._relay_samples.pop(0)
            relay_4xx = increase_over(self._relay_samples, mono, window)
        domains = await asyncio.to_thread(self._alert_domains)
        # Only what may fire or resolve is built (conditions' ``firing``): the same alerts.
        round_conditions = conditions(results=results, domains=domains, failing_since=self.failing_since,
                                      now=self.clock(), settings=self.settings, spool=spool, relay_4xx=relay_4xx,
                                      consecutive_failures=self.consecutive_failures, firing=self.state.firing,
                                      node=self.node)
        alerts = await asyncio.to_thread(self._claim, self.state.evaluate(round_conditions, self.clock()))
        await self.dispatcher.dispatch(alerts)
        return alerts

    def _alert_domains(self) -> list[DomainRecord]:
        """The records a ``domain_stuck`` condition can fire or resolve for: domains
        now failing, and those whose stuck alert is firing. A record for every domain
        could only add conditions that are not firing and not firing before, which
        ``AlertState.evaluate`` ignores. Blocking: runs in a thread."""
        firing = self.state.firing
        wanted = [host for host, status in self.storage.domain_statuses()
                  if status == "failing" or f"stuck:{host}" in firing]
        if len(wanted) > _GET_EACH_MAX:
            # Thousands failing at once (a DNS outage): one scan beats that many
            # round trips to PostgreSQL.
            chosen = set(wanted)
            return [d for d in self.storage.list_domains() if d.hostname in chosen]
        # None: removed since the statuses were read, like a domain list_domains no longer returns.
        return [d for d in map(self.storage.get_domain, wanted) if d is not None]

    async def run_forever(self, stop: asyncio.Event) -> None:
        interval = self.settings.monitor.interval
        if interval <= 0:
            return
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.run_round()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive a bad round (storage down, a bug)
                log.exception("monitor round failed")
            # `interval` runs from one round's start to the next: a paced round fills
            # `spread` of it instead of adding to it. A round that overran starts
            # the next one at once, still paced and `concurrency` at a time.
            pause = max(0.0, interval - (time.monotonic() - started))
            try:
                await asyncio.wait_for(stop.wait(), timeout=pause)
            except TimeoutError:
                pass
