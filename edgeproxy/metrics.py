"""Prometheus metrics for every process of one edge, served at ``/metrics`` on the admin listener.

Owns: the metric names, the per-run multiprocess directory, the ASGI wrapper that
counts public requests (and gives each a request id), the ``stats`` counter the
proxy increments, the issuer wrapper that counts ACME orders, and the scrape.
Must not import: ``acme``, storage backends, ``proxy``, ``hypercorn``.

Workers are separate processes (``server.py``), so counters live in
prometheus_client's multiprocess mode: each process writes its own mmap file in a
directory made fresh for each ``serve`` run (``enable_multiprocess``), and the
scrape in the primary sums them (``MultiProcessCollector``). A worker that died
and was replaced keeps its counts (its file stays). State that only the primary
knows (domains and certificates, spool depth, probe results) is not stored in
those files: a collector computes it at scrape time (``StateCollector``), so it is
never stale and never double-counted.

prometheus_client reads ``PROMETHEUS_MULTIPROC_DIR`` from the environment itself;
we write it (``config.py`` stays the only module of ours that *reads* the
environment), so that spawned workers inherit it.

Hot path: the wrapper and the counters do in-memory increments only (no I/O),
except the optional access log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import contextvars
import datetime as dt
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections import Counter as _Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .rules.addresses import normalize_ip
from .config import RoutesSettings
from .errors import IssuanceError
from .prometheus_adapter import use_multiprocess_values
from .rules.routes import route_table
from .storage.base import AriState

if TYPE_CHECKING:  # renew pulls in dnspython and tldextract: not needed to count
    from .control.renew import IssuedPair, Issuer

__all__ = [
    "CONTENT_TYPE",
    "Metrics",
    "REQUEST_ID",
    "CountingIssuer",
    "StateCollector",
    "StatsCounter",
    "enable_multiprocess",
    "instrument",
    "make_run_dir",
    "multiprocess_dir",
    "render",
    "sample_total",
    "scrape_registry",
]

access_log = logging.getLogger("edgeproxy.access")

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgeproxy_request_id", default=None)
"""The id of the public request being handled in this task (logs carry it)."""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Relay answers are usually a few ms; a slow relay is what the spool exists for.
_RELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The proxy's stats keys that mean "refused: unknown or mismatched host" (never forwarded).
_REFUSALS = {"http_unknown_host": "http", "https_misdirected": "https"}
_EVENT_REFUSED = "event_refused_"  # + reason: proxy.EdgeProxy counts each refused event call


_RUN_DIR_PREFIX = "edgeproxy-metrics-"


def make_run_dir(base: str | None = None) -> str:
    """A fresh directory for this run's metric files: ``edgeproxy-metrics-<pid>-<random>``
    under ``base`` (the system temp directory by default).

    Directories left by runs whose process is gone (a ``serve`` killed with SIGKILL
    cannot clean up) are removed first, so stale files never pile up.
    """
    root = base or tempfile.gettempdir()
    for entry in os.scandir(root):
        if not entry.is_dir(follow_symlinks=False) or not entry.name.startswith(_RUN_DIR_PREFIX):
            continue
        pid_text = entry.name[len(_RUN_DIR_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            shutil.rmtree(entry.path)
    return tempfile.mkdtemp(prefix=f"{_RUN_DIR_PREFIX}{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, not ours to judge
    return True


def enable_multiprocess(directory: str) -> None:
    """Switch this process (and the workers it spawns later) to multiprocess metrics in
    ``directory``. Call before any ``Metrics`` is created."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    use_multiprocess_values()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The metric objects of one process. ``registry=None`` in multiprocess mode (the
    scrape reads the files); tests pass their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests = Counter(
            "edgeproxy_http_requests", "Public requests by listener, route and status",
            ["listener", "route", "status"], registry=registry)
        self.refused = Counter(
            "edgeproxy_requests_refused", "Requests refused for an unknown or mismatched host (never forwarded)",
            ["listener"], registry=registry)
        self.relay_latency = Histogram(
            "edgeproxy_relay_duration_seconds", "Time for the relay to answer one API call (or fail)",
            buckets=_RELAY_BUCKETS, registry=registry)
        self.relay_responses = Counter(
            "edgeproxy_relay_responses", "Relay answers by status class (error: no answer)",
            ["code_class"], registry=registry)
        self.events = Counter(
            "edgeproxy_proxy_events", "Proxy outcomes (script served, cache, origin errors, ...)",
            ["event"], registry=registry)
        self.event_refusals = Counter(
            "edgeproxy_event_refusals", "Calls an event route refused itself, by reason (all are kept but "
            "what failed_log.refusals_per_domain_hour drops)", ["reason"], registry=registry)
        self.acme_orders = Counter(
            "edgeproxy_acme_orders", "ACME orders by result (issued, or the failure code)",
            ["result"], registry=registry)
        self.probes = Counter(
            "edgeproxy_probes", "Acceptance probe results", ["result"], registry=registry)
        self.alert_deliveries = Counter(
            "edgeproxy_alert_deliveries", "Alert deliveries by sink and result", ["sink", "result"],
            registry=registry)
        self.webhook_attempts = Counter(
            "edgeproxy_webhook_attempts", "Lifecycle webhook delivery attempts by outcome (delivered, retry, "
            "dead: dead-lettered past events.horizon)", ["outcome"], registry=registry)

    def observe_relay(self, status: int, seconds: float, error: str | None) -> None:
        self.relay_latency.observe(seconds)
        self.relay_responses.labels("error" if error is not None else f"{status // 100}xx").inc()

    def observe_delivery(self, sink: str, ok: bool) -> None:
        self.alert_deliveries.labels(sink, "ok" if ok else "failed").inc()

    def observe_webhook(self, state: str) -> None:
        """One lifecycle webhook attempt; ``state`` is the outbox row's new state."""
        self.webhook_attempts.labels({"pending": "retry"}.get(state, state)).inc()


