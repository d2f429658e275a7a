"""The default storage backend: one SQLite file on local disk.

Owns: the SQLite schema (version 1) and its creation, the mapping of
``sqlite3`` errors to ours, the change feed's
sequence numbers and the purge of removed keys. Every query and upsert of the
``Storage`` contract is shared with PostgreSQL in ``storage.sql``; the contract
(concurrency, not-found, idempotency) lives in the docstrings of ``base.py`` and
is checked on both backends by ``tests/test_storage_contract.py``.
Must not import: ``acme``, ``httpx``, ``hypercorn``, or any other edgeproxy
module except ``errors``, ``private_files`` and ``storage.sql``/``storage.sqlitefile``.

Choices (and why):

- Connections, WAL (``synchronous=FULL``), ``BEGIN IMMEDIATE`` writes and fork
  safety come from ``storage.sqlitefile``, the one SQLite engine (the spool file
  uses it too); this file adds ``foreign_keys`` and ``secure_delete``.
- Privacy: private keys live in this file. It is created 0600 inside a 0700
  directory (under a 077 umask as well); SQLite creates ``-wal``/``-shm`` with
  the permissions of the main file. ``secure_delete=ON`` zeroes deleted rows and
  ``remove_domain`` checkpoints the WAL (TRUNCATE), retrying while readers keep
  it busy, so a removed key does not linger in free pages or old WAL frames; if
  it cannot complete within ``purge_timeout`` it raises. Existing files wider
  than 0600 are tightened at open (``private_files``).
- Times: UTC ISO-8601 text with microseconds, fixed width
  (``2025-01-02T03:04:05.000006Z``, ``storage.sql.SQLITE``), so values
  round-trip exactly and sort lexicographically (the lock expiry comparison
  happens in SQL). Naive datetimes are refused with ``ValueError``.
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

import os
import sqlite3
import threading
import time
from contextlib import AbstractContextManager

from edgeproxy.errors import StorageError, StorageUnavailable
from edgeproxy.private_files import tighten_sqlite
from edgeproxy.storage.sql import SQLITE, Connection, SqlStorage
from edgeproxy.storage.sqlitefile import SqliteFile, is_busy

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
# The monitor's state (storage.base.MonitorLedger), additive like the tables above.
_MONITOR_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS monitor_alerts (
        key          TEXT PRIMARY KEY,
        kind         TEXT NOT NULL,
        severity     TEXT NOT NULL,
        summary      TEXT NOT NULL,
        details_json TEXT NOT NULL,
        since        TEXT NOT NULL,
        last_sent    TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS probe_results (
        hostname             TEXT PRIMARY KEY REFERENCES domains(hostname) ON DELETE CASCADE,
        checked_at           TEXT NOT NULL,
        ok                   INTEGER NOT NULL,
        result_json          TEXT NOT NULL,
        consecutive_failures INTEGER NOT NULL
    )""",
)
# The lifecycle-webhook outbox (storage.base.EventOutbox), additive like the tables above.
_SCHEMA_OUTBOX = (
    """CREATE TABLE IF NOT EXISTS event_outbox (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id        TEXT NOT NULL,
        endpoint        TEXT NOT NULL,
        event_type      TEXT NOT NULL,
        hostname        TEXT NOT NULL,
        occurred_at     TEXT NOT NULL,
        payload         TEXT NOT NULL,
        state           TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        horizon_from    TEXT NOT NULL,
        claimed_by      TEXT,
        claimed_until   TEXT,
        last_error      TEXT,
        last_status     INTEGER,
        delivered_at    TEXT,
        UNIQUE (event_id, endpoint)
    )""",
    "CREATE INDEX IF NOT EXISTS event_outbox_line ON event_outbox(state, endpoint, hostname, seq)",
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

# os.umask is process-wide: serialize our brief changes of it.
_UMASK_LOCK = threading.Lock()

# -- error mapping ---------------------------------------------------------------------

def _map_error(exc: sqlite3.Error, action: str, path: str) -> StorageError:
    """Translate a sqlite3 exception into our tree (house rule 3)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    text = str(exc) or type(exc).__name__
    if is_busy(exc):
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


class SqliteStorage(SqlStorage):
    """:class:`~edgeproxy.storage.base.Storage` on one local SQLite file.

    Thread-safe and multi-process-safe (see the module docstring for how).
    ``keep_changes`` is how many change-feed rows the opportunistic pruning keeps;
    ``busy_timeout`` (seconds) is how long a write waits for another writer before
    raising ``StorageUnavailable``.
    """

    dialect = SQLITE

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
        self._file = SqliteFile(
            self.path, busy_timeout=busy_timeout,
            pragmas=("synchronous=FULL", "foreign_keys=ON", "secure_delete=ON"),
            map_error=lambda exc, action: _map_error(exc, action, self.path),
            closed=lambda: StorageError(f"storage {self.path} is closed"),
        )
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
                self._file.enable_wal()
                self._create_schema()
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

    def _create_schema(self) -> None:
        with self._write("create the schema") as tx:
            for statement in _SCHEMA_V1 + _FAILED_LOG_SCHEMA:
                tx.execute(statement)
            for statement in _SCHEMA_RENEW + _SCHEMA_INDEXES + _MONITOR_SCHEMA + _SCHEMA_OUTBOX:
                tx.execute(statement)
            if not any(row[1] == "leaf_der" for row in tx.execute("PRAGMA table_info(certificates)")):
                tx.execute(_LEAF_DER_COLUMN)
            tx.execute(_LEAF_DER_TRIGGER)
            version = tx.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            if version is None:
                tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise StorageError(
                    f"database {self.path} has schema version {version}, newer than the "
                    f"{SCHEMA_VERSION} this edgeproxy understands; upgrade edgeproxy"
                )
            # Migrations from older versions go here (none yet: 1 is the first).

    # -- the hooks of storage.sql ------------------------------------------------------

    def _write(self, action: str) -> AbstractContextManager[sqlite3.Connection]:
        return self._file.write(action)

    def _read(self, action: str) -> AbstractContextManager[sqlite3.Connection]:
        return self._file.read(action)

    def _query(self, action: str) -> AbstractContextManager[sqlite3.Connection]:
        return self._file.query(action)

    # -- change feed: AUTOINCREMENT seqs, assigned under the single writer lock ---------

    def _append_change(self, conn: Connection, hostname: str) -> None:
        """Record a change inside the caller's write transaction."""
        cursor = conn.execute("INSERT INTO changes (hostname) VALUES (?) RETURNING seq", (hostname,))
        self._prune_after(conn, int(cursor.fetchall()[0][0]))

    def _feed_position(self, conn: Connection) -> tuple[int, int]:
        row = conn.execute(
            "SELECT (SELECT MAX(seq) FROM changes), pruned_through FROM feed_state WHERE id = 1"
        ).fetchone()
        pruned_through = int(row[1])
        newest = pruned_through if row[0] is None else max(int(row[0]), pruned_through)
        return newest, pruned_through

    def _after_remove(self, hostname: str) -> None:
        self._purge(hostname)


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
                row = self._file.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as exc:
                if not is_busy(exc):
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

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection this instance opened in this process. Idempotent;
        any later call raises ``StorageError``."""
        self._file.close()
