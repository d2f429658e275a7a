"""Zero data loss between the browser and the queue relay.

Owns the policy around the spool file (``storage/spoolfile.py``: the node-local
SQLite store, its durability and its group commit):
- the forwarding policy, a decorator over the relay client: :class:`SpoolingRelay`
  (relay first; connection error, timeout, 5xx, 408, 429 -> spool, then an
  acknowledgement shaped for the caller (202 JSON for a POST, a 1x1 GIF for an
  image beacon, else 204); other 4xx -> failed-request log; spool full or broken
  -> 503, never an ack);
- the edge's own refusals on ``event`` routes (400, 413, 414, 429, 503):
  :class:`RefusalLog` keeps them in the spool file (node-local, never the shared
  store on the request path), capped per domain and hour in memory; the replayer
  moves them into the failed-request log;
- the replayer that drains the spool in ``serve``'s primary process: :class:`Replayer`;
- the failed-request log policy (IP retention, pruning) and ``edgeproxy replay``:
  :func:`replay_failed`, :func:`prune_failed_log`;
- the numbers a metrics endpoint exports: :func:`spool_metrics`.

Must not import: ``acme``, ``hypercorn``, ``proxy``, storage backends (the
failed-request log goes through the ``FailedRequestLog`` protocol).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from ..rules.addresses import normalize_ip
from ..config import Settings, SpoolSettings
from ..errors import EdgeproxyError, StorageError
from ..rules.ratelimit import TokenBuckets
from .relay import ForwardRequest, ForwardResult, Relay
from ..storage import FailedRequestRecord, sqlite_path_from_url
from ..storage.base import FailedRequestLog
from ..storage.base import SpoolStore
from ..storage.spoolfile import Refusal, Spool, SpoolEntry, SpoolFull, SpoolStats, SpoolUnavailable

__all__ = [
    "AlertHook",
    "DrainResult",
    "Refusal",
    "ReplayFilters",
    "ReplaySummary",
    "Replayer",
    "Spool",
    "SpoolEntry",
    "SpoolFull",
    "SpoolStats",
    "SpoolUnavailable",
    "RefusalLog",
    "SpoolingRelay",
    "acknowledgement",
    "replayable",
    "backoff_delay",
    "classify",
    "failed_record",
    "log_alert",
    "move_refusals",
    "is_probe",
    "parse_time",
    "prune_failed_log",
    "prune_loop",
    "reduce_ip",
    "replay_failed",
    "spool_metrics",
    "spool_path",
    "entry_for",
    "request_for",
]

log = logging.getLogger("edgeproxy.spool")

AlertHook = Callable[[str, str], None]
"""``alert(code, message)``: something an operator must see (spool full, dead letters).
Must not block; called from the event loop or a worker thread."""


DELIVERED: Final = "delivered"
RETRY: Final = "retry"
REFUSED: Final = "refused"


def log_alert(code: str, message: str) -> None:
    """The default alert hook: an ERROR log line with a stable prefix to grep/alert on."""
    log.error("ALERT %s: %s", code, message)


# ---------------------------------------------------------------------------------------
# Pure policy (sans-IO, house rule 2).
# ---------------------------------------------------------------------------------------


def classify(result: ForwardResult) -> str:
    """What to do with a relay answer: ``delivered``, ``retry`` (spool) or ``refused`` (log).

    Retried: no answer at all (connection error, timeout, protocol error), 5xx,
    408 Request Timeout and 429 Too Many Requests (RFC 9110 15.5.9, RFC 6585 4): the
    relay did not take the event but may later. Other 4xx: the relay refused this
    request as it is (e.g. the week-long 401 that started the product): resending it
    unchanged would fail again, so it goes to the failed-request log for ``replay``.
    """
    if result.error is not None:
        return RETRY
    status = result.status
    if status >= 500 or status in (408, 429):
        return RETRY
    if status >= 400:
        return REFUSED
    return DELIVERED


def backoff_delay(attempts: int, base: float, cap: float, rand: float) -> float:
    """Full-jitter exponential backoff: ``rand * min(cap, base * 2**(attempts-1))``, with
    ``rand`` in [0, 1) passed in. Jitter spreads the retries of many nodes so a
    recovering relay is not hit by all of them at the same instant."""
    exp = min(cap, base * float(2 ** max(0, min(attempts - 1, 30))))
    return max(0.0, rand * exp)


def reduce_ip(address: str | None, mode: str) -> str | None:
    """A client address reduced per ``privacy.ip_retention``: ``full`` keeps it,
    ``truncated`` zeroes the host part (IPv4 /24, IPv6 /48), ``none`` drops it.
    Something that is not an IP address is kept only in ``full`` mode."""
    if address is None or mode == "full":
        return address
    if mode == "none":
        return None
    try:
        ip = ipaddress.ip_address(normalize_ip(address.strip()))  # ::ffff:a.b.c.d: a /24, not a /48
    except ValueError:
        return None
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


def _reduce_headers(headers: Sequence[tuple[bytes, bytes]], mode: str) -> tuple[tuple[bytes, bytes], ...]:
    """``X-Forwarded-For`` reduced like the client address (it carries the same IPs)."""
    if mode == "full":
        return tuple(headers)
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            if mode == "none":
                continue
            parts = [reduce_ip(p.strip(), mode) for p in value.decode("latin-1").split(",")]
            value = ", ".join(p for p in parts if p).encode("latin-1")
        out.append((name, value))
    return tuple(out)


def failed_record(request: ForwardRequest, status: int, origin: str, now: datetime,
                  ip_retention: str) -> FailedRequestRecord:
    """The failed-request log row for ``request``, IPs reduced per ``ip_retention``."""
    return FailedRequestRecord(
        idempotency_key=request.idempotency_key,
        domain=request.host,
        method=request.method,
        target=request.target,
        headers=_reduce_headers(request.headers, ip_retention),
        body=request.body,
        client=reduce_ip(request.client, ip_retention),
        status=status,
        origin=origin,
        received_at=datetime.fromtimestamp(request.received_at or now.timestamp(), timezone.utc),
        logged_at=now,
    )


# Statuses the edge answered without keeping the body (nothing to resend).
_BODY_NOT_KEPT: Final = frozenset({404, 413, 414})


def replayable(record: FailedRequestRecord) -> bool:
    """Whether ``edgeproxy replay`` may send ``record``: everything but the edge's own
    refusals whose body was never kept (413 too large, 414 target too long, 404 bad
    path): those are logged so an operator sees who lost what, not resent."""
    return not (record.origin == "edge" and record.status in _BODY_NOT_KEPT)


_RELATIVE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])\Z")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: datetime) -> datetime:
    """``--since``/``--until``: ISO-8601 (``2026-11-01``, ``2026-11-01T12:00:00Z``; naive
    means UTC) or an age relative to ``now`` (``90s``, ``15m``, ``12h``, ``7d``)."""
    value = text.strip()
    match = _RELATIVE_RE.match(value)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise EdgeproxyError(f"cannot read time {text!r}: use ISO-8601 or e.g. 12h, 7d", code="bad_time") from exc
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def spool_path(settings: Settings) -> str:
    """``spool.path``, or ``spool.db`` next to a SQLite ``storage.url`` (one state dir per
    node), or ``/var/lib/edgeproxy/spool.db``."""
    if settings.spool.path:
        return settings.spool.path
    try:
        db = sqlite_path_from_url(settings.storage.url)
    except EdgeproxyError:
        return "/var/lib/edgeproxy/spool.db"
    return os.path.join(os.path.dirname(os.path.abspath(db)), "spool.db")


# ---------------------------------------------------------------------------------------
# The spool file.
# ---------------------------------------------------------------------------------------


def entry_for(request: ForwardRequest) -> SpoolEntry:
    """The spool entry that stores ``request`` (its method, target, headers and key)."""
    return SpoolEntry(request.idempotency_key, request.host, request.target, request.headers,
                      request.body, request.client, request.received_at or time.time(), method=request.method)


def request_for(entry: SpoolEntry) -> ForwardRequest:
    """The request a spool entry sends again, the same ``Idempotency-Key`` included."""
    return ForwardRequest(target=entry.target, headers=entry.headers, body=entry.body, host=entry.domain,
                          idempotency_key=entry.idempotency_key, client=entry.client,
                          received_at=entry.received_at, method=entry.method)


def spool_metrics(spool: SpoolStore, now: float) -> dict[str, float]:
    """Gauges a metrics endpoint can export (blocking: call it in a thread)."""
    stats = spool.stats(now)
    return {
        "edgeproxy_spool_depth": float(stats.depth),
        "edgeproxy_spool_bytes": float(stats.bytes),
        "edgeproxy_spool_max_bytes": float(stats.max_bytes),
        "edgeproxy_spool_oldest_age_seconds": stats.oldest_age_seconds,
        "edgeproxy_spool_dead_letters": float(stats.dead_letters),
    }


# ---------------------------------------------------------------------------------------
# The forwarding policy (runs in every worker).
# ---------------------------------------------------------------------------------------

_JSON: Final = ((b"content-type", b"application/json"),)
_ACCEPTED: Final = ForwardResult(202, _JSON, b'{"queued":true}\n')
# The smallest transparent GIF (1x1, 43 bytes): what an <img> beacon must get to fire onload.
_PIXEL: Final = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00\x00"
                 b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
_PIXEL_ACK: Final = ForwardResult(200, ((b"content-type", b"image/gif"), (b"cache-control", b"no-store")), _PIXEL)
_EMPTY_ACK: Final = ForwardResult(204, ((b"cache-control", b"no-store"),), b"")
_UNAVAILABLE: Final = ForwardResult(
    503, _JSON + ((b"retry-after", b"30"),),
    b'{"error":{"code":"spool_unavailable","message":"the edge cannot store this event now; retry later"}}\n')


def acknowledgement(request: ForwardRequest) -> ForwardResult:
    """What the browser gets for a request the spool stored: a POST gets 202 JSON (as
    before GET beacons); an image beacon (a GET whose path ends in ``.gif``) a 1x1
    transparent GIF, so its ``onload`` fires as with the relay's own pixel; any
    other GET a 204."""
    if request.method != "GET":
        return _ACCEPTED
    path = request.target.partition("?")[0]
    return _PIXEL_ACK if path.lower().endswith(".gif") else _EMPTY_ACK


class RefusalLog:
    """Keeps what an ``event`` route refused itself (``EdgeProxy``'s ``record_refusal``).

    At most ``per_domain_hour`` refusals per domain per clock hour are written (a
    flood cannot fill the disk or slow the edge); the rest are counted in
    ``stats["refusal_dropped"]``. The cap lives in memory per process. Writes go
    to the spool file's writer thread; ``record`` never blocks.
    """

    def __init__(self, spool: SpoolStore, per_domain_hour: int, *, clock: Callable[[], float] = time.time,
                 stats: Counter[str] | None = None) -> None:
        self._spool = spool
        self._cap = per_domain_hour
        self._clock = clock
        self._hour = -1
        self._counts: Counter[str] = Counter()
        self.stats: Counter[str] = stats if stats is not None else Counter()

    def record(self, request: ForwardRequest, status: int, reason: str) -> None:
        hour = int(self._clock() // 3600)
        if hour != self._hour:
            self._hour, self._counts = hour, Counter()
        if self._counts[request.host] >= self._cap:
            self.stats["refusal_dropped"] += 1
            return
        self._counts[request.host] += 1
        entry = entry_for(request)
        try:
            self._spool.record_refusal(Refusal(entry, status, reason))
        except SpoolUnavailable as exc:
            self.stats["refusal_dropped"] += 1
            log.error("refused request %s for %s not kept: %s", request.idempotency_key, request.host, exc)
            return
        self.stats["refusal_kept"] += 1


async def move_refusals(spool: SpoolStore, storage: FailedRequestLog, ip_retention: str, now: Callable[[], datetime],
                        batch: int = 500) -> int:
    """Move the spool file's refusals into the failed-request log (blocking work in
    threads); returns how many moved. A refusal leaves the spool file only once
    the log has it."""
    moved = 0
    while True:
        rows = await asyncio.to_thread(spool.take_refusals, batch)
        if not rows:
            return moved
        done: list[int] = []
        for row_id, refusal in rows:
            record = failed_record(request_for(refusal.entry), refusal.status, "edge", now(), ip_retention)
            try:
                await asyncio.to_thread(storage.log_failed_request, record)
            except StorageError as exc:
                log.warning("cannot move refused requests to the failed-request log yet: %s", exc)
                await asyncio.to_thread(spool.delete_refusals, done)
                return moved + len(done)
            done.append(row_id)
        await asyncio.to_thread(spool.delete_refusals, done)
        moved += len(done)
        if len(rows) < batch:
            return moved


class SpoolingRelay:
    """A :class:`Relay` that never loses what it acknowledges: ``inner`` first, then the
    spool, never a false acknowledgement.

    Concurrency: one per worker process, used from its event loop.
    """

    def __init__(
        self,
        inner: Relay,
        spool: SpoolStore,
        storage: FailedRequestLog | None,
        *,
        refusals: RefusalLog | None = None,
        ip_retention: str = "full",
        alert: AlertHook = log_alert,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        stats: Counter[str] | None = None,
    ) -> None:
        self.inner = inner
        self._spool = spool
        self._storage = storage
        self._refusals = refusals
        self._ip_retention = ip_retention
        self._alert = alert
        self._now = now
        self.stats: Counter[str] = stats if stats is not None else Counter()

    async def send(self, request: ForwardRequest) -> ForwardResult:
        result = await self.inner.send(request)
        verdict = classify(result)
        if verdict == DELIVERED:
            return result
        if is_probe(request):
            # An acceptance probe measures the live relay path: spooling it would
            # answer 202 and hide the very outage the probe exists to page about,
            # and replaying or logging synthetic events helps nobody.
            self.stats["probe_not_spooled"] += 1
            return result
        if verdict == REFUSED:
            self.stats["refused"] += 1
            await self.log_failed(request, result.status, "relay")
            return result
        try:
            await self._spool.put(entry_for(request))
        except (SpoolFull, SpoolUnavailable) as exc:
            self.stats[exc.code] += 1
            self.stats[f"event_refused_{exc.code}"] += 1  # by reason, with the proxy's own refusals
            self._alert(exc.code, str(exc))
            if self._refusals is not None:
                self._refusals.record(request, 503, exc.code)  # node-local, off the shared store
            else:
                await self.log_failed(request, 503, "edge")
            return _UNAVAILABLE
        self.stats["spooled"] += 1
        return acknowledgement(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def log_failed(self, request: ForwardRequest, status: int, origin: str) -> bool:
        """Write the failed-request log row; True once it is stored.

        Best effort on the request path: the shared store may be down, and the client's
        answer stays a refusal either way (nothing was acknowledged), so a failure here
        is logged and counted, not raised."""
        if self._storage is None:
            return False
        record = failed_record(request, status, origin, self._now(), self._ip_retention)
        try:
            await asyncio.to_thread(self._storage.log_failed_request, record)
        except StorageError as exc:
            self.stats["failed_log_error"] += 1
            log.error("cannot log failed request %s for %s: %s", request.idempotency_key, request.host, exc)
            return False
        return True


def is_probe(request: ForwardRequest) -> bool:
    """An acceptance probe's event (``monitor.PROBE_HEADER``), as forwarded to the relay."""
    return any(name == _PROBE_HEADER for name, _ in request.headers)


