"""The default storage backend: one SQLite file on local disk.

Owns: the SQLite schema (version 1), its creation, and every SQL statement of
the single-node backend. Implements :class:`edgeproxy.storage.base.Storage`
exactly; the contract (concurrency, not-found, idempotency) lives in the
docstrings of ``base.py`` and is checked by ``tests/test_storage_contract.py``.
Must not import: ``acme``, ``httpx``, ``hypercorn``, or any other edgeproxy
module except ``errors`` and ``storage.base``.

Choices (and why):

- Durability: WAL journal + ``synchronous=FULL``, so a committed write survives
  a power cut and a SIGKILL mid-transaction leaves the previous state
  (https://sqlite.org/wal.html, https://sqlite.org/pragma.html#pragma_synchronous).
  WAL needs a local filesystem (shared memory index): do not put the file on NFS.
- Privacy: private keys live in this file. It is created 0600 inside a 0700
  directory (under a 077 umask as well); SQLite creates ``-wal``/``-shm`` with
  the permissions of the main file. ``secure_delete=ON`` zeroes deleted rows and
  ``remove_domain`` checkpoints the WAL (TRUNCATE), retrying while readers keep
  it busy, so a removed key does not linger in free pages or old WAL frames; if
  it cannot complete within ``purge_timeout`` it raises. Existing files wider
  than 0600 are tightened at open (``private_files``).
- Times: UTC ISO-8601 text with microseconds, fixed width
  (``2025-01-02T03:04:05.000006Z``), so values round-trip exactly and sort
  lexicographically (the lock expiry comparison happens in SQL). Naive
  datetimes are refused with ``ValueError``: the contract is tz-aware UTC.
- Connections: one connection per thread (``threading.local``), not one shared
  connection behind a lock. With WAL, readers never wait for a writer, and a
  thread stuck in ``busy_timeout`` behind another process's write does not stall
  this process's readers (challenge lookups, SNI cache refreshes). All
  connections are tracked so ``close()`` closes them (hence
  ``check_same_thread=False``); connections of dead threads are closed when the
  next one is opened. After ``fork()`` the child never touches (not even closes)
  connections it inherited and opens its own (https://sqlite.org/howtocorrupt.html
  section 2.6).
- Transactions: explicit ``BEGIN IMMEDIATE`` for every write (the write lock is
  taken up front, so read-modify-write sequences such as locks and
  ``add_domain`` cannot interleave, and a busy database fails at ``BEGIN``
  instead of in the middle), plain ``BEGIN`` for multi-statement reads (one
  snapshot).
- Change feed: ``changes(seq INTEGER PRIMARY KEY AUTOINCREMENT, hostname)``;
  AUTOINCREMENT guarantees a seq is never reused, even after every row has been
  pruned. Old rows are pruned opportunistically (every ``PRUNE_EVERY`` changes
  keep the newest ``keep_changes``) or with :meth:`SqliteStorage.prune_changes`;
  ``feed_state.pruned_through`` remembers how far, so a reader that fell behind
  is detected and given the full listing (see :meth:`SqliteStorage.changes_since`).
- Errors: ``sqlite3`` exceptions never escape. Busy/locked/cannot-open map to
  ``StorageUnavailable`` (retry later), everything else to ``StorageError``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

from edgeproxy.errors import DomainExists, DomainNotFound, StorageError, StorageUnavailable
from edgeproxy.private_files import tighten_sqlite
from edgeproxy.storage.base import (
    DOMAIN_STATUSES,
    AccountRecord,
    CertificateRecord,
    CertificateVisitor,
    ChallengeRecord,
    DomainRecord,
    StatusEvent,
    AriState,
    FailedRequestRecord,
    leaf_der_of,
)

__all__ = ["SqliteStorage", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

# Statements of schema version 1. Later versions add migrations that run
# after these, keyed on schema_version.version; never edit these in place.
_SCHEMA_V1 = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS domains (
        hostname        TEXT PRIMARY KEY,
        status          TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        error_code      TEXT,
        error_message   TEXT,
        next_attempt_at TEXT,
        attempts        INTEGER NOT NULL DEFAULT 0
    )""",
    # Key and chain in ONE row: a reader sees the old pair or the new pair.
    """CREATE TABLE IF NOT EXISTS certificates (
        hostname   TEXT PRIMARY KEY REFERENCES domains(hostname) ON DELETE CASCADE,
        key_pem    BLOB NOT NULL,
        chain_pem  BLOB NOT NULL,
        not_before TEXT NOT NULL,
        not_after  TEXT NOT NULL,
        serial     TEXT NOT NULL,
        issuer     TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    # No foreign key: a token may be published while the domain row is being
    # changed; remove_domain deletes a hostname's tokens explicitly.
    """CREATE TABLE IF NOT EXISTS challenges (
        token             TEXT PRIMARY KEY,
        key_authorization TEXT NOT NULL,
        hostname          TEXT NOT NULL,
        expires_at        TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS challenges_hostname ON challenges(hostname)",
    """CREATE TABLE IF NOT EXISTS accounts (
        directory_url     TEXT PRIMARY KEY,
        key_pem           BLOB NOT NULL,
        registration_json TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS changes (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        hostname TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS feed_state (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        pruned_through INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO feed_state (id, pruned_through) VALUES (1, 0)",
    """CREATE TABLE IF NOT EXISTS locks (
        name       TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,
        expires_at TEXT NOT NULL
    )""",
)

# Additive tables (no schema_version bump; PostgreSQL has them in its migrations).
_SCHEMA_RENEW = (
    """CREATE TABLE IF NOT EXISTS budget_events (
        kind TEXT NOT NULL,
        key  TEXT NOT NULL,
        at   TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS budget_events_lookup ON budget_events(kind, key, at)",
    """CREATE TABLE IF NOT EXISTS status_history (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        hostname   TEXT NOT NULL,
        at         TEXT NOT NULL,
        status     TEXT NOT NULL,
        error_code TEXT,
        message    TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS status_history_host ON status_history(hostname, id)",
    """CREATE TABLE IF NOT EXISTS ari_state (
        hostname   TEXT PRIMARY KEY,
        serial     TEXT NOT NULL,
        cert_id    TEXT NOT NULL,
        renew_at   TEXT,
        next_poll  TEXT NOT NULL,
        checked_at TEXT NOT NULL
    )""",
)

# Tables added without a version bump (CREATE ... IF NOT EXISTS is safe
# to run on every open of an older file).
_FAILED_LOG_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS failed_requests (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        idempotency_key TEXT NOT NULL UNIQUE,
        domain          TEXT NOT NULL,
        method          TEXT NOT NULL,
        target          TEXT NOT NULL,
        headers_json    TEXT NOT NULL,
        body            BLOB NOT NULL,
        client          TEXT,
        status          INTEGER NOT NULL,
        origin          TEXT NOT NULL,
        received_at     TEXT NOT NULL,
        logged_at       TEXT NOT NULL,
        delivered_at    TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS failed_requests_received ON failed_requests(received_at)",
    "CREATE INDEX IF NOT EXISTS failed_requests_logged ON failed_requests(logged_at)",
)
# Indexes for the renewal loop's due query and the registration limits.
# Additive like the tables above (CREATE INDEX IF NOT EXISTS on every open), so an
# existing file gets them on its first open by this version, and an older
# edgeproxy can still open the file (it never sees a schema_version it rejects).
# hostname in the first one lets ``ORDER BY next_attempt_at, hostname LIMIT n``
# walk the index without sorting.
_SCHEMA_INDEXES = (
    "CREATE INDEX IF NOT EXISTS domains_next_attempt ON domains(next_attempt_at, hostname)",
    "CREATE INDEX IF NOT EXISTS domains_created ON domains(created_at)",
)

# The leaf certificate as DER next to the chain, so loading 100,000
# certificates at start-up does not base64-decode every leaf. Added to an
# existing file on open (ADD COLUMN only touches the schema; old rows read NULL
# and are decoded from the PEM), additive like the indexes above. An older
# edgeproxy still opens the file and writes rows without it; the trigger clears
# the stored DER whenever a write changes the chain but not the DER (what such
# a writer's upsert does), so a renewed chain is never paired with the old leaf.
_LEAF_DER_COLUMN = "ALTER TABLE certificates ADD COLUMN leaf_der BLOB"
_LEAF_DER_TRIGGER = """CREATE TRIGGER IF NOT EXISTS certificates_leaf_der_stale
    AFTER UPDATE OF chain_pem ON certificates
    WHEN NEW.leaf_der IS NOT NULL AND NEW.leaf_der IS OLD.leaf_der AND NEW.chain_pem IS NOT OLD.chain_pem
    BEGIN
        UPDATE certificates SET leaf_der = NULL WHERE hostname = NEW.hostname;
    END"""

# Which configured ACME CA issued a certificate, why not the preferred one (issuer
# fallback), and the serial they were recorded for: an older edgeproxy's upsert
# renews the chain and serial without knowing these columns, and a serial that no
# longer matches reads as "unknown". Added like leaf_der (ADD COLUMN on open, old
# rows read NULL); postgres.py has the same statements as its migration 5.
_ISSUER_COLUMNS = (
    "ALTER TABLE certificates ADD COLUMN acme_directory TEXT",
    "ALTER TABLE certificates ADD COLUMN fallback_reason TEXT",
    "ALTER TABLE certificates ADD COLUMN acme_serial TEXT",
)

_FAILED_COLUMNS = (
    "id, idempotency_key, domain, method, target, headers_json, body, client, status, origin, "
    "received_at, logged_at, delivered_at"
)



def _failed_filters(since: datetime | None, until: datetime | None, domain: str | None, status: int | None,
                    delivered: bool | None) -> tuple[list[str], list[Any]]:
    """WHERE terms (constant SQL) and their parameters for the failed-request log filters."""
    where = ["1 = 1"]
    params: list[Any] = []
    if since is not None:
        where.append("received_at >= ?")
        params.append(_ts(since))
    if until is not None:
        where.append("received_at < ?")
        params.append(_ts(until))
    if domain is not None:
        where.append("domain = ?")
        params.append(domain)
    if status is not None:
        where.append("status = ?")
        params.append(status)
    if delivered is not None:
        where.append("delivered_at IS NOT NULL" if delivered else "delivered_at IS NULL")
    return where, params


_DOMAIN_COLUMNS = (
    "hostname, status, created_at, updated_at, error_code, error_message, next_attempt_at, attempts"
)
_CERT_COLUMNS = (
    "hostname, key_pem, chain_pem, not_before, not_after, serial, issuer, created_at, acme_directory, "
    "fallback_reason, acme_serial"
)

# os.umask is process-wide: serialize our brief changes of it.
_UMASK_LOCK = threading.Lock()

# Connections inherited through fork(): kept referenced so their finalizer never
# runs sqlite3_close() in the child (closing could checkpoint or unlink the WAL
# under the parent's feet). A handful of objects per fork.
_INHERITED: list[sqlite3.Connection] = []

_MAX_UTC = datetime.max.replace(tzinfo=timezone.utc)


# -- time encoding ---------------------------------------------------------------------


def _ts(value: datetime) -> str:
    """Encode an aware datetime as fixed-width UTC text (sorts like time)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: storage needs timezone-aware UTC times")
    utc = value.astimezone(timezone.utc).replace(tzinfo=None)
    # isoformat pads the year to 4 digits (strftime %Y does not on glibc).
    return utc.isoformat(timespec="microseconds") + "Z"


def _ts_opt(value: datetime | None) -> str | None:
    return None if value is None else _ts(value)


def _dt(text: str) -> datetime:
    if text.endswith("Z"):  # what _ts writes; fromisoformat makes it UTC-aware itself (3.11+)
        return datetime.fromisoformat(text)
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def _dt_opt(text: str | None) -> datetime | None:
    return None if text is None else _dt(text)


# -- row decoding ----------------------------------------------------------------------


def _domain(row: Any) -> DomainRecord:
    return DomainRecord(
        hostname=row[0],
        status=row[1],
        created_at=_dt(row[2]),
        updated_at=_dt(row[3]),
        error_code=row[4],
        error_message=row[5],
        next_attempt_at=_dt_opt(row[6]),
        attempts=row[7],
    )


def _certificate(row: Any) -> CertificateRecord:
    return CertificateRecord(
        hostname=row[0],
        key_pem=bytes(row[1]),
        chain_pem=bytes(row[2]),
        not_before=_dt(row[3]),
        not_after=_dt(row[4]),
        serial=row[5],
        issuer=row[6],
        created_at=_dt(row[7]),
        # Only when recorded for this very certificate: an older edgeproxy's upsert
        # renews the chain and serial without knowing these columns.
        acme_directory=(row[8] or "") if row[10] == row[5] else "",
        fallback_reason=(row[9] or "") if row[10] == row[5] else "",
    )


def _check_status(status: str) -> None:
    if status not in DOMAIN_STATUSES:
        raise ValueError(f"unknown domain status {status!r}; expected one of {DOMAIN_STATUSES}")


# -- error mapping ---------------------------------------------------------------------

_BUSY_NAMES = ("SQLITE_BUSY", "SQLITE_LOCKED")
_BUSY_TEXT = ("database is locked", "database table is locked")


def _is_busy(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name.startswith(_BUSY_NAMES) or any(t in str(exc) for t in _BUSY_TEXT)


def _map_error(exc: sqlite3.Error, action: str, path: str) -> StorageError:
    """Translate a sqlite3 exception into our tree (house rule 3)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    text = str(exc) or type(exc).__name__
    if _is_busy(exc):
        return StorageUnavailable(
            f"SQLite database {path} is busy, could not {action}: {text} (another "
            "process held the write lock longer than busy_timeout); retry later"
        )
    if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return StorageUnavailable(
            f"SQLite database {path} cannot be opened, could not {action}: {text}; "
            "check that the path is a file the edgeproxy user can read and write"
        )
    return StorageError(f"SQLite database {path}: could not {action}: {text}")


class SqliteStorage:
    """:class:`~edgeproxy.storage.base.Storage` on one local SQLite file.

    Thread-safe and multi-process-safe (see the module docstring for how).
    ``keep_changes`` is how many change-feed rows the opportunistic pruning keeps;
    ``busy_timeout`` (seconds) is how long a write waits for another writer before
    raising ``StorageUnavailable``.
    """

    #: Opportunistic pruning runs when a new change's seq is a multiple of this.
    PRUNE_EVERY = 256

    def __init__(self, path: str, *, keep_changes: int = 10_000, busy_timeout: float = 10.0,
                 purge_timeout: float = 60.0) -> None:
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ValueError(f"SqliteStorage needs a filesystem path, got {path!r}")
        if keep_changes < 0:
            raise ValueError("keep_changes must be >= 0")
        self.path = os.path.abspath(path)
        self._keep_changes = keep_changes
        self._busy_timeout = busy_timeout
        # How long remove_domain keeps retrying the checkpoint that takes a removed
        # key out of the WAL and the main file before it raises.
        self._purge_timeout = purge_timeout
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._pid = os.getpid()
        self._closed = False
        try:
            self._initialize()
        except BaseException:
            self.close()
            raise

    # -- connections -----------------------------------------------------------------

    def _initialize(self) -> None:
        """Create directory, file and schema (idempotent, safe against racing processes).

        Runs under a 077 umask, so nothing created here (directory, database,
        ``-wal``/``-shm``) is ever group- or world-readable; the umask is
        process-wide, hence the module lock and the short window."""
        with _UMASK_LOCK:
            old_umask = os.umask(0o077)
            try:
                self._create_file()
                self._create_schema(self._conn())
            finally:
                os.umask(old_umask)

    def _create_file(self) -> None:
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create the storage directory {directory}: {exc.strerror or exc}; "
                "create it (mode 0700, owned by the edgeproxy user) or set storage.url"
            ) from exc
        try:
            # Create the file ourselves so its mode is 0600 whatever the umask;
            # SQLite gives -wal/-shm the main file's permissions (os_unix.c).
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            tighten_sqlite(self.path)  # left wider by an older version or another tool
        except OSError as exc:
            raise StorageError(
                f"cannot create the database file {self.path}: {exc.strerror or exc}"
            ) from exc

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # journal_mode is persistent in the file: only the first opener changes it.
        # Switching needs an exclusive lock and SQLite returns SQLITE_BUSY at once
        # (no busy handler) while another process opens the same new file, so
        # retry ourselves until busy_timeout.
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.002
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.Error as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise _map_error(exc, "enable WAL journal mode", self.path) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        if str(mode).lower() != "wal":
            raise StorageError(
                f"could not enable WAL journal mode on {self.path} (got {mode!r}); "
                "the database must live on a local filesystem"
            )
        with self._write("create the schema") as tx:
            for statement in _SCHEMA_V1 + _FAILED_LOG_SCHEMA:
                tx.execute(statement)
            for statement in _SCHEMA_RENEW + _SCHEMA_INDEXES:
                tx.execute(statement)
            if not any(row[1] == "leaf_der" for row in tx.execute("PRAGMA table_info(certificates)")):
                tx.execute(_LEAF_DER_COLUMN)
            tx.execute(_LEAF_DER_TRIGGER)
            if not any(row[1] == "acme_directory" for row in tx.execute("PRAGMA table_info(certificates)")):
                for statement in _ISSUER_COLUMNS:
                    tx.execute(statement)
            version = tx.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            if version is None:
                tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise StorageError(
                    f"database {self.path} has schema version {version}, newer than the "
                    f"{SCHEMA_VERSION} this edgeproxy understands; upgrade edgeproxy"
                )
            # Migrations from older versions go here (none yet: 1 is the first).

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,  # sqlite3_busy_timeout
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # close() may run on another thread
            )
        except sqlite3.Error as exc:
            raise _map_error(exc, "open the database", self.path) from exc
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA secure_delete=ON")
        except sqlite3.Error as exc:
            conn.close()
            raise _map_error(exc, "configure the connection", self.path) from exc
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StorageError(f"storage {self.path} is closed")
        if self._pid != os.getpid():
            self._after_fork()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                alive = []
                for thread, other in self._conns:
                    if thread.is_alive():
                        alive.append((thread, other))
                    else:
                        other.close()
                alive.append((threading.current_thread(), conn))
                self._conns = alive
        return conn

    def _after_fork(self) -> None:
        # The lock may have been held by a thread that does not exist in the child.
        self._lock = threading.Lock()
        _INHERITED.extend(conn for _, conn in self._conns)
        self._conns = []
        self._local = threading.local()
        self._pid = os.getpid()

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """A BEGIN IMMEDIATE transaction; commits on success, rolls back on any exception."""
        with self._transaction("BEGIN IMMEDIATE", action) as conn:
            yield conn

    @contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        """A read transaction: every SELECT inside sees one snapshot."""
        with self._transaction("BEGIN", action) as conn:
            yield conn

    @contextmanager
    def _transaction(self, begin: str, action: str) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute(begin)
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the original exception matters more
                raise
        except sqlite3.Error as exc:
            raise _map_error(exc, action, self.path) from exc

    def _query_one(self, action: str, sql: str, params: tuple[Any, ...]) -> Any:
        conn = self._conn()
        try:
            return conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise _map_error(exc, action, self.path) from exc

    # -- domains -----------------------------------------------------------------------

    def add_domain(self, hostname: str, status: str, now: datetime) -> DomainRecord:
        """Insert a new domain. Raises ``DomainExists`` if it is already registered."""
        _check_status(status)
        stamp = _ts(now)
        with self._write(f"add domain {hostname}") as conn:
            if conn.execute("SELECT 1 FROM domains WHERE hostname = ?", (hostname,)).fetchone():
                raise DomainExists(f"{hostname} is already registered")
            row = conn.execute(
                f"INSERT INTO domains (hostname, status, created_at, updated_at, attempts) "
                f"VALUES (?, ?, ?, ?, 0) RETURNING {_DOMAIN_COLUMNS}",
                (hostname, status, stamp, stamp),
            ).fetchall()[0]  # fetchall: a RETURNING statement must finish before COMMIT
            self._append_change(conn, hostname)
        return _domain(row)

    def get_domain(self, hostname: str) -> DomainRecord | None:
        """The domain, or None when it is not registered."""
        row = self._query_one(
            f"read domain {hostname}",
            f"SELECT {_DOMAIN_COLUMNS} FROM domains WHERE hostname = ?",
            (hostname,),
        )
        return None if row is None else _domain(row)

    def list_domains(self) -> list[DomainRecord]:
        """All domains, ordered by hostname."""
        conn = self._conn()
        try:
            rows = conn.execute(f"SELECT {_DOMAIN_COLUMNS} FROM domains ORDER BY hostname").fetchall()
        except sqlite3.Error as exc:
            raise _map_error(exc, "list domains", self.path) from exc
        return [_domain(row) for row in rows]

    def due_domains(
        self, now: datetime, statuses: Sequence[str] | None = None, limit: int | None = None
    ) -> list[DomainRecord]:
        """Domains with ``next_attempt_at <= now`` (None is never due), with a status
        in ``statuses`` when given, the most overdue first (ties by hostname), at most
        ``limit``. A range scan of ``domains_next_attempt``: the fixed-width UTC text
        of ``_ts`` sorts like time, and NULLs sort before every text, outside the range."""
        sql = f"SELECT {_DOMAIN_COLUMNS} FROM domains WHERE next_attempt_at <= ?"
        params: list[Any] = [_ts(now)]
        if statuses is not None:
            if not statuses:
                return []
            # Placeholders only: the statuses themselves are parameters.
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            params.extend(statuses)
        sql += " ORDER BY next_attempt_at, hostname"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        conn = self._conn()
        try:
            rows = conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _map_error(exc, "list due domains", self.path) from exc
        return [_domain(row) for row in rows]

    def count_domains(self) -> int:
        """How many domains are registered."""
        row = self._query_one("count domains", "SELECT COUNT(*) FROM domains", ())
        return int(row[0])

    def domain_statuses(self) -> list[tuple[str, str]]:
        """``(hostname, status)`` of every domain, ordered by hostname."""
        conn = self._conn()
        try:
            rows = conn.execute("SELECT hostname, status FROM domains ORDER BY hostname").fetchall()
        except sqlite3.Error as exc:
            raise _map_error(exc, "list domain statuses", self.path) from exc
        return [(str(row[0]), str(row[1])) for row in rows]

    def count_domains_by_status(self) -> dict[str, int]:
        """status -> how many domains have it; statuses no domain has are absent."""
        conn = self._conn()
        try:
            rows = conn.execute("SELECT status, COUNT(*) FROM domains GROUP BY status").fetchall()
        except sqlite3.Error as exc:
            raise _map_error(exc, "count domains by status", self.path) from exc
        return {str(row[0]): int(row[1]) for row in rows}

    def domain_created_times_since(self, since: datetime) -> list[datetime]:
        """``created_at`` of the domains registered at or after ``since``, oldest first."""
        conn = self._conn()
        try:
            rows = conn.execute(
                "SELECT created_at FROM domains WHERE created_at >= ? ORDER BY created_at", (_ts(since),)
            ).fetchall()
        except sqlite3.Error as exc:
            raise _map_error(exc, "list recent registrations", self.path) from exc
        return [_dt(row[0]) for row in rows]

    def update_domain(
        self,
        hostname: str,
        now: datetime,
        *,
        status: str,
        error_code: str | None = None,
        error_message: str | None = None,
        next_attempt_at: datetime | None = None,
        attempts: int = 0,
    ) -> DomainRecord:
        """Replace the mutable fields. Raises ``DomainNotFound`` if absent."""
        _check_status(status)
        params = (status, _ts(now), error_code, error_message, _ts_opt(next_attempt_at), attempts)
        with self._write(f"update domain {hostname}") as conn:
            rows = conn.execute(
                "UPDATE domains SET status = ?, updated_at = ?, error_code = ?, "
                "error_message = ?, next_attempt_at = ?, attempts = ? "
                f"WHERE hostname = ? RETURNING {_DOMAIN_COLUMNS}",
                (*params, hostname),
            ).fetchall()
            if not rows:
                raise DomainNotFound(f"{hostname} is not registered")
            self._append_change(conn, hostname)
        return _domain(rows[0])

    def remove_domain(self, hostname: str) -> bool:
        """Delete the domain with its certificate, key and challenges in one
        transaction. Returns False (and changes nothing) if it was not registered."""
        with self._write(f"remove domain {hostname}") as conn:
            if not conn.execute("SELECT 1 FROM domains WHERE hostname = ?", (hostname,)).fetchone():
                return False
            conn.execute("DELETE FROM certificates WHERE hostname = ?", (hostname,))
            conn.execute("DELETE FROM challenges WHERE hostname = ?", (hostname,))
            conn.execute("DELETE FROM domains WHERE hostname = ?", (hostname,))
            conn.execute("DELETE FROM status_history WHERE hostname = ?", (hostname,))
            conn.execute("DELETE FROM ari_state WHERE hostname = ?", (hostname,))
            self._append_change(conn, hostname)
        self._purge(hostname)
        return True

    def _purge(self, hostname: str) -> None:
        """Checkpoint until the removed rows' bytes are gone from the disk.

        secure_delete zeroed the freed pages in the new WAL frames; a TRUNCATE
        checkpoint copies them over the main file's pages and empties the WAL,
        which still holds the old frames with the key and certificate. It reports
        busy (https://sqlite.org/pragma.html#pragma_wal_checkpoint: first result
        column) when a reader, e.g. another worker's certificate refresh, still
        used the WAL when busy_timeout ran out; then the bytes are still on disk,
        so we try again until ``purge_timeout``. Black-box runs found the deleted
        certificate in the main file in 2 of 3 deletes while the busy result was
        ignored. The removal itself is committed either way; failing
        to purge raises, so the caller does not report "gone" when it is not.
        """
        deadline = time.monotonic() + self._purge_timeout
        delay = 0.01
        what = f"purge the removed key and certificate of {hostname} from {self.path}"
        while True:
            try:
                row = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise _map_error(exc, what, self.path) from exc
                row = (1, -1, -1)
            if row is not None and row[0] == 0:
                return
            if time.monotonic() >= deadline:
                raise StorageUnavailable(
                    f"{hostname} was removed, but readers kept the WAL checkpoint busy for "
                    f"{self._purge_timeout:g}s, so its key and certificate bytes are still in {self.path}"
                    "-wal and its main file; the next removal's checkpoint retries the purge")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    # -- certificates ---------------------------------------------------------------------

    def save_certificate(self, cert: CertificateRecord) -> None:
        """Store key + chain + metadata atomically (a reader sees the old pair or
        the new pair, never a mix, even after a crash). Replaces any previous one.
        Raises ``DomainNotFound`` if the domain was removed meanwhile."""
        params = (
            cert.hostname,
            bytes(cert.key_pem),
            bytes(cert.chain_pem),
            _ts(cert.not_before),
            _ts(cert.not_after),
            cert.serial,
            cert.issuer,
            _ts(cert.created_at),
            cert.acme_directory or None,
            cert.fallback_reason or None,
            cert.serial if cert.acme_directory else None,
            leaf_der_of(cert.chain_pem),
        )
        with self._write(f"save the certificate of {cert.hostname}") as conn:
            if not conn.execute(
                "SELECT 1 FROM domains WHERE hostname = ?", (cert.hostname,)
            ).fetchone():
                raise DomainNotFound(f"{cert.hostname} is not registered (removed meanwhile?)")
            conn.execute(
                f"INSERT INTO certificates ({_CERT_COLUMNS}, leaf_der) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (hostname) DO UPDATE SET key_pem = excluded.key_pem, "
                "chain_pem = excluded.chain_pem, not_before = excluded.not_before, "
                "not_after = excluded.not_after, serial = excluded.serial, "
                "issuer = excluded.issuer, created_at = excluded.created_at, "
                "acme_directory = excluded.acme_directory, fallback_reason = excluded.fallback_reason, "
                "acme_serial = excluded.acme_serial, "
                "leaf_der = excluded.leaf_der",
                params,
            )
            self._append_change(conn, cert.hostname)

    def get_certificate(self, hostname: str) -> CertificateRecord | None:
        """The key + chain pair for ``hostname`` (one row, so never a mix), or None."""
        row = self._query_one(
            f"read the certificate of {hostname}",
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE hostname = ?",
            (hostname,),
        )
        return None if row is None else _certificate(row)

    def scan_certificates(self, hostnames: Sequence[str], visit: CertificateVisitor) -> set[str]:
        """Which of ``hostnames`` are registered; and, in the same snapshot,
        ``visit(hostname, key_pem, chain_pem, leaf_der, not_after, serial)`` for each
        of them that has a certificate, one row at a time (``leaf_der`` is None for
        rows saved without it: see ``CertificateVisitor``).

        Not part of the ``Storage`` protocol: the certstore uses it when present
        to load 100,000 names at start-up in one scan instead of two point
        queries per name, without ever holding every row (or a full
        ``CertificateRecord`` per name) in memory at once.
        """
        wanted = set(hostnames)
        registered: set[str] = set()
        if not wanted:
            return registered
        with self._read("read certificates in bulk") as conn:
            columns = "hostname, key_pem, chain_pem, leaf_der, not_after, serial"
            if len(wanted) > 500:  # most of the table: one scan beats many lookups
                registered = {row[0] for row in conn.execute("SELECT hostname FROM domains") if row[0] in wanted}
                cursor = conn.execute(f"SELECT {columns} FROM certificates")
            else:
                names = sorted(wanted)
                marks = ", ".join("?" * len(names))
                registered = {row[0] for row in conn.execute(
                    f"SELECT hostname FROM domains WHERE hostname IN ({marks})", names)}
                cursor = conn.execute(f"SELECT {columns} FROM certificates WHERE hostname IN ({marks})", names)
            for hostname, key_pem, chain_pem, leaf_der, not_after, serial in cursor:
                if hostname in registered:
                    visit(hostname, bytes(key_pem), bytes(chain_pem), leaf_der, _dt(not_after), serial)
        return registered

    # -- HTTP-01 challenges ---------------------------------------------------------------

    def put_challenge(self, challenge: ChallengeRecord) -> None:
        """Publish a token (idempotent: same token overwrites)."""
        params = (
            challenge.token,
            challenge.key_authorization,
            challenge.hostname,
            _ts(challenge.expires_at),
        )
        with self._write(f"publish challenge token for {challenge.hostname}") as conn:
            conn.execute(
                "INSERT INTO challenges (token, key_authorization, hostname, expires_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (token) DO UPDATE SET "
                "key_authorization = excluded.key_authorization, "
                "hostname = excluded.hostname, expires_at = excluded.expires_at",
                params,
            )

    def get_challenge(self, token: str) -> ChallengeRecord | None:
        """The token as published (expired or not: the caller compares with ``now``), or None."""
        row = self._query_one(
            "read a challenge token",
            "SELECT token, key_authorization, hostname, expires_at FROM challenges WHERE token = ?",
            (token,),
        )
        if row is None:
            return None
        return ChallengeRecord(
            token=row[0], key_authorization=row[1], hostname=row[2], expires_at=_dt(row[3])
        )

    def delete_challenge(self, token: str) -> None:
        """Idempotent."""
        with self._write("delete a challenge token") as conn:
            conn.execute("DELETE FROM challenges WHERE token = ?", (token,))

    # -- ACME accounts --------------------------------------------------------------------

    def get_account(self, directory_url: str) -> AccountRecord | None:
        """The account for ``directory_url``, or None."""
        row = self._query_one(
            "read the ACME account",
            "SELECT directory_url, key_pem, registration_json FROM accounts WHERE directory_url = ?",
            (directory_url,),
        )
        if row is None:
            return None
        return AccountRecord(directory_url=row[0], key_pem=bytes(row[1]), registration_json=row[2])

    def list_accounts(self) -> list[AccountRecord]:
        """Every stored account, ordered by directory URL."""
        conn = self._conn()
        try:
            rows = conn.execute(
                "SELECT directory_url, key_pem, registration_json FROM accounts ORDER BY directory_url"
            ).fetchall()
        except sqlite3.Error as exc:
            raise _map_error(exc, "list ACME accounts", self.path) from exc
        return [AccountRecord(r[0], bytes(r[1]), r[2]) for r in rows]

    def save_account(self, account: AccountRecord) -> None:
        """Insert or replace the account for ``account.directory_url``."""
        with self._write("save the ACME account") as conn:
            conn.execute(
                "INSERT INTO accounts (directory_url, key_pem, registration_json) VALUES (?, ?, ?) "
                "ON CONFLICT (directory_url) DO UPDATE SET key_pem = excluded.key_pem, "
                "registration_json = excluded.registration_json",
                (account.directory_url, bytes(account.key_pem), account.registration_json),
            )

    # -- change feed ----------------------------------------------------------------------

    def _append_change(self, conn: sqlite3.Connection, hostname: str) -> None:
        """Record a change inside the caller's write transaction."""
        seq = conn.execute("INSERT INTO changes (hostname) VALUES (?)", (hostname,)).lastrowid
        if seq is not None and self.PRUNE_EVERY > 0 and seq % self.PRUNE_EVERY == 0:
            self._prune(conn, self._keep_changes)

    @staticmethod
    def _newest(conn: sqlite3.Connection) -> tuple[int, int]:
        """(newest seq, pruned_through) in the caller's transaction."""
        row = conn.execute(
            "SELECT (SELECT MAX(seq) FROM changes), pruned_through FROM feed_state WHERE id = 1"
        ).fetchone()
        pruned_through = int(row[1])
        newest = pruned_through if row[0] is None else max(int(row[0]), pruned_through)
        return newest, pruned_through

    def _prune(self, conn: sqlite3.Connection, keep_last: int) -> int:
        newest, pruned_through = self._newest(conn)
        cutoff = newest - keep_last
        if cutoff <= pruned_through:
            return 0
        deleted = conn.execute("DELETE FROM changes WHERE seq <= ?", (cutoff,)).rowcount
        conn.execute("UPDATE feed_state SET pruned_through = ? WHERE id = 1", (cutoff,))
        return int(deleted)

    def prune_changes(self, keep_last: int) -> int:
        """Delete all but the newest ``keep_last`` change-feed rows; returns how many
        were deleted. Not part of the ``Storage`` protocol: pruning also happens on
        its own (every ``PRUNE_EVERY`` changes, keeping ``keep_changes``)."""
        if keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        with self._write("prune the change feed") as conn:
            return self._prune(conn, keep_last)

    def changes_since(self, seq: int) -> tuple[int, list[str]]:
        """Hostnames whose domain or certificate changed after ``seq``, and the
        newest seq. Workers poll this to refresh their in-memory maps; a
        hostname may appear more than once. ``changes_since(0)`` lists all.

        Incremental answers list hostnames in commit order. A full listing is
        returned instead when the reader cannot be answered incrementally:
        ``seq <= 0`` (first load), ``seq`` older than the pruned part of the feed
        (the reader fell behind a prune), or ``seq`` newer than the newest change
        (the database was replaced). A full listing is every registered hostname
        (sorted) followed by the hostnames of the retained changes newer than
        ``seq`` that are no longer registered, so recent removals still reach a
        reader that fell behind. A removal that was itself pruned before the
        reader saw it is not reported: keep ``keep_changes`` far above the
        number of changes between two polls, or resync with ``seq=0`` and drop
        what the full listing does not mention.
        """
        with self._read("read the change feed") as conn:
            newest, pruned_through = self._newest(conn)
            if 0 < seq <= newest and seq >= pruned_through:
                rows = conn.execute(
                    "SELECT hostname FROM changes WHERE seq > ? ORDER BY seq", (seq,)
                ).fetchall()
                return newest, [row[0] for row in rows]
            registered = [
                row[0]
                for row in conn.execute("SELECT hostname FROM domains ORDER BY hostname").fetchall()
            ]
            since = seq if 0 < seq <= newest else 0
            recent = conn.execute(
                "SELECT hostname FROM changes WHERE seq > ? ORDER BY seq", (since,)
            ).fetchall()
        seen = set(registered)
        hostnames = list(registered)
        for (hostname,) in recent:
            if hostname not in seen:
                seen.add(hostname)
                hostnames.append(hostname)
        return newest, hostnames

    # -- locks ----------------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl_seconds: float, now: datetime) -> bool:
        """Take or extend a lease. True if ``owner`` now holds ``name`` until
        ``now + ttl``; False if another owner holds an unexpired lease. An
        expired lease (crashed holder) is taken over.

        A lease is expired once ``now >= expires_at``."""
        stamp = _ts(now)
        try:
            expires = now + timedelta(seconds=ttl_seconds)
        except OverflowError:
            expires = _MAX_UTC
        with self._write(f"take lock {name}") as conn:
            # One statement: insert a free lease, or overwrite one that is ours or
            # expired; a live lease of another owner makes the WHERE false and
            # changes nothing. BEGIN IMMEDIATE already serializes writers.
            cursor = conn.execute(
                "INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                "WHERE locks.owner = excluded.owner OR locks.expires_at <= ?",
                (name, owner, _ts(expires), stamp),
            )
            return cursor.rowcount == 1

    def unlock(self, name: str, owner: str) -> None:
        """Release if held by ``owner``; otherwise do nothing."""
        with self._write(f"release lock {name}") as conn:
            conn.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))

    # == rate-budget ledger and status history =============================

    def record_event(self, kind: str, key: str, at: datetime) -> None:
        with self._write(f"record {kind} event") as conn:
            conn.execute("INSERT INTO budget_events (kind, key, at) VALUES (?, ?, ?)", (kind, key, _ts(at)))

    def events_since(self, kind: str, key: str, since: datetime) -> list[datetime]:
        conn = self._conn()
        try:
            rows = conn.execute(
                "SELECT at FROM budget_events WHERE kind = ? AND key = ? AND at >= ? ORDER BY at",
                (kind, key, _ts(since)),
            ).fetchall()
        except sqlite3.Error as exc:
            raise _map_error(exc, f"read {kind} events", self.path) from exc
        return [_dt(row[0]) for row in rows]

    def prune_events(self, before: datetime) -> int:
        with self._write("prune budget events") as conn:
            return conn.execute("DELETE FROM budget_events WHERE at < ?", (_ts(before),)).rowcount

    def add_status_event(self, event: StatusEvent) -> None:
        with self._write(f"record status of {event.hostname}") as conn:
            conn.execute(
                "INSERT INTO status_history (hostname, at, status, error_code, message) VALUES (?, ?, ?, ?, ?)",
                (event.hostname, _ts(event.at), event.status, event.error_code, event.message),
            )

    def status_history(self, hostname: str, limit: int = 100) -> list[StatusEvent]:
        conn = self._conn()
        try:
            rows = conn.execute(
                "SELECT hostname, at, status, error_code, message FROM status_history "
                "WHERE hostname = ? ORDER BY id DESC LIMIT ?",
                (hostname, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise _map_error(exc, f"read the status history of {hostname}", self.path) from exc
        return [StatusEvent(r[0], _dt(r[1]), r[2], r[3], r[4]) for r in rows]

    def save_ari(self, state: AriState) -> None:
        with self._write(f"save the ARI state of {state.hostname}") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO ari_state (hostname, serial, cert_id, renew_at, next_poll, checked_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (state.hostname, state.serial, state.cert_id, _ts_opt(state.renew_at), _ts(state.next_poll),
                 _ts(state.checked_at)),
            )

    def get_ari(self, hostname: str) -> AriState | None:
        row = self._query_one(
            f"read the ARI state of {hostname}",
            "SELECT hostname, serial, cert_id, renew_at, next_poll, checked_at FROM ari_state WHERE hostname = ?",
            (hostname,),
        )
        if row is None:
            return None
        return AriState(row[0], row[1], row[2], _dt_opt(row[3]), _dt(row[4]), _dt(row[5]))


    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection this instance opened in this process. Idempotent;
        any later call raises ``StorageError``."""
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            self._after_fork()
            return
        with self._lock:
            conns, self._conns = self._conns, []
        for _, conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    # -- failed-request log ----------------------------------------------------

    def log_failed_request(self, record: FailedRequestRecord) -> int:
        headers = json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in record.headers])
        with self._write(f"log failed request {record.idempotency_key}") as conn:
            conn.execute(
                f"INSERT INTO failed_requests ({_FAILED_COLUMNS.partition(', ')[2]}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (idempotency_key) DO UPDATE SET status = excluded.status, "
                "origin = excluded.origin, logged_at = excluded.logged_at",
                (record.idempotency_key, record.domain, record.method, record.target, headers,
                 record.body, record.client, record.status, record.origin, _ts(record.received_at),
                 _ts(record.logged_at), _ts_opt(record.delivered_at)),
            )
            row = conn.execute("SELECT id FROM failed_requests WHERE idempotency_key = ?",
                               (record.idempotency_key,)).fetchone()
            return int(row[0])

    def find_failed_requests(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        domain: str | None = None,
        status: int | None = None,
        delivered: bool | None = False,
        limit: int = 1000,
        after_id: int = 0,
    ) -> list[FailedRequestRecord]:
        where, params = _failed_filters(since, until, domain, status, delivered)
        where.append("id > ?")
        params.extend([after_id, limit])
        with self._read("find failed requests") as conn:
            rows = conn.execute(
                f"SELECT {_FAILED_COLUMNS} FROM failed_requests WHERE {' AND '.join(where)} "
                "ORDER BY id LIMIT ?", params,
            ).fetchall()
        return [
            FailedRequestRecord(
                id=row[0], idempotency_key=row[1], domain=row[2], method=row[3], target=row[4],
                headers=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(row[5])),
                body=bytes(row[6]), client=row[7], status=row[8], origin=row[9],
                received_at=_dt(row[10]), logged_at=_dt(row[11]), delivered_at=_dt_opt(row[12]),
            )
            for row in rows
        ]

    def count_failed_requests(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        domain: str | None = None,
        status: int | None = None,
        delivered: bool | None = False,
    ) -> int:
        where, params = _failed_filters(since, until, domain, status, delivered)
        row = self._query_one("count failed requests",
                              f"SELECT COUNT(*) FROM failed_requests WHERE {' AND '.join(where)}", tuple(params))
        return int(row[0])

    def mark_failed_delivered(self, ids: list[int], now: datetime) -> int:
        if not ids:
            return 0
        changed = 0
        with self._write("mark failed requests delivered") as conn:
            for start in range(0, len(ids), 500):  # stay under SQLite's parameter limit
                chunk = ids[start:start + 500]
                cursor = conn.execute(
                    f"UPDATE failed_requests SET delivered_at = ? WHERE delivered_at IS NULL "
                    f"AND id IN ({','.join('?' * len(chunk))})", [_ts(now), *chunk],
                )
                changed += cursor.rowcount
        return changed

    def prune_failed_requests(self, before: datetime) -> int:
        with self._write("prune failed requests") as conn:
            return int(conn.execute("DELETE FROM failed_requests WHERE logged_at < ?", (_ts(before),)).rowcount)


    def __enter__(self) -> SqliteStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
