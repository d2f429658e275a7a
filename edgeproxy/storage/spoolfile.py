"""The spool file: the node-local SQLite store behind ``spool.SpoolingRelay``.

Owns: the durable queue of requests waiting for the relay (``spool``), the
dead letters, and the requests the edge refused itself (``refused``), in one
SQLite file per node (``[spool] path``; never the shared store, which may be
the thing that is down). The policy around it (what to spool, when to replay,
what a refusal is) lives in ``edgeproxy/edge/spool.py``; :class:`SpoolStore` in
``base.py`` is the contract this implements.
Must not import: anything of ours but ``errors``, ``private_files`` and the
SQLite engine (``storage.sqlitefile``, shared with ``SqliteStorage``).

Durability (why each choice): WAL + ``synchronous=FULL`` so a committed entry
survives ``kill -9`` and a power cut (https://sqlite.org/pragma.html#pragma_synchronous);
an entry is committed *before* the caller acknowledges it. Writes run on one
writer thread per process (house rule 4: SQLite never on the event loop) and
commit in groups: every request that arrived while the previous fsync ran goes
into the next transaction, so one fsync acknowledges many requests. Several
worker processes write the same file; ``BEGIN IMMEDIATE`` and the busy timeout
serialize them. The size cap is checked in the same transaction as the insert
(byte total kept by triggers), so concurrent writers cannot overshoot it together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

from ..errors import EdgeproxyError
from ..private_files import private_file, tighten_sqlite
from .base import Refusal, SpoolEntry, SpoolStats
from .sqlitefile import SqliteFile

__all__ = ["Refusal", "Spool", "SpoolEntry", "SpoolFull", "SpoolStats", "SpoolUnavailable"]

log = logging.getLogger("edgeproxy.spool")


class SpoolFull(EdgeproxyError):
    """The spool reached ``spool.max_bytes``: the request was not stored (answer 503)."""

    code = "spool_full"


class SpoolUnavailable(EdgeproxyError):
    """The spool file could not be written: the request was not stored (answer 503)."""

    code = "spool_unavailable"


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


class Spool:
    """The node-local spool file (:class:`~edgeproxy.storage.base.SpoolStore`). Thread-safe;
    one instance per process.

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
        self._file = SqliteFile(
            path, busy_timeout=busy_timeout, pragmas=("synchronous=FULL",),  # fsync at every commit
            map_error=lambda exc, action: SpoolUnavailable(f"spool {path}: cannot {action}: {exc}"),
            closed=lambda: SpoolUnavailable(f"spool {path} is closed"),
        )
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_WriteItem | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._closed = False
        self.commits = 0  # transactions the writer committed (group commit: < puts)
        self._file.enable_wal()
        with self._file.write("create the schema") as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            for table in ("spool", "dead_letters"):
                columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                if "method" not in columns:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {_METHOD_COLUMN}")

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
        with self._file.query("read refusals") as conn:
            rows = conn.execute(
                "SELECT id, idempotency_key, domain, method, target, headers_json, body, client, received_at, "
                "status, reason FROM refused ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [(row[0], Refusal(SpoolEntry(row[1], row[2], row[4], _headers(row[5]), bytes(row[6]), row[7], row[8],
                                            method=row[3]), row[9], row[10])) for row in rows]

    def delete_refusals(self, ids: Sequence[int]) -> None:
        if ids:
            with self._file.write("delete moved refusals") as conn:
                conn.execute(f"DELETE FROM refused WHERE id IN ({','.join('?' * len(ids))})", list(ids))

    def put_many(self, entries: Iterable[SpoolEntry]) -> list[int]:
        """Blocking ``put`` of several entries in one transaction (tests, benchmarks)."""
        futures: list[concurrent.futures.Future[int]] = []
        items: list[_WriteItem] = []
        for entry in entries:
            future: concurrent.futures.Future[int] = concurrent.futures.Future()
            futures.append(future)
            items.append((entry, future))
        self._commit(items)

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
            self._commit(batch)

    def _commit(self, batch: list[_WriteItem]) -> None:
        outcomes: list[tuple[concurrent.futures.Future[int] | None, int | EdgeproxyError]] = []
        try:
            with self._file.write("write a batch") as conn:
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
            self.commits += 1
        except SpoolUnavailable as error:
            # Nothing of this batch is on disk: every waiter gets the failure (-> 503).
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
        with self._file.query("read") as conn:
            rows = conn.execute(
                f"SELECT id, {_COLUMNS} FROM spool {where} ORDER BY id LIMIT ?", (*exclude_domains, limit),
            ).fetchall()
        return [_row_entry(r) for r in rows]

    def entries(self, limit: int = 100, domain: str | None = None) -> list[SpoolEntry]:
        if domain is None:
            return self.head(limit)
        with self._file.query("read") as conn:
            rows = conn.execute(
                f"SELECT id, {_COLUMNS} FROM spool WHERE domain = ? ORDER BY id LIMIT ?", (domain, limit),
            ).fetchall()
        return [_row_entry(r) for r in rows]

    def delete(self, ids: Sequence[int]) -> None:
        """Remove delivered (or logged) entries. Idempotent."""
        if not ids:
            return

        with self._file.write("delete delivered entries") as conn:
            for start in range(0, len(ids), 500):  # stay under SQLite's parameter limit
                chunk = list(ids[start:start + 500])
                conn.execute(f"DELETE FROM spool WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def record_failure(self, entry_id: int, error: str) -> None:
        with self._file.write("record a failure") as conn:
            conn.execute("UPDATE spool SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                         (error[:500], entry_id))

    def dead_letter_older_than(self, cutoff: float, now: float) -> list[SpoolEntry]:
        """Move entries received before ``cutoff`` to ``dead_letters``; returns them."""

        with self._file.write("move entries to the dead-letter table") as conn:
            rows = conn.execute(f"SELECT id, {_COLUMNS} FROM spool WHERE received_at < ? ORDER BY id",
                                (cutoff,)).fetchall()
            if rows:
                conn.execute(f"INSERT OR REPLACE INTO dead_letters (id, {_COLUMNS}, dead_at) "
                             f"SELECT id, {_COLUMNS}, ? FROM spool WHERE received_at < ?", (now, cutoff))
                conn.execute("DELETE FROM spool WHERE received_at < ?", (cutoff,))
        return [_row_entry(r) for r in rows]

    def stats(self, now: float) -> SpoolStats:
        with self._file.read("read") as conn:
            used, count = conn.execute("SELECT bytes, count FROM spool_meta WHERE id = 1").fetchone()
            oldest = conn.execute("SELECT MIN(received_at) FROM spool").fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            domains = dict(conn.execute("SELECT domain, COUNT(*) FROM spool GROUP BY domain").fetchall())
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
        self._file.close()