_PROBE_HEADER = b"x-edgeproxy-probe"


# ---------------------------------------------------------------------------------------
# The replayer (primary process only).
# ---------------------------------------------------------------------------------------


@dataclass
class DrainResult:
    delivered: int = 0
    refused: int = 0  # moved to the failed-request log
    retried: int = 0  # still in the spool, domain backing off
    dead: int = 0

    @property
    def sent(self) -> int:
        return self.delivered + self.refused + self.retried


@dataclass
class _Backoff:
    attempts: int
    next_at: float


class Replayer:
    """Drains the spool through ``forward``: per domain in arrival order (dispatched in
    order, at most ``spool.replay_window`` in flight), all domains at once, at
    most ``spool.replay_rate`` requests/s overall. A failure stops its domain and backs
    it off (full jitter, capped); entries older than ``spool.dead_letter_days`` move to
    the dead-letter table and raise an alert. Backoff state is in memory: after a
    restart every domain is tried once at once, which is what a restart wants.
    """

    def __init__(
        self,
        spool: SpoolStore,
        relay: Relay,
        settings: SpoolSettings,
        *,
        storage: FailedRequestLog | None = None,
        ip_retention: str = "full",
        alert: AlertHook = log_alert,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        batch: int = 1000,
    ) -> None:
        self._spool = spool
        self._settings = settings
        self._alert = alert
        self._clock = clock
        self._rand = rand
        self._batch = batch
        # One bucket for every send of this replayer: a burst of 1/20 s of the rate at most.
        self._limiter = TokenBuckets(settings.replay_rate, settings.replay_rate / 20, max_keys=1)
        self._backoff: dict[str, _Backoff] = {}
        self._now = lambda: datetime.fromtimestamp(clock(), timezone.utc)
        self._policy = SpoolingRelay(relay, spool, storage, ip_retention=ip_retention, alert=alert, now=self._now)
        self._relay = relay
        self._storage = storage
        self._ip_retention = ip_retention
        self.totals = DrainResult()

    async def run(self, stop: asyncio.Event) -> None:
        """Drain until ``stop`` is set; never raises (a broken pass is logged and retried)."""
        while not stop.is_set():
            try:
                result = await self.drain_once()
                if self._storage is not None:
                    await move_refusals(self._spool, self._storage, self._ip_retention, self._now)
            except Exception:  # a bug or a broken spool file must not end the loop for good
                log.exception("spool replay pass failed")
                result = DrainResult()
            if result.delivered or result.refused:
                continue  # more may be waiting: no pause while the relay takes events
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._pause())
            except TimeoutError:
                pass

    def _pause(self) -> float:
        now = self._clock()
        waits = [b.next_at - now for b in self._backoff.values()]
        return max(0.01, min([self._settings.poll_interval, *waits]))

    async def drain_once(self) -> DrainResult:
        """One pass over at most ``batch`` entries."""
        now = self._clock()
        result = DrainResult()
        dead = await asyncio.to_thread(self._spool.dead_letter_older_than,
                                       now - self._settings.dead_letter_days * 86400, now)
        if dead:
            result.dead = len(dead)
            domains = sorted({e.domain for e in dead})
            self._alert("spool_dead_letter", f"{len(dead)} spooled requests undeliverable for "
                        f"{self._settings.dead_letter_days:g} days moved to the dead-letter table "
                        f"(domains: {', '.join(domains)})")
        blocked = [d for d, b in self._backoff.items() if b.next_at > now]
        entries = await asyncio.to_thread(self._spool.head, self._batch, blocked)
        groups: dict[str, list[SpoolEntry]] = {}
        for entry in entries:
            groups.setdefault(entry.domain, []).append(entry)
        done: list[int] = []
        await asyncio.gather(*(self._drain_domain(domain, group, done, result) for domain, group in groups.items()))
        await asyncio.to_thread(self._spool.delete, done)
        for name in ("delivered", "refused", "retried", "dead"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(result, name))
        return result

    async def _send(self, entry: SpoolEntry) -> ForwardResult:
        while (delay := self._limiter.wait("", time.monotonic())) > 0:
            await asyncio.sleep(delay)
        return await self._relay.send(request_for(entry))

    async def _drain_domain(self, domain: str, entries: list[SpoolEntry], done: list[int],
                            result: DrainResult) -> None:
        # A sliding window: entries are dispatched in arrival order with at most
        # ``replay_window`` in flight (lock-step windows would wait for each window's
        # slowest answer). After the first retryable failure nothing more is sent for
        # this domain in this pass: the relay is struggling, and order is kept.
        window = asyncio.Semaphore(self._settings.replay_window)
        failures: list[tuple[SpoolEntry, ForwardResult]] = []

        async def one(entry: SpoolEntry) -> None:
            try:
                answer = await self._send(entry)
                verdict = classify(answer)
                if verdict == DELIVERED:
                    done.append(entry.id)
                    result.delivered += 1
                elif verdict == REFUSED and await self._log_refused(entry, answer):
                    done.append(entry.id)
                    result.refused += 1
                else:
                    failures.append((entry, answer))
            finally:
                window.release()

        tasks: list[asyncio.Task[None]] = []
        for entry in entries:
            await window.acquire()
            if failures:
                window.release()
                break
            tasks.append(asyncio.create_task(one(entry)))
        await asyncio.gather(*tasks)
        if not failures:
            self._backoff.pop(domain, None)
            return
        entry, answer = min(failures, key=lambda f: f[0].id)
        result.retried += 1
        state = self._backoff.get(domain) or _Backoff(0, 0.0)
        state.attempts += 1
        delay = backoff_delay(state.attempts, self._settings.backoff_base, self._settings.backoff_cap, self._rand())
        state.next_at = self._clock() + delay
        self._backoff[domain] = state
        reason = answer.error or f"status {answer.status}"
        await asyncio.to_thread(self._spool.record_failure, entry.id, reason)
        log.warning("replay to relay failed for %s (%s); retrying in %.2fs (attempt %d)",
                    domain, reason, delay, state.attempts)

    async def _log_refused(self, entry: SpoolEntry, answer: ForwardResult) -> bool:
        """A spooled request the relay now refuses goes to the failed-request log; it
        leaves the spool only once the log has it (without a log it stays: never dropped)."""
        return await self._policy.log_failed(request_for(entry), answer.status, "relay")


