"""The multi-node storage backend: one PostgreSQL database shared by every edge node.

Owns: the PostgreSQL schema and its versioned migrations, the connection pool
and transactions, the mapping of psycopg errors, the change feed's sequence
numbers and notifications. Every query and upsert of the ``Storage`` contract
is shared with SQLite in ``storage.sql`` (``?`` placeholders become ``%s``
here); the contract (concurrency, not-found, idempotency) lives in the
docstrings of ``base.py`` and is checked on both backends by
``tests/test_storage_contract.py``.
Must not import: ``acme``, ``httpx``, ``hypercorn``, or any other edgeproxy
module except ``errors`` and ``storage.base``/``storage.sql``.

Choices (and why):

- Driver: psycopg 3 with a ``psycopg_pool.ConnectionPool`` per process (never
  shared across ``fork()``: a child that inherits an instance opens its own
  pool). Connections run in autocommit; every multi-statement operation is an
  explicit ``conn.transaction()``. Statements are constants with ``%s``
  parameters: no hostname, token or key is ever formatted into SQL text.
- Reachability: checked-out connections are probed (``check_connection``), so a
  connection that died with a restarted server is replaced instead of failing a
  request. ``reconnect_timeout`` is short on purpose: psycopg_pool's reconnect
  backoff doubles without a cap, so after a long outage it could wait a minute
  before trying again; giving up early lets the next request start a fresh,
  immediate attempt. A request waits at most ``pool_timeout`` seconds for a
  connection and then raises ``StorageUnavailable`` (admin API: 503) while the
  hot path keeps serving from memory.
- Times: ``TIMESTAMPTZ`` (microsecond precision, the same instants as the
  SQLite backend); sessions run in UTC and values are returned as UTC. Naive
  datetimes are refused with ``ValueError``, like SQLite.
- Hostnames are ``TEXT COLLATE "C"``: byte order, so ``list_domains`` sorts
  exactly like SQLite whatever the database's locale.
- Change feed: ``changes(seq, hostname)`` written in the same transaction as the
  change. ``seq`` comes from ``feed_state.last_seq``, incremented under that
  row's lock, not from a sequence/BIGSERIAL: a sequence hands out numbers in
  call order, not commit order, so a reader could see seq 6 committed, move
  past it, and never see seq 5 that commits a moment later. With the row lock,
  seqs are assigned in commit order (the lock is released only after the commit
  is visible), never reused (the counter survives pruning), and gap-free.
  Domain writes are rare, so serializing them on one row costs nothing that
  matters. ``changes_since`` reads in one REPEATABLE READ snapshot and has the
  same semantics as SQLite's, including the full listing for a reader that fell
  behind a prune. Each change also sends ``NOTIFY`` on ``edgeproxy_changes:<hash of the schema>`` (delivered
  at commit); :meth:`PostgresStorage.wait_for_change` lets a poller wake at once
  instead of at its next tick. Polling stays the backstop.
- Locks: leases in a table (``locks``), taken or extended with one
  ``INSERT .. ON CONFLICT DO UPDATE .. WHERE owner = me OR expired``, so a
  crashed node's lease is taken over once it expires. ``now`` comes from the
  caller, so nodes need roughly synchronized clocks (NTP): a lease is honoured
  for ``ttl`` plus the clock skew between nodes. Advisory locks were not used:
  they belong to a session, and a pooled connection outlives the work it did.
- Migrations: ``schema_version`` plus an ordered list of migrations, applied in
  one transaction under an advisory lock keyed on the schema, so several nodes
  starting at once migrate exactly once and a failed migration leaves the
  previous version intact (PostgreSQL DDL is transactional).
- Deleting keys: PostgreSQL has no ``secure_delete``. A removed certificate's
  row is only marked dead; its bytes stay in the table's data files until
  VACUUM reclaims the space and new rows overwrite it, and they stay in WAL
  segments, archived WAL, base backups and replicas for as long as those are
  kept. Set ``storage.key_encryption_key_file`` on every node of a shared store:
  then only sealed blobs ever reach PostgreSQL, and a leftover copy is useless
  without the master key (``keys.open_store`` warns when it is not set).
- Errors: psycopg exceptions never escape. Connection failures, a server
  shutting down, pool timeouts, deadlocks and serialization failures map to
  ``StorageUnavailable`` (retry later); everything else to ``StorageError``.
  Messages name host, port and database, never the password.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors
import psycopg.sql
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from edgeproxy.errors import StorageError, StorageUnavailable
from edgeproxy.storage.sql import POSTGRES, Connection, Cursor, SqlStorage

__all__ = ["PostgresStorage", "SCHEMA_VERSION", "MIGRATIONS", "NOTIFY_CHANNEL"]

log = logging.getLogger("edgeproxy.storage.postgres")

NOTIFY_CHANNEL = "edgeproxy_changes"
# The channel is per schema: NOTIFY is database-wide, and two deployments (or
# test runs) sharing one database in different schemas must not wake each other.
# hashtext keeps it under PostgreSQL's 63-byte limit whatever the schema's name;
# a collision costs one extra poll, nothing more.
_CHANNEL_SQL = f"'{NOTIFY_CHANNEL}:' || hashtext(current_schema())"

# Ordered migrations: (version, statements). A database at version N gets every
# migration above N, in one transaction. Never edit a released migration: add one.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE domains (
                hostname        TEXT COLLATE "C" PRIMARY KEY,
                status          TEXT NOT NULL,
                created_at      TIMESTAMPTZ NOT NULL,
                updated_at      TIMESTAMPTZ NOT NULL,
                error_code      TEXT,
                error_message   TEXT,
                next_attempt_at TIMESTAMPTZ,
                attempts        INTEGER NOT NULL DEFAULT 0
            )""",
            # Key and chain in ONE row: a reader sees the old pair or the new pair.
            """CREATE TABLE certificates (
                hostname   TEXT COLLATE "C" PRIMARY KEY
                           REFERENCES domains(hostname) ON DELETE CASCADE,
                key_pem    BYTEA NOT NULL,
                chain_pem  BYTEA NOT NULL,
                not_before TIMESTAMPTZ NOT NULL,
                not_after  TIMESTAMPTZ NOT NULL,
                serial     TEXT NOT NULL,
                issuer     TEXT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL
            )""",
            # No foreign key: a token may be published for a name whose row is
            # being changed; remove_domain deletes a hostname's tokens explicitly.
            """CREATE TABLE challenges (
                token             TEXT PRIMARY KEY,
                key_authorization TEXT NOT NULL,
                hostname          TEXT COLLATE "C" NOT NULL,
                expires_at        TIMESTAMPTZ NOT NULL
            )""",
            "CREATE INDEX challenges_hostname ON challenges (hostname)",
            """CREATE TABLE accounts (
                directory_url     TEXT PRIMARY KEY,
                key_pem           BYTEA NOT NULL,
                registration_json TEXT NOT NULL
            )""",
            """CREATE TABLE changes (
                seq      BIGINT PRIMARY KEY,
                hostname TEXT COLLATE "C" NOT NULL
            )""",
            """CREATE TABLE feed_state (
                id             INTEGER PRIMARY KEY CHECK (id = 1),
                last_seq       BIGINT NOT NULL,
                pruned_through BIGINT NOT NULL
            )""",
            "INSERT INTO feed_state (id, last_seq, pruned_through) VALUES (1, 0, 0)",
            """CREATE TABLE locks (
                name       TEXT PRIMARY KEY,
                owner      TEXT NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL
            )""",
        ),
    ),
    (
        2,
        (
            # Rate-budget ledger, status history, ARI state.
            """CREATE TABLE budget_events (
                kind TEXT NOT NULL,
                key  TEXT NOT NULL,
                at   TIMESTAMPTZ NOT NULL
            )""",
            "CREATE INDEX budget_events_lookup ON budget_events (kind, key, at)",
            """CREATE TABLE status_history (
                id         BIGSERIAL PRIMARY KEY,
                hostname   TEXT COLLATE "C" NOT NULL,
                at         TIMESTAMPTZ NOT NULL,
                status     TEXT NOT NULL,
                error_code TEXT,
                message    TEXT
            )""",
            "CREATE INDEX status_history_host ON status_history (hostname, id)",
            """CREATE TABLE ari_state (
                hostname   TEXT COLLATE "C" PRIMARY KEY,
                serial     TEXT NOT NULL,
                cert_id    TEXT NOT NULL,
                renew_at   TIMESTAMPTZ,
                next_poll  TIMESTAMPTZ NOT NULL,
                checked_at TIMESTAMPTZ NOT NULL
            )""",
            # The failed-request log (every node writes to the shared one).
            """CREATE TABLE failed_requests (
                id              BIGSERIAL PRIMARY KEY,
                idempotency_key TEXT NOT NULL UNIQUE,
                domain          TEXT COLLATE "C" NOT NULL,
                method          TEXT NOT NULL,
                target          TEXT NOT NULL,
                headers_json    TEXT NOT NULL,
                body            BYTEA NOT NULL,
                client          TEXT,
                status          INTEGER NOT NULL,
                origin          TEXT NOT NULL,
                received_at     TIMESTAMPTZ NOT NULL,
                logged_at       TIMESTAMPTZ NOT NULL,
                delivered_at    TIMESTAMPTZ
            )""",
            "CREATE INDEX failed_requests_received ON failed_requests (received_at)",
            "CREATE INDEX failed_requests_logged ON failed_requests (logged_at)",
        ),
    ),
    (
        3,
        (
            # The renewal loop's due query (every few seconds) and the
            # registration limits, without reading every domain. hostname in the
            # first one lets ORDER BY next_attempt_at, hostname LIMIT n walk the index.
            "CREATE INDEX domains_next_attempt ON domains (next_attempt_at, hostname)",
            "CREATE INDEX domains_created ON domains (created_at)",
        ),
    ),
    (
        4,
        (
            # The leaf as DER next to the chain, written by save_certificate,
            # so loading 100,000 certificates at start-up decodes no PEM. NULL in
            # rows saved before (read by decoding the PEM). A node that still runs
            # older code (it opened the store before this migration) upserts the
            # chain without it: the trigger then clears the DER, so a renewed
            # chain is never served with the old leaf.
            "ALTER TABLE certificates ADD COLUMN leaf_der BYTEA",
            """CREATE FUNCTION certificates_leaf_der_stale() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                NEW.leaf_der := NULL;
                RETURN NEW;
            END $$""",
            """CREATE TRIGGER certificates_leaf_der_stale BEFORE UPDATE OF chain_pem ON certificates
            FOR EACH ROW WHEN (NEW.leaf_der IS NOT NULL AND NEW.leaf_der IS NOT DISTINCT FROM OLD.leaf_der
                               AND NEW.chain_pem IS DISTINCT FROM OLD.chain_pem)
            EXECUTE FUNCTION certificates_leaf_der_stale()""",
        ),
    ),
    (
        5,
        (
            # The monitor's state (storage.base.MonitorLedger): shared by every node,
            # so a second node or a restart never pages again for a firing alert.
            """CREATE TABLE monitor_alerts (
                key          TEXT PRIMARY KEY,
                kind         TEXT NOT NULL,
                severity     TEXT NOT NULL,
                summary      TEXT NOT NULL,
                details_json TEXT NOT NULL,
                since        TIMESTAMPTZ NOT NULL,
                last_sent    TIMESTAMPTZ NOT NULL
            )""",
            """CREATE TABLE probe_results (
                hostname             TEXT COLLATE "C" PRIMARY KEY REFERENCES domains(hostname) ON DELETE CASCADE,
                checked_at           TIMESTAMPTZ NOT NULL,
                ok                   BOOLEAN NOT NULL,
                result_json          TEXT NOT NULL,
                consecutive_failures INTEGER NOT NULL
            )""",
        ),
    ),
    (
        6,
        (
            # The lifecycle-webhook outbox (EventOutbox in storage/base.py).
            """CREATE TABLE event_outbox (
                seq             BIGSERIAL PRIMARY KEY,
                event_id        TEXT NOT NULL,
                endpoint        TEXT NOT NULL,
                event_type      TEXT NOT NULL,
                hostname        TEXT COLLATE "C" NOT NULL,
                occurred_at     TIMESTAMPTZ NOT NULL,
                payload         TEXT NOT NULL,
                state           TEXT NOT NULL,
                attempts        INTEGER NOT NULL DEFAULT 0,
                next_attempt_at TIMESTAMPTZ NOT NULL,
                horizon_from    TIMESTAMPTZ NOT NULL,
                claimed_by      TEXT,
                claimed_until   TIMESTAMPTZ,
                last_error      TEXT,
                last_status     INTEGER,
                delivered_at    TIMESTAMPTZ,
                UNIQUE (event_id, endpoint)
            )""",
            "CREATE INDEX event_outbox_line ON event_outbox (state, endpoint, hostname, seq)",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]



# TCP keepalives on every connection: a peer that vanished without a RST (a
# partition, a dead load balancer) is detected in about a minute instead of the
# kernel's ~15-minute retransmission timeout. Matters most for the LISTEN
# connection, which otherwise only ever waits.
_KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


# Errors that say "try again later" rather than "this is broken".
_TRANSIENT: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # connection refused/lost, server shutting down, ...
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,  # statement_timeout
)


