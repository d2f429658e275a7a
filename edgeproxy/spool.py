"""Zero data loss between the browser and the queue relay.

Owns:
- the durable, node-local spool (its own SQLite file, ``[spool] path``; never the
  shared store, which may be the thing that is down): :class:`Spool`;
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

Must not import: ``acme``, ``hypercorn``, storage backends (the failed-request log
goes through the ``Storage`` protocol).

Durability (why each choice): WAL + ``synchronous=FULL`` so a committed entry
survives ``kill -9`` and a power cut (https://sqlite.org/pragma.html#pragma_synchronous);
an entry is committed *before* the 202 is sent. Writes run on one writer thread per
process (house rule 4: SQLite never on the event loop) and commit in groups: every
request that arrived while the previous fsync ran goes into the next transaction, so
one fsync acknowledges many requests. Several worker processes write the same file;
``BEGIN IMMEDIATE`` and the busy timeout serialize them. The size cap is checked in
the same transaction as the insert (byte total kept by triggers), so concurrent
writers cannot overshoot it together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import logging
import os
import queue
import random
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from .addresses import normalize_ip
from .private_files import private_file, tighten_sqlite
from .config import Settings, SpoolSettings
from .errors import EdgeproxyError, StorageError
from .ratelimit import TokenBuckets
from .relay import ForwardRequest, ForwardResult, Relay
from .storage import FailedRequestRecord, Storage, sqlite_path_from_url

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


class SpoolFull(EdgeproxyError):
    """The spool reached ``spool.max_bytes``: the request was not stored (answer 503)."""

    code = "spool_full"


class SpoolUnavailable(EdgeproxyError):
    """The spool file could not be written: the request was not stored (answer 503)."""

    code = "spool_unavailable"


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


@dataclass(frozen=True)
class SpoolEntry:
    """One request waiting for the relay. ``id`` is 0 before it is stored."""

    idempotency_key: str
    domain: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: str | None
    received_at: float  # epoch seconds
    attempts: int = 0
    last_error: str | None = None
    id: int = 0
    method: str = "POST"

    @classmethod
    def from_request(cls, request: ForwardRequest) -> SpoolEntry:
        return cls(request.idempotency_key, request.host, request.target, request.headers,
                   request.body, request.client, request.received_at or time.time(), method=request.method)

    def to_request(self) -> ForwardRequest:
        return ForwardRequest(target=self.target, headers=self.headers, body=self.body, host=self.domain,
                              idempotency_key=self.idempotency_key, client=self.client,
                              received_at=self.received_at, method=self.method)

    def headers_json(self) -> str:
        return json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers])

    def size(self, headers_json: str) -> int:
        # What the cap counts: payload plus a fixed allowance for the row itself.
        return len(self.body) + len(headers_json) + len(self.target) + len(self.domain) + 128


@dataclass(frozen=True)
class SpoolStats:
    depth: int
    bytes: int
    max_bytes: int
    oldest_received_at: float | None
    oldest_age_seconds: float  # 0 when empty
    dead_letters: int
    domains: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "depth": self.depth, "bytes": self.bytes, "max_bytes": self.max_bytes,
            "oldest_received_at": None if self.oldest_received_at is None else
            datetime.fromtimestamp(self.oldest_received_at, timezone.utc).isoformat(),
            "oldest_age_seconds": round(self.oldest_age_seconds, 3),
            "dead_letters": self.dead_letters, "domains": self.domains,
        }


_COLUMNS: Final = ("idempotency_key, domain, target, headers_json, body, client, received_at, size, "
                   "attempts, last_error, method")
_SCHEMA: Final = (
    f"""CREATE TABLE IF NOT EXISTS spool (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        idempotency_key TEXT NOT NULL, domain TEXT NOT NULL, target TEXT NOT NULL,
        headers_json TEXT NOT NULL, body BLOB NOT NULL, client TEXT,
        received_at REAL NOT NULL, size INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT)""",
    "CREATE INDEX IF NOT EXISTS spool_domain ON spool(domain, id)",
    # The dead-letter sweep runs every pass and stats asks for the oldest entry: no scans.
    "CREATE INDEX IF NOT EXISTS spool_received ON spool(received_at)",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        id INTEGER PRIMARY KEY,
        idempotency_key TEXT NOT NULL, domain TEXT NOT NULL, target TEXT NOT NULL,
        headers_json TEXT NOT NULL, body BLOB NOT NULL, client TEXT,
        received_at REAL NOT NULL, size INTEGER NOT NULL,
        attempts INTEGER NOT NULL, last_error TEXT, dead_at REAL NOT NULL)""",
    # Running totals kept by triggers: the cap check is one row read, whoever wrote.
    "CREATE TABLE IF NOT EXISTS spool_meta (id INTEGER PRIMARY KEY CHECK (id = 1), "
    "bytes INTEGER NOT NULL, count INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO spool_meta (id, bytes, count) VALUES (1, 0, 0)",
    "CREATE TRIGGER IF NOT EXISTS spool_ins AFTER INSERT ON spool BEGIN "
    "UPDATE spool_meta SET bytes = bytes + NEW.size, count = count + 1 WHERE id = 1; END",
    "CREATE TRIGGER IF NOT EXISTS spool_del AFTER DELETE ON spool BEGIN "
    "UPDATE spool_meta SET bytes = bytes - OLD.size, count = count - 1 WHERE id = 1; END",
    # Requests the edge itself refused (RefusalLog), until the replayer moves them to the
    # failed-request log. Outside the spool's byte cap: RefusalLog caps them per domain.
    """CREATE TABLE IF NOT EXISTS refused (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        idempotency_key TEXT NOT NULL, domain TEXT NOT NULL, method TEXT NOT NULL, target TEXT NOT NULL,
        headers_json TEXT NOT NULL, body BLOB NOT NULL, client TEXT, received_at REAL NOT NULL,
        status INTEGER NOT NULL, reason TEXT NOT NULL)""",
)
# Spool files written before GET beacons were forwarded have no method column: every
# entry in them is a POST.
_METHOD_COLUMN: Final = "method TEXT NOT NULL DEFAULT 'POST'"
_GROUP_MAX: Final = 512  # requests per transaction at most (bounds one commit's latency)