# ---------------------------------------------------------------------------------------
# The failed-request log: pruning and ``edgeproxy replay``.
# ---------------------------------------------------------------------------------------


def prune_failed_log(storage: FailedRequestLog, now: datetime, retention_days: float) -> int:
    """Delete failed-request records logged more than ``retention_days`` before ``now``."""
    return storage.prune_failed_requests(now - timedelta(days=retention_days))


@dataclass(frozen=True)
class ReplayFilters:
    since: datetime | None = None
    until: datetime | None = None
    domain: str | None = None
    status: int | None = None

    @classmethod
    def parse(cls, since: str | None, until: str | None, domain: str | None, status: int | None,
              now: datetime) -> "ReplayFilters":
        """From what an operator types (CLI flags or the admin API's JSON): times as
        ISO-8601 or ages like ``12h``; raises ``EdgeproxyError(code="bad_time")``."""
        return cls(
            since=parse_time(since, now) if since else None,
            until=parse_time(until, now) if until else None,
            domain=domain.lower().rstrip(".") if domain else None,
            status=status,
        )


@dataclass
class ReplaySummary:
    selected: int = 0
    delivered: int = 0
    failed: int = 0
    dry_run: bool = False
    failures: Counter[str] = field(default_factory=Counter)  # "status 401" / "connect" -> count

    def as_dict(self) -> dict[str, Any]:
        return {"selected": self.selected, "delivered": self.delivered, "failed": self.failed,
                "dry_run": self.dry_run, "failures": dict(self.failures)}