def _describe_url(url: str) -> str:
    """``host:port/dbname`` of a PostgreSQL URL, for messages (never the password)."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "PostgreSQL (unparsable URL)"
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = str(params.get("port") or 5432)
    dbname = str(params.get("dbname") or params.get("user") or "")
    return f"PostgreSQL {host}:{port}/{dbname}"


class _Statements:
    """A psycopg connection that takes the shared statements' ``?`` placeholders."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor:
        return self.raw.execute(POSTGRES.sql(sql), params)

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> None:
        # psycopg pipelines the statements: one round trip for the batch, not one each.
        with self.raw.cursor() as cursor:
            cursor.executemany(POSTGRES.sql(sql), params)


class PostgresStorage(SqlStorage):
    """:class:`~edgeproxy.storage.base.Storage` on a PostgreSQL database.

    Thread-safe (a pool of up to ``max_connections`` connections per process)
    and safe for many processes and nodes at once. ``url`` is a libpq URI
    (``postgresql://user@host:5432/db?options=-csearch_path%3Dedge``). With
    ``migrate`` (the default; ``storage.auto_migrate``) the schema is created or
    brought up to date on open; without it, a schema older than this code
    raises ``StorageError`` telling the operator to run ``edgeproxy migrate``.
    ``keep_changes`` is how many change-feed rows opportunistic pruning keeps.
    """

    dialect = POSTGRES

    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        keep_changes: int = 10_000,
        min_connections: int = 1,
        max_connections: int = 8,
        pool_timeout: float = 3.0,
        connect_timeout: int = 3,
    ) -> None:
        if keep_changes < 0:
            raise ValueError("keep_changes must be >= 0")
        self.url = url
        self.where = _describe_url(url)
        self._keep_changes = keep_changes
        self._pool_args = (min_connections, max_connections, pool_timeout, connect_timeout)
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._listener: psycopg.Connection[Any] | None = None
        #: (version before, version after) of the migration run on open, if any.
        self.last_migration: tuple[int, int] = (SCHEMA_VERSION, SCHEMA_VERSION)
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StorageError(f"storage.url is not a valid PostgreSQL URL: {exc}") from exc
        self._pool = self._new_pool()
        try:
            if migrate:
                self.last_migration = self.migrate()
            else:
                self._require_current_schema()
        except BaseException:
            self.close()
            raise

    # -- connections -------------------------------------------------------------------

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        # UTC sessions: timestamps come back as UTC whatever the server's default.
        # statement_timeout: a wedged server must not hang a request forever.
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute("SET statement_timeout = '30s'")

    def _new_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        min_size, max_size, timeout, connect_timeout = self._pool_args
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            reconnect_timeout=max(timeout, 2.0),
            kwargs={"autocommit": True, "connect_timeout": connect_timeout, **_KEEPALIVES},
            configure=self._configure,
            check=ConnectionPool.check_connection,
            open=False,
            name=f"edgeproxy-{os.getpid()}",
        )
        try:
            # Do not wait for min_size connections: a server that is down right
            # now surfaces as StorageUnavailable from the first query instead.
            pool.open(wait=False)
        except psycopg.Error as exc:
            raise self._map(exc, "open the connection pool") from exc
        return pool

    def _current_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        if self._closed:
            raise StorageError(f"storage {self.where} is closed")
        if self._pid != os.getpid():
            # Inherited through fork(): the pool's threads do not exist here and
            # its sockets belong to the parent. Never touch them (nor the lock,
            # which a parent thread may have held at fork time); start afresh.
            # A forked child starts with one thread, so no lock is needed here.
            self._lock = threading.Lock()
            self._listener = None
            self._pool = self._new_pool()
            self._pid = os.getpid()
        return self._pool

    def _map(self, exc: BaseException, action: str) -> StorageError:
        """Translate a psycopg/pool exception into our tree (house rule 3)."""
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, PoolTimeout):
            return StorageUnavailable(
                f"{self.where} is unreachable, could not {action}: no connection within "
                f"{self._pool_args[2]:g}s ({text}); retry later"
            )
        if isinstance(exc, PoolClosed):
            return StorageError(f"storage {self.where} is closed")
        if isinstance(exc, _TRANSIENT):
            return StorageUnavailable(f"{self.where} is unavailable, could not {action}: {text}; retry later")
        return StorageError(f"{self.where}: could not {action}: {text}")

    @contextmanager
    def _conn(self, action: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in autocommit; psycopg errors leave as ours."""
        pool = self._current_pool()
        try:
            with pool.connection() as conn:
                yield conn
        except (psycopg.Error, PoolTimeout, PoolClosed) as exc:
            raise self._map(exc, action) from exc

    @contextmanager
    def _tx(self, action: str, *, snapshot: bool = False) -> Iterator[psycopg.Connection[Any]]:
        """One transaction; commits on success, rolls back on any exception.
        ``snapshot``: a read-only REPEATABLE READ transaction (one consistent view)."""
        with self._conn(action) as conn:
            with conn.transaction():
                if snapshot:
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield conn

    # -- the hooks of storage.sql ------------------------------------------------------

    @contextmanager
    def _write(self, action: str) -> Iterator[Connection]:
        with self._tx(action) as conn:
            yield _Statements(conn)

    @contextmanager
    def _read(self, action: str) -> Iterator[Connection]:
        with self._tx(action, snapshot=True) as conn:
            yield _Statements(conn)

    @contextmanager
    def _query(self, action: str) -> Iterator[Connection]:
        with self._conn(action) as conn:
            yield _Statements(conn)

    def _append_change(self, conn: Connection, hostname: str) -> None:
        """Record a change inside the caller's transaction (see the module
        docstring for why the seq comes from a locked counter row)."""
        row = conn.execute(
            "UPDATE feed_state SET last_seq = last_seq + 1 WHERE id = 1 RETURNING last_seq"
        ).fetchone()
        if row is None:
            raise StorageError(f"{self.where}: the feed_state row is missing; run `edgeproxy migrate`")
        seq = int(row[0])
        conn.execute("INSERT INTO changes (seq, hostname) VALUES (?, ?)", (seq, hostname))
        # Delivered at COMMIT, and only if it commits; the payload is informative.
        conn.execute(f"SELECT pg_notify({_CHANNEL_SQL}, ?)", (str(seq),))
        self._prune_after(conn, seq)

    def _feed_position(self, conn: Connection) -> tuple[int, int]:
        row = conn.execute("SELECT last_seq, pruned_through FROM feed_state WHERE id = 1").fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def _lock_feed(self, conn: Connection) -> None:
        conn.execute("SELECT 1 FROM feed_state WHERE id = 1 FOR UPDATE")

    def _stream(self, conn: Connection, sql: str, params: Sequence[Any]) -> Iterator[Any]:
        """A server-side cursor, 256 rows a round trip: 100,000 certificates are
        never in the client's memory at once."""
        assert isinstance(conn, _Statements)
        with conn.raw.cursor(name="edgeproxy_stream") as cursor:
            cursor.itersize = 256
            cursor.execute(POSTGRES.sql(sql), params)
            yield from cursor

    # -- schema ------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The schema version of the database (0 when it has none yet)."""
        with self._tx("read the schema version") as conn:
            return self._version(conn)

    @staticmethod
    def _version(conn: psycopg.Connection[Any]) -> int:
        exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return 0
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    def _require_current_schema(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise self._too_new(version)
        if version < SCHEMA_VERSION:
            raise StorageError(
                f"{self.where} has schema version {version}, this edgeproxy needs "
                f"{SCHEMA_VERSION}; run `edgeproxy migrate` (storage.auto_migrate is off)"
            )

    def _too_new(self, version: int) -> StorageError:
        return StorageError(
            f"{self.where} has schema version {version}, newer than the {SCHEMA_VERSION} "
            "this edgeproxy understands; upgrade edgeproxy"
        )

    def migrate(self) -> tuple[int, int]:
        """Bring the schema up to :data:`SCHEMA_VERSION`; returns (before, after).

        Idempotent and safe when several nodes start at once: one transaction,
        under an advisory lock keyed on the current schema, so migrations run
        exactly once and all-or-nothing."""
        with self._tx("migrate the schema") as conn:
            row = conn.execute("SELECT current_schema()").fetchone()
            if row is None or row[0] is None:
                raise StorageError(
                    f"{self.where}: no schema to create tables in (the search_path names "
                    "no existing schema); create it or fix the options in storage.url"
                )
            # Serializes concurrent migrators of this schema until COMMIT.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('edgeproxy-migrate:' || current_schema()))")
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            before = self._version(conn)
            if before > SCHEMA_VERSION:
                raise self._too_new(before)
            for version, statements in MIGRATIONS:
                if version <= before:
                    continue
                for statement in statements:
                    conn.execute(statement)
                log.info("%s: applied schema migration %d", self.where, version)
            if before < SCHEMA_VERSION:
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
        return before, SCHEMA_VERSION

    def wait_for_change(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a change notification from any node.

        True when one arrived (call ``changes_since`` now), False on timeout.
        Not part of the ``Storage`` protocol: pollers use it when present to
        propagate changes at once, and keep polling as the backstop. Uses one
        dedicated LISTEN connection (not from the pool); raises
        ``StorageUnavailable`` when the server cannot be reached."""
        try:
            conn = self._listen_connection()
            # stop_after=1: wake on the first one; any others still buffered make
            # the next call return at once, which costs one extra poll at most.
            return any(True for _ in conn.notifies(timeout=max(timeout, 0.0), stop_after=1))
        except psycopg.Error as exc:
            self._drop_listener()
            raise self._map(exc, "wait for change notifications") from exc

    def _listen_connection(self) -> psycopg.Connection[Any]:
        self._current_pool()  # closed / forked checks
        with self._lock:
            conn = self._listener
            if conn is None or conn.closed:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self._pool_args[3], **_KEEPALIVES)
                row = conn.execute(f"SELECT {_CHANNEL_SQL}").fetchone()
                assert row is not None  # a SELECT of an expression returns one row
                conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(row[0])))
                self._listener = conn
            return conn

    def _drop_listener(self) -> None:
        with self._lock:
            conn, self._listener = self._listener, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error as exc:  # it is broken already; nothing to save
                log.debug("closing the LISTEN connection: %s", exc)

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the pool (and the LISTEN connection). Idempotent; any later call
        raises ``StorageError``."""
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            return  # inherited: the parent owns those connections
        self._drop_listener()
        try:
            self._pool.close(timeout=5.0)
        except psycopg.Error as exc:  # closing a pool to a dead server: nothing left to do
            log.debug("closing the pool of %s: %s", self.where, exc)