class StatsCounter(_Counter[str]):
    """The proxy's ``stats`` Counter, mirrored into Prometheus counters as it is incremented."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def __setitem__(self, key: str, value: int) -> None:
        delta = value - self.get(key, 0)
        super().__setitem__(key, value)
        if delta > 0:
            self._metrics.events.labels(key).inc(delta)
            listener = _REFUSALS.get(key)
            if listener is not None:
                self._metrics.refused.labels(listener).inc(delta)
            elif key.startswith(_EVENT_REFUSED):
                self._metrics.event_refusals.labels(key[len(_EVENT_REFUSED):]).inc(delta)


class CountingIssuer:
    """Wraps the renewal loop's ``Issuer`` and counts orders (the seam, not renew.py)."""

    def __init__(self, inner: Issuer, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def renewal_info(self, hostname: str, chain_pem: bytes) -> AriState:
        return self.inner.renewal_info(hostname, chain_pem)

    def issue(self, hostname: str, replaces: str | None = None) -> IssuedPair:
        try:
            pair = self.inner.issue(hostname, replaces=replaces)
        except IssuanceError as exc:
            self.metrics.acme_orders.labels(exc.code).inc()
            raise
        self.metrics.acme_orders.labels("issued").inc()
        return pair


def _route(path: str, routes: RoutesSettings, host: str) -> str:
    """The route's name (a bounded label: the configured names), ``challenge`` or ``other``."""
    name = ""
    if routes.randomize:  # each domain has its own paths (routes.py)
        name = (host.lower().rpartition(":")[0] if ":" in host else host.lower()).rstrip(".")
    try:
        route = route_table(name, routes).match(path)
    except UnicodeEncodeError:  # a Host that is no hostname: the proxy refuses it anyway
        route = None
    if route is not None:
        return route.name
    if path.startswith("/.well-known/acme-challenge/"):
        return "challenge"
    return "other"


def instrument(app: ASGIApp, listener: str, metrics: Metrics, routes: RoutesSettings, *, log_access: bool) -> ASGIApp:
    """Count each public request by route and status; give it a request id
    (``X-Request-Id`` on the response, ``REQUEST_ID`` for logs); optional access log."""

    async def call(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = secrets.token_hex(8)
        token = REQUEST_ID.set(request_id)
        status = 0

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            host = (next((v.decode("latin-1") for n, v in scope.get("headers", ()) if n == b"host"), "")
                    if routes.randomize or log_access else "")
            route = _route(scope.get("path", ""), routes, host)
            metrics.requests.labels(listener, route, str(status)).inc()
            if log_access:
                client = scope.get("client")
                access_log.info(
                    "%s %s %s", scope.get("method"), scope.get("path"), status,
                    extra={"listener": listener, "route": route, "status": status, "host": host[:300],
                           "method": scope.get("method"), "path": str(scope.get("path", ""))[:300],
                           "client": normalize_ip(client[0]) if client and isinstance(client[0], str) else None,
                           "duration_ms": round((time.perf_counter() - started) * 1000, 2)},
                )
            REQUEST_ID.reset(token)

    return call


class StateCollector(Collector):
    """Gauges the primary computes at scrape time from what it knows."""

    def __init__(
        self,
        *,
        domain_counts: Callable[[], Mapping[str, int]],
        cert_expiries: Callable[[], Iterable[dt.datetime]],
        spool_stats: Callable[[], tuple[int, float] | None] | None = None,
        failing_probes: Callable[[], int] | None = None,
        outbox_counts: Callable[[], Mapping[str, int]] | None = None,
        warn_days: float = 14.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
    ) -> None:
        self.domain_counts = domain_counts  # status -> domains; a GROUP BY, not every record
        self.cert_expiries = cert_expiries
        self.spool_stats = spool_stats
        self.failing_probes = failing_probes
        self.outbox_counts = outbox_counts  # webhook outbox rows by state; a GROUP BY
        self.warn_days = warn_days
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        domains = GaugeMetricFamily("edgeproxy_domains", "Registered domains by status", labels=["status"])
        counts = self.domain_counts()
        for status in sorted(counts):
            domains.add_metric([status], counts[status])
        yield domains
        expiries = sorted(self.cert_expiries())
        certs = GaugeMetricFamily("edgeproxy_certificates", "Served certificates by state", labels=["state"])
        left = [(e - now).total_seconds() for e in expiries]
        certs.add_metric(["expired"], sum(1 for s in left if s <= 0))
        certs.add_metric(["expiring"], sum(1 for s in left if 0 < s < self.warn_days * 86400))
        certs.add_metric(["valid"], sum(1 for s in left if s >= self.warn_days * 86400))
        yield certs
        if left:
            yield GaugeMetricFamily("edgeproxy_certificate_earliest_expiry_seconds",
                                    "Seconds until the first served certificate expires", value=min(left))
        if self.spool_stats is not None:
            spool = self.spool_stats()
            if spool is not None:
                yield GaugeMetricFamily("edgeproxy_spool_depth", "Events waiting in the spool", value=spool[0])
                yield GaugeMetricFamily("edgeproxy_spool_oldest_age_seconds", "Age of the oldest spooled event",
                                        value=spool[1])
        if self.failing_probes is not None:
            yield GaugeMetricFamily("edgeproxy_probes_failing", "Domains whose last probe failed",
                                    value=self.failing_probes())
        if self.outbox_counts is not None:
            outbox = GaugeMetricFamily("edgeproxy_webhook_outbox", "Lifecycle webhook deliveries in the outbox "
                                       "by state (dead: dead-lettered, see `edgeproxy events list`)",
                                       labels=["state"])
            counts = self.outbox_counts()
            for state in ("pending", "delivered", "dead"):
                outbox.add_metric([state], counts.get(state, 0))
            yield outbox


def scrape_registry(state: Collector | None, local: CollectorRegistry | None = None) -> CollectorRegistry:
    """The registry a scrape renders: every process's counters (multiprocess files, or
    ``local`` outside multiprocess mode) plus the primary's state gauges."""
    registry = CollectorRegistry()
    directory = multiprocess_dir()
    if directory is not None:
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    elif local is not None:
        registry.register(_Forward(local))
    if state is not None:
        registry.register(state)
    return registry


class _Forward(Collector):
    def __init__(self, inner: CollectorRegistry) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        yield from self.inner.collect()


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def sample_total(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