_REPLAY_PAGE: Final = 1000
_NOT_REPLAYABLE: Final = ForwardResult(0, (), b"", error="body not kept")

Progress = Callable[[int, int, FailedRequestRecord, str], None]
"""``progress(done, total, record, outcome)`` after each request (outcome: delivered,
failed: ..., or would send)."""


async def replay_failed(
    storage: FailedRequestLog,
    relay: Relay,
    filters: ReplayFilters,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    dry_run: bool = False,
    progress: Progress | None = None,
    window: int = 8,
) -> ReplaySummary:
    """Resend undelivered failed-log records matching ``filters`` through ``relay``
    (the plain relay client) with their original method and headers, so each carries
    its original ``Idempotency-Key``. Records that cannot be resent (:func:`replayable`)
    are counted as failed ("body not kept") and stay in the log. A 2xx/3xx marks the record delivered (after every
    window, so an interrupted run keeps its progress); a second run selects nothing
    that was delivered. Anything else leaves the record for a later run."""
    # Streamed page by page: a week-long relay outage can leave millions of rows, so
    # the run never holds more than one page; ``total`` comes from a count first.
    total = await asyncio.to_thread(
        storage.count_failed_requests, since=filters.since, until=filters.until, domain=filters.domain,
        status=filters.status)
    summary = ReplaySummary(selected=0, dry_run=dry_run)
    step = max(1, window)
    after = 0
    done = 0
    while True:
        page = await asyncio.to_thread(
            storage.find_failed_requests, since=filters.since, until=filters.until, domain=filters.domain,
            status=filters.status, delivered=False, limit=_REPLAY_PAGE, after_id=after)
        if not page:
            break
        after = page[-1].id
        summary.selected += len(page)
        total = max(total, summary.selected)
        if dry_run:
            for record in page:
                done += 1
                if progress is not None:
                    progress(done, total, record, "would send")
            continue
        for start in range(0, len(page), step):
            chunk = page[start:start + step]
            sendable = [r for r in chunk if replayable(r)]
            answers = dict(zip((r.id for r in sendable), await asyncio.gather(*(relay.send(ForwardRequest(
                target=r.target, headers=r.headers, body=r.body, host=r.domain,
                idempotency_key=r.idempotency_key, client=r.client,
                received_at=r.received_at.timestamp(), method=r.method)) for r in sendable))))
            delivered: list[int] = []
            for record in chunk:
                done += 1
                answer = answers.get(record.id, _NOT_REPLAYABLE)
                if classify(answer) == DELIVERED:
                    delivered.append(record.id)
                    summary.delivered += 1
                    outcome = "delivered"
                else:
                    summary.failed += 1
                    reason = answer.error or f"status {answer.status}"
                    summary.failures[reason] += 1
                    outcome = f"failed: {reason}"
                if progress is not None:
                    progress(done, total, record, outcome)
            await asyncio.to_thread(storage.mark_failed_delivered, delivered, now())
    return summary


async def prune_loop(storage: FailedRequestLog, retention_days: float, stop: asyncio.Event, *,
                     interval: float = 3600.0,
                     now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
    """Prune the failed-request log now and then every ``interval`` seconds until ``stop``."""
    while not stop.is_set():
        try:
            pruned = await asyncio.to_thread(prune_failed_log, storage, now(), retention_days)
            if pruned:
                log.info("pruned %d failed-request records older than %g days", pruned, retention_days)
        except StorageError as exc:
            log.warning("failed-request log pruning failed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