_WriteItem = tuple["SpoolEntry | Refusal", "concurrent.futures.Future[int] | None"]


def _row_entry(row: Sequence[Any]) -> SpoolEntry:
    return SpoolEntry(
        id=row[0], idempotency_key=row[1], domain=row[2], target=row[3],
        headers=_headers(row[4]),
        body=bytes(row[5]), client=row[6], received_at=row[7], attempts=row[9], last_error=row[10],
        method=row[11],
    )


def _headers(headers_json: str) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(headers_json))


@dataclass(frozen=True)
class Refusal:
    """A request the edge refused itself, as kept in the spool file."""

    entry: SpoolEntry
    status: int
    reason: str


class Spool:
    """The node-local spool file. Thread-safe; one instance per process.

    ``put`` (async) returns once the entry is committed and fsync'd, or raises
    :class:`SpoolFull` / :class:`SpoolUnavailable`; it never reports success for an
    entry that is not on disk. Every other method is blocking (run it with
    ``asyncio.to_thread``). Entries come back in arrival order (``id``).
    """

    def __init__(self, path: str, *, max_bytes: int, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._busy_timeout = busy_timeout
        # Request bodies and visitor IPs: 0600 in a 0700 directory, whichever
        # command (serve, replay, spool ...) opens the spool first.
        private_file(path)
        tighten_sqlite(path)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_WriteItem | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._closed = False
        self.commits = 0  # transactions the writer committed (group commit: < puts)
        conn = self._conn()
        deadline = time.monotonic() + busy_timeout
        while True:  # switching to WAL returns SQLITE_BUSY at once while another process opens the file
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                for table in ("spool", "dead_letters"):
                    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                    if "method" not in columns:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {_METHOD_COLUMN}")
                conn.execute("COMMIT")
                break
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if time.monotonic() >= deadline:
                    raise SpoolUnavailable(f"cannot open spool {path}: {exc}") from exc
                time.sleep(0.01)

    # -- connections ------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")  # fsync at every commit: survives power loss
        except sqlite3.Error as exc:
            raise SpoolUnavailable(f"cannot open spool {self.path}: {exc}") from exc
        with self._lock:
            self._conns.append(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise SpoolUnavailable(f"spool {self.path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _tx(self, action: str, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise SpoolUnavailable(f"spool {self.path}: cannot {action}: {exc}") from exc

    # -- writing (group commit) -------------------------------------------------------
    async def put(self, entry: SpoolEntry) -> int:
        """Store ``entry`` durably; returns its id. Raises SpoolFull / SpoolUnavailable."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._ensure_writer()
        self._queue.put((entry, future))
        return await asyncio.wrap_future(future)

    def record_refusal(self, refusal: Refusal) -> None:
        """Queue ``refusal`` for the writer thread and return at once (the caller has
        refused the request already; nothing waits for the fsync)."""
        self._ensure_writer()
        self._queue.put((refusal, None))

    def take_refusals(self, limit: int) -> list[tuple[int, Refusal]]:
        """The oldest ``limit`` refusals with their ids (blocking)."""
        try:
            rows = self._conn().execute(
                "SELECT id, idempotency_key, domain, method, target, headers_json, body, client, received_at, "
                "status, reason FROM refused ORDER BY id LIMIT ?", (limit,)).fetchall()
        except sqlite3.Error as exc:
            raise SpoolUnavailable(f"spool {self.path}: cannot read: {exc}") from exc
        return [(row[0], Refusal(SpoolEntry(row[1], row[2], row[4], _headers(row[5]), bytes(row[6]), row[7], row[8],
                                            method=row[3]), row[9], row[10])) for row in rows]

    def delete_refusals(self, ids: Sequence[int]) -> None:
        if ids:
            self._tx("delete moved refusals", lambda c: c.execute(
                f"DELETE FROM refused WHERE id IN ({','.join('?' * len(ids))})", list(ids)))

    def put_many(self, entries: Iterable[SpoolEntry]) -> list[int]:
        """Blocking ``put`` of several entries in one transaction (tests, benchmarks)."""
        futures: list[concurrent.futures.Future[int]] = []
        items: list[_WriteItem] = []
        for entry in entries:
            future: concurrent.futures.Future[int] = concurrent.futures.Future()
            futures.append(future)
            items.append((entry, future))
        self._commit(self._conn(), items)

        return [f.result() for f in futures]

    def _ensure_writer(self) -> None:
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    if self._closed:
                        raise SpoolUnavailable(f"spool {self.path} is closed")
                    self._writer = threading.Thread(target=self._write_loop, name="spool-writer", daemon=True)
                    self._writer.start()

    def _write_loop(self) -> None:
        conn = self._connect()
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            # Group commit: everything that queued up while the last fsync ran.
            while len(batch) < _GROUP_MAX:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(conn, batch)

    def _commit(self, conn: sqlite3.Connection, batch: list[_WriteItem]) -> None:
        outcomes: list[tuple[concurrent.futures.Future[int] | None, int | EdgeproxyError]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                used = int(conn.execute("SELECT bytes FROM spool_meta WHERE id = 1").fetchone()[0])
                for entry, future in batch:
                    if isinstance(entry, Refusal):
                        kept = entry.entry
                        conn.execute(
                            "INSERT INTO refused (idempotency_key, domain, method, target, headers_json, body, "
                            "client, received_at, status, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (kept.idempotency_key, kept.domain, kept.method, kept.target, kept.headers_json(),
                             kept.body, kept.client, kept.received_at, entry.status, entry.reason))
                        continue
                    headers_json = entry.headers_json()
                    size = entry.size(headers_json)
                    if used + size > self.max_bytes:
                        outcomes.append((future, SpoolFull(
                            f"spool {self.path} holds {used} of {self.max_bytes} bytes; refusing {size} more")))
                        continue
                    cursor = conn.execute(
                        f"INSERT INTO spool ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (entry.idempotency_key, entry.domain, entry.target, headers_json, entry.body,
                         entry.client, entry.received_at, size, entry.attempts, entry.last_error, entry.method),
                    )
                    used += size
                    outcomes.append((future, int(cursor.lastrowid or 0)))
                conn.execute("COMMIT")
                self.commits += 1
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            # Nothing of this batch is on disk: every waiter gets the failure (-> 503).
            error = SpoolUnavailable(f"spool {self.path}: write failed: {exc}")
            outcomes = [(future, error) for _, future in batch]
            if any(isinstance(entry, Refusal) for entry, _ in batch):
                log.error("refused requests not kept: %s", error)
        for future, outcome in outcomes:
            if future is None:
                continue
            if isinstance(outcome, EdgeproxyError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    # -- reading and draining (blocking) ----------------------------------------------
    def head(self, limit: int, exclude_domains: Sequence[str] = ()) -> list[SpoolEntry]:
        """The oldest ``limit`` entries (arrival order), skipping ``exclude_domains``."""
        where = f"WHERE domain NOT IN ({','.join('?' * len(exclude_domains))})" if exclude_domains else ""
        try:
            rows = self._conn().execute(
                f"SELECT id, {_COLUMNS} FROM spool {where} ORDER BY id LIMIT ?", (*exclude_domains, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise SpoolUnavailable(f"spool {self.path}: cannot read: {exc}") from exc
        return [_row_entry(r) for r in rows]

    def entries(self, limit: int = 100, domain: str | None = None) -> list[SpoolEntry]:
        if domain is None:
            return self.head(limit)
        try:
            rows = self._conn().execute(
                f"SELECT id, {_COLUMNS} FROM spool WHERE domain = ? ORDER BY id LIMIT ?", (domain, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise SpoolUnavailable(f"spool {self.path}: cannot read: {exc}") from exc
        return [_row_entry(r) for r in rows]

    def delete(self, ids: Sequence[int]) -> None:
        """Remove delivered (or logged) entries. Idempotent."""
        if not ids:
            return

        def run(conn: sqlite3.Connection) -> None:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start:start + 500])
                conn.execute(f"DELETE FROM spool WHERE id IN ({','.join('?' * len(chunk))})", chunk)

        self._tx("delete delivered entries", run)

    def record_failure(self, entry_id: int, error: str) -> None:
        self._tx("record a failure", lambda c: c.execute(
            "UPDATE spool SET attempts = attempts + 1, last_error = ? WHERE id = ?", (error[:500], entry_id)))

    def dead_letter_older_than(self, cutoff: float, now: float) -> list[SpoolEntry]:
        """Move entries received before ``cutoff`` to ``dead_letters``; returns them."""

        def run(conn: sqlite3.Connection) -> list[SpoolEntry]:
            rows = conn.execute(f"SELECT id, {_COLUMNS} FROM spool WHERE received_at < ? ORDER BY id",
                                (cutoff,)).fetchall()
            if rows:
                conn.execute(f"INSERT OR REPLACE INTO dead_letters (id, {_COLUMNS}, dead_at) "
                             f"SELECT id, {_COLUMNS}, ? FROM spool WHERE received_at < ?", (now, cutoff))
                conn.execute("DELETE FROM spool WHERE received_at < ?", (cutoff,))
            return [_row_entry(r) for r in rows]

        result: list[SpoolEntry] = self._tx("move entries to the dead-letter table", run)
        return result

    def stats(self, now: float) -> SpoolStats:
        try:
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                used, count = conn.execute("SELECT bytes, count FROM spool_meta WHERE id = 1").fetchone()
                oldest = conn.execute("SELECT MIN(received_at) FROM spool").fetchone()[0]
                dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
                domains = dict(conn.execute("SELECT domain, COUNT(*) FROM spool GROUP BY domain").fetchall())
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise SpoolUnavailable(f"spool {self.path}: cannot read: {exc}") from exc
        return SpoolStats(
            depth=int(count), bytes=int(used), max_bytes=self.max_bytes,
            oldest_received_at=oldest, oldest_age_seconds=max(0.0, now - oldest) if oldest is not None else 0.0,
            dead_letters=int(dead), domains={str(k): int(v) for k, v in domains.items()},
        )

    def depth_age(self) -> tuple[int, float]:
        """(depth, age in seconds of the oldest entry) now: the shape ``monitor.SpoolStats``
        and the metrics collector take. Blocking."""
        stats = self.stats(time.time())
        return stats.depth, stats.oldest_age_seconds

    def close(self) -> None:
        """Finish queued writes, stop the writer, close every connection. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
        if writer is not None:
            self._queue.put(None)
            writer.join(30)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()


def spool_metrics(spool: Spool, now: float) -> dict[str, float]:
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

    def __init__(self, spool: Spool, per_domain_hour: int, *, clock: Callable[[], float] = time.time,
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
        entry = SpoolEntry.from_request(request)
        try:
            self._spool.record_refusal(Refusal(entry, status, reason))
        except SpoolUnavailable as exc:
            self.stats["refusal_dropped"] += 1
            log.error("refused request %s for %s not kept: %s", request.idempotency_key, request.host, exc)
            return
        self.stats["refusal_kept"] += 1


async def move_refusals(spool: Spool, storage: Storage, ip_retention: str, now: Callable[[], datetime],
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
            record = failed_record(refusal.entry.to_request(), refusal.status, "edge", now(), ip_retention)
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
        spool: Spool,
        storage: Storage | None,
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
            await self._spool.put(SpoolEntry.from_request(request))
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
        spool: Spool,
        relay: Relay,
        settings: SpoolSettings,
        *,
        storage: Storage | None = None,
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
        return await self._relay.send(entry.to_request())

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
        return await self._policy.log_failed(entry.to_request(), answer.status, "relay")


# ---------------------------------------------------------------------------------------
# The failed-request log: pruning and ``edgeproxy replay``.
# ---------------------------------------------------------------------------------------


def prune_failed_log(storage: Storage, now: datetime, retention_days: float) -> int:
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
    storage: Storage,
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


async def prune_loop(storage: Storage, retention_days: float, stop: asyncio.Event, *,
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
