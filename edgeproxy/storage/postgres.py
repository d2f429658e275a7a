"""The multi-node storage backend: one PostgreSQL database shared by every edge node.

Owns: the PostgreSQL schema, its versioned migrations, and every SQL statement of
the shared backend. Implements :class:`edgeproxy.storage.base.Storage` exactly;
the contract (concurrency, not-found, idempotency) lives in the docstrings of
``base.py`` and is checked by ``tests/test_storage_contract.py``, which runs the
same tests against this backend and SQLite.
Must not import: ``acme``, ``httpx``, ``hypercorn``, or any other edgeproxy
module except ``errors`` and ``storage.base``.

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

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors
import psycopg.sql
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from edgeproxy.errors import DomainExists, DomainNotFound, StorageError, StorageUnavailable
from edgeproxy.storage.base import (
    DOMAIN_STATUSES,
    AccountRecord,
    AriState,
    CertificateRecord,
    CertificateVisitor,
    ChallengeRecord,
    DomainRecord,
    FailedRequestRecord,
    StatusEvent,
    leaf_der_of,
)

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
            # Which configured ACME CA issued a certificate and why not the
            # preferred one (issuer fallback), and the serial they were recorded
            # for: a node still on older code upserts a renewed chain without
            # them, and a serial that no longer matches reads as "unknown". The
            # same statements as sqlite.py's _ISSUER_COLUMNS.
            "ALTER TABLE certificates ADD COLUMN acme_directory TEXT",
            "ALTER TABLE certificates ADD COLUMN fallback_reason TEXT",
            "ALTER TABLE certificates ADD COLUMN acme_serial TEXT",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]

_DOMAIN_COLUMNS = (
    "hostname, status, created_at, updated_at, error_code, error_message, next_attempt_at, attempts"
)
_CERT_COLUMNS = (
    "hostname, key_pem, chain_pem, not_before, not_after, serial, issuer, created_at, acme_directory, "
    "fallback_reason, acme_serial"
)

_FAILED_COLUMNS = (
    "id, idempotency_key, domain, method, target, headers_json, body, client, status, origin, "
    "received_at, logged_at, delivered_at"
)

_MAX_UTC = datetime.max.replace(tzinfo=timezone.utc)

# TCP keepalives on every connection: a peer that vanished without a RST (a
# partition, a dead load balancer) is detected in about a minute instead of the
# kernel's ~15-minute retransmission timeout. Matters most for the LISTEN
# connection, which otherwise only ever waits.
_KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def _failed_filters(since: datetime | None, until: datetime | None, domain: str | None, status: int | None,
                    delivered: bool | None) -> tuple[list[str], list[Any]]:
    """WHERE terms (constant SQL fragments) and their parameters for the failed-request log."""
    where = ["TRUE"]
    params: list[Any] = []
    if since is not None:
        where.append("received_at >= %s")
        params.append(_ts(since))
    if until is not None:
        where.append("received_at < %s")
        params.append(_ts(until))
    if domain is not None:
        where.append("domain = %s")
        params.append(domain)
    if status is not None:
        where.append("status = %s")
        params.append(status)
    if delivered is not None:
        where.append("delivered_at IS NOT NULL" if delivered else "delivered_at IS NULL")
    return where, params

# Errors that say "try again later" rather than "this is broken".
_TRANSIENT: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # connection refused/lost, server shutting down, ...
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,  # statement_timeout
)


def _ts(value: datetime) -> datetime:
    """An aware datetime, as UTC (naive ones are refused: the contract is tz-aware UTC)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: storage needs timezone-aware UTC times")
    return value.astimezone(timezone.utc)


def _ts_opt(value: datetime | None) -> datetime | None:
    return None if value is None else _ts(value)


def _utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


def _utc_opt(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def _domain(row: Any) -> DomainRecord:
    return DomainRecord(
        hostname=row[0],
        status=row[1],
        created_at=_utc(row[2]),
        updated_at=_utc(row[3]),
        error_code=row[4],
        error_message=row[5],
        next_attempt_at=_utc_opt(row[6]),
        attempts=row[7],
    )


def _certificate(row: Any) -> CertificateRecord:
    return CertificateRecord(
        hostname=row[0],
        key_pem=bytes(row[1]),
        chain_pem=bytes(row[2]),
        not_before=_utc(row[3]),
        not_after=_utc(row[4]),
        serial=row[5],
        issuer=row[6],
        created_at=_utc(row[7]),
        # Only when recorded for this very certificate: an older edgeproxy's upsert
        # renews the chain and serial without knowing these columns.
        acme_directory=(row[8] or "") if row[10] == row[5] else "",
        fallback_reason=(row[9] or "") if row[10] == row[5] else "",
    )


def _check_status(status: str) -> None:
    if status not in DOMAIN_STATUSES:
        raise ValueError(f"unknown domain status {status!r}; expected one of {DOMAIN_STATUSES}")


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


class PostgresStorage:
    """:class:`~edgeproxy.storage.base.Storage` on a PostgreSQL database.

    Thread-safe (a pool of up to ``max_connections`` connections per process)
    and safe for many processes and nodes at once. ``url`` is a libpq URI
    (``postgresql://user@host:5432/db?options=-csearch_path%3Dedge``). With
    ``migrate`` (the default; ``storage.auto_migrate``) the schema is created or
    brought up to date on open; without it, a schema older than this code
    raises ``StorageError`` telling the operator to run ``edgeproxy migrate``.
    ``keep_changes`` is how many change-feed rows opportunistic pruning keeps.
    """

    #: Opportunistic pruning runs when a new change's seq is a multiple of this.
    PRUNE_EVERY = 256

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

    def _one(self, action: str, sql: str, params: tuple[Any, ...]) -> Any:
        with self._conn(action) as conn:
            return conn.execute(sql, params).fetchone()

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

    # -- domains -----------------------------------------------------------------------

    def add_domain(self, hostname: str, status: str, now: datetime) -> DomainRecord:
        """Insert a new domain. Raises ``DomainExists`` if it is already registered."""
        _check_status(status)
        stamp = _ts(now)
        with self._tx(f"add domain {hostname}") as conn:
            row = conn.execute(
                f"INSERT INTO domains (hostname, status, created_at, updated_at, attempts) "
                f"VALUES (%s, %s, %s, %s, 0) ON CONFLICT (hostname) DO NOTHING "
                f"RETURNING {_DOMAIN_COLUMNS}",
                (hostname, status, stamp, stamp),
            ).fetchone()
            if row is None:
                raise DomainExists(f"{hostname} is already registered")
            self._append_change(conn, hostname)
        return _domain(row)

    def get_domain(self, hostname: str) -> DomainRecord | None:
        """The domain, or None when it is not registered."""
        row = self._one(
            f"read domain {hostname}",
            f"SELECT {_DOMAIN_COLUMNS} FROM domains WHERE hostname = %s",
            (hostname,),
        )
        return None if row is None else _domain(row)

    def list_domains(self) -> list[DomainRecord]:
        """All domains, ordered by hostname (byte order, like SQLite)."""
        with self._conn("list domains") as conn:
            rows = conn.execute(f"SELECT {_DOMAIN_COLUMNS} FROM domains ORDER BY hostname").fetchall()
        return [_domain(row) for row in rows]

    def due_domains(
        self, now: datetime, statuses: Sequence[str] | None = None, limit: int | None = None
    ) -> list[DomainRecord]:
        """Domains with ``next_attempt_at <= now`` (NULL is never due), with a status
        in ``statuses`` when given, the most overdue first (ties by hostname, byte
        order), at most ``limit``. A range scan of ``domains_next_attempt``."""
        sql = f"SELECT {_DOMAIN_COLUMNS} FROM domains WHERE next_attempt_at <= %s"
        params: list[Any] = [_ts(now)]
        if statuses is not None:
            if not statuses:
                return []
            sql += " AND status = ANY(%s)"  # one array parameter
            params.append(list(statuses))
        sql += " ORDER BY next_attempt_at, hostname"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(max(0, limit))
        with self._conn("list due domains") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_domain(row) for row in rows]

    def count_domains(self) -> int:
        """How many domains are registered."""
        row = self._one("count domains", "SELECT COUNT(*) FROM domains", ())
        return int(row[0])

    def domain_statuses(self) -> list[tuple[str, str]]:
        """``(hostname, status)`` of every domain, ordered by hostname (byte order, like SQLite)."""
        with self._conn("list domain statuses") as conn:
            rows = conn.execute("SELECT hostname, status FROM domains ORDER BY hostname").fetchall()
        return [(str(row[0]), str(row[1])) for row in rows]

    def count_domains_by_status(self) -> dict[str, int]:
        """status -> how many domains have it; statuses no domain has are absent."""
        with self._conn("count domains by status") as conn:
            rows = conn.execute("SELECT status, COUNT(*) FROM domains GROUP BY status").fetchall()
        return {str(row[0]): int(row[1]) for row in rows}

    def domain_created_times_since(self, since: datetime) -> list[datetime]:
        """``created_at`` of the domains registered at or after ``since``, oldest first."""
        with self._conn("list recent registrations") as conn:
            rows = conn.execute(
                "SELECT created_at FROM domains WHERE created_at >= %s ORDER BY created_at", (_ts(since),)
            ).fetchall()
        return [_utc(row[0]) for row in rows]

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
        with self._tx(f"update domain {hostname}") as conn:
            row = conn.execute(
                "UPDATE domains SET status = %s, updated_at = %s, error_code = %s, "
                "error_message = %s, next_attempt_at = %s, attempts = %s "
                f"WHERE hostname = %s RETURNING {_DOMAIN_COLUMNS}",
                (*params, hostname),
            ).fetchone()
            if row is None:
                raise DomainNotFound(f"{hostname} is not registered")
            self._append_change(conn, hostname)
        return _domain(row)

    def remove_domain(self, hostname: str) -> bool:
        """Delete the domain with its certificate, key and challenges in one
        transaction. Returns False (and changes nothing) if it was not registered.

        The key's bytes are not overwritten on disk (no secure_delete in
        PostgreSQL): see the module docstring and seal keys on shared stores."""
        with self._tx(f"remove domain {hostname}") as conn:
            gone = conn.execute(
                "DELETE FROM domains WHERE hostname = %s RETURNING hostname", (hostname,)
            ).fetchone()
            if gone is None:
                return False
            # The certificate goes by ON DELETE CASCADE; said again for clarity.
            conn.execute("DELETE FROM certificates WHERE hostname = %s", (hostname,))
            conn.execute("DELETE FROM challenges WHERE hostname = %s", (hostname,))
            conn.execute("DELETE FROM status_history WHERE hostname = %s", (hostname,))
            conn.execute("DELETE FROM ari_state WHERE hostname = %s", (hostname,))
            self._append_change(conn, hostname)
        return True

    # -- certificates ------------------------------------------------------------------

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
        with self._tx(f"save the certificate of {cert.hostname}") as conn:
            # FOR KEY SHARE: a concurrent remove_domain waits for this commit (and
            # then deletes the certificate too) instead of racing past it.
            if conn.execute(
                "SELECT 1 FROM domains WHERE hostname = %s FOR KEY SHARE", (cert.hostname,)
            ).fetchone() is None:
                raise DomainNotFound(f"{cert.hostname} is not registered (removed meanwhile?)")
            conn.execute(
                f"INSERT INTO certificates ({_CERT_COLUMNS}, leaf_der) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
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
        row = self._one(
            f"read the certificate of {hostname}",
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE hostname = %s",
            (hostname,),
        )
        return None if row is None else _certificate(row)

    def scan_certificates(self, hostnames: Sequence[str], visit: CertificateVisitor) -> set[str]:
        """Which of ``hostnames`` are registered; and, in the same snapshot,
        ``visit(hostname, key_pem, chain_pem, leaf_der, not_after, serial)`` for each
        of them that has a certificate, one row at a time (``leaf_der`` is None for
        rows saved without it: see ``CertificateVisitor``).

        Not part of the ``Storage`` protocol (the certstore uses it when present,
        ): one array parameter instead of a query per name, and a
        server-side cursor, so 100,000 certificates are never in memory at once."""
        names = sorted(set(hostnames))
        if not names:
            return set()
        with self._tx("read certificates in bulk", snapshot=True) as conn:
            registered = {
                row[0] for row in conn.execute("SELECT hostname FROM domains WHERE hostname = ANY(%s)", (names,))
            }
            with conn.cursor(name="edgeproxy_scan_certificates") as cursor:
                cursor.itersize = 256
                cursor.execute(
                    "SELECT hostname, key_pem, chain_pem, leaf_der, not_after, serial FROM certificates "
                    "WHERE hostname = ANY(%s)", (names,),
                )
                for hostname, key_pem, chain_pem, leaf_der, not_after, serial in cursor:
                    if hostname in registered:
                        visit(hostname, bytes(key_pem), bytes(chain_pem), None if leaf_der is None else bytes(leaf_der),
                              _utc(not_after), serial)
        return registered

    # -- HTTP-01 challenges ------------------------------------------------------------

    def put_challenge(self, challenge: ChallengeRecord) -> None:
        """Publish a token (idempotent: same token overwrites)."""
        params = (
            challenge.token,
            challenge.key_authorization,
            challenge.hostname,
            _ts(challenge.expires_at),
        )
        with self._conn(f"publish challenge token for {challenge.hostname}") as conn:
            conn.execute(
                "INSERT INTO challenges (token, key_authorization, hostname, expires_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (token) DO UPDATE SET "
                "key_authorization = excluded.key_authorization, "
                "hostname = excluded.hostname, expires_at = excluded.expires_at",
                params,
            )

    def get_challenge(self, token: str) -> ChallengeRecord | None:
        """The token as published (expired or not: the caller compares with ``now``), or None."""
        row = self._one(
            "read a challenge token",
            "SELECT token, key_authorization, hostname, expires_at FROM challenges WHERE token = %s",
            (token,),
        )
        if row is None:
            return None
        return ChallengeRecord(
            token=row[0], key_authorization=row[1], hostname=row[2], expires_at=_utc(row[3])
        )

    def delete_challenge(self, token: str) -> None:
        """Idempotent."""
        with self._conn("delete a challenge token") as conn:
            conn.execute("DELETE FROM challenges WHERE token = %s", (token,))

    # -- ACME accounts -----------------------------------------------------------------

    def get_account(self, directory_url: str) -> AccountRecord | None:
        """The account for ``directory_url``, or None."""
        row = self._one(
            "read the ACME account",
            "SELECT directory_url, key_pem, registration_json FROM accounts WHERE directory_url = %s",
            (directory_url,),
        )
        if row is None:
            return None
        return AccountRecord(directory_url=row[0], key_pem=bytes(row[1]), registration_json=row[2])

    def list_accounts(self) -> list[AccountRecord]:
        """Every stored ACME account, ordered by directory URL."""
        with self._conn("list ACME accounts") as conn:
            rows = conn.execute(
                "SELECT directory_url, key_pem, registration_json FROM accounts ORDER BY directory_url"
            ).fetchall()
        return [AccountRecord(r[0], bytes(r[1]), r[2]) for r in rows]

    def save_account(self, account: AccountRecord) -> None:
        """Insert or replace the account for ``account.directory_url``."""
        with self._conn("save the ACME account") as conn:
            conn.execute(
                "INSERT INTO accounts (directory_url, key_pem, registration_json) VALUES (%s, %s, %s) "
                "ON CONFLICT (directory_url) DO UPDATE SET key_pem = excluded.key_pem, "
                "registration_json = excluded.registration_json",
                (account.directory_url, bytes(account.key_pem), account.registration_json),
            )

    # -- change feed -------------------------------------------------------------------

    def _append_change(self, conn: psycopg.Connection[Any], hostname: str) -> None:
        """Record a change inside the caller's transaction (see the module
        docstring for why the seq comes from a locked counter row)."""
        row = conn.execute(
            "UPDATE feed_state SET last_seq = last_seq + 1 WHERE id = 1 RETURNING last_seq"
        ).fetchone()
        if row is None:
            raise StorageError(f"{self.where}: the feed_state row is missing; run `edgeproxy migrate`")
        seq = int(row[0])
        conn.execute("INSERT INTO changes (seq, hostname) VALUES (%s, %s)", (seq, hostname))
        # Delivered at COMMIT, and only if it commits; the payload is informative.
        conn.execute(f"SELECT pg_notify({_CHANNEL_SQL}, %s)", (str(seq),))
        if self.PRUNE_EVERY > 0 and seq % self.PRUNE_EVERY == 0:
            self._prune(conn, self._keep_changes)

    @staticmethod
    def _newest(conn: psycopg.Connection[Any]) -> tuple[int, int]:
        """(newest seq, pruned_through) in the caller's transaction."""
        row = conn.execute("SELECT last_seq, pruned_through FROM feed_state WHERE id = 1").fetchone()
        if row is None:
            return 0, 0
        return int(row[0]), int(row[1])

    def _prune(self, conn: psycopg.Connection[Any], keep_last: int) -> int:
        # Called with feed_state locked (by _append_change or prune_changes).
        newest, pruned_through = self._newest(conn)
        cutoff = newest - keep_last
        if cutoff <= pruned_through:
            return 0
        deleted = conn.execute("DELETE FROM changes WHERE seq <= %s", (cutoff,)).rowcount
        conn.execute("UPDATE feed_state SET pruned_through = %s WHERE id = 1", (cutoff,))
        return int(deleted)

    def prune_changes(self, keep_last: int) -> int:
        """Delete all but the newest ``keep_last`` change-feed rows; returns how many
        were deleted. Not part of the ``Storage`` protocol: pruning also happens on
        its own (every ``PRUNE_EVERY`` changes, keeping ``keep_changes``)."""
        if keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        with self._tx("prune the change feed") as conn:
            conn.execute("SELECT 1 FROM feed_state WHERE id = 1 FOR UPDATE")
            return self._prune(conn, keep_last)

    def changes_since(self, seq: int) -> tuple[int, list[str]]:
        """Hostnames whose domain or certificate changed after ``seq``, and the
        newest seq. Workers poll this to refresh their in-memory maps; a
        hostname may appear more than once. ``changes_since(0)`` lists all.

        Same answers as the SQLite backend: incremental answers in commit
        order; a full listing (every registered hostname, sorted, then the
        retained changes newer than ``seq`` that are no longer registered) when
        ``seq <= 0``, when ``seq`` is older than the pruned part of the feed, or
        when ``seq`` is newer than the newest change (another database)."""
        with self._tx("read the change feed", snapshot=True) as conn:
            newest, pruned_through = self._newest(conn)
            if 0 < seq <= newest and seq >= pruned_through:
                rows = conn.execute(
                    "SELECT hostname FROM changes WHERE seq > %s ORDER BY seq", (seq,)
                ).fetchall()
                return newest, [row[0] for row in rows]
            registered = [
                row[0] for row in conn.execute("SELECT hostname FROM domains ORDER BY hostname").fetchall()
            ]
            since = seq if 0 < seq <= newest else 0
            recent = conn.execute(
                "SELECT hostname FROM changes WHERE seq > %s ORDER BY seq", (since,)
            ).fetchall()
        seen = set(registered)
        hostnames = list(registered)
        for (hostname,) in recent:
            if hostname not in seen:
                seen.add(hostname)
                hostnames.append(hostname)
        return newest, hostnames

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

    # -- locks -------------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl_seconds: float, now: datetime) -> bool:
        """Take or extend a lease. True if ``owner`` now holds ``name`` until
        ``now + ttl``; False if another owner holds an unexpired lease. An
        expired lease (crashed holder) is taken over.

        A lease is expired once ``now >= expires_at``."""
        stamp = _ts(now)
        try:
            expires = stamp + timedelta(seconds=ttl_seconds)
        except OverflowError:
            expires = _MAX_UTC
        with self._conn(f"take lock {name}") as conn:
            # One statement, atomic under concurrency: insert a free lease, or
            # overwrite one that is ours or expired; a live lease of another owner
            # makes the WHERE false and nothing is returned.
            row = conn.execute(
                "INSERT INTO locks (name, owner, expires_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                "WHERE locks.owner = excluded.owner OR locks.expires_at <= %s "
                "RETURNING 1",
                (name, owner, expires, stamp),
            ).fetchone()
        return row is not None

    def unlock(self, name: str, owner: str) -> None:
        """Release if held by ``owner``; otherwise do nothing."""
        with self._conn(f"release lock {name}") as conn:
            conn.execute("DELETE FROM locks WHERE name = %s AND owner = %s", (name, owner))

    # -- rate-budget ledger, status history, ARI state ------------------------

    def record_event(self, kind: str, key: str, at: datetime) -> None:
        """Append one ledger entry. Not idempotent: every call counts once."""
        with self._conn(f"record {kind} event") as conn:
            conn.execute("INSERT INTO budget_events (kind, key, at) VALUES (%s, %s, %s)", (kind, key, _ts(at)))

    def events_since(self, kind: str, key: str, since: datetime) -> list[datetime]:
        """Times of the ``kind``/``key`` entries at or after ``since``, oldest first."""
        with self._conn(f"read {kind} events") as conn:
            rows = conn.execute(
                "SELECT at FROM budget_events WHERE kind = %s AND key = %s AND at >= %s ORDER BY at",
                (kind, key, _ts(since)),
            ).fetchall()
        return [_utc(row[0]) for row in rows]

    def prune_events(self, before: datetime) -> int:
        """Delete ledger entries older than ``before``; returns how many."""
        with self._conn("prune budget events") as conn:
            return int(conn.execute("DELETE FROM budget_events WHERE at < %s", (_ts(before),)).rowcount)

    def add_status_event(self, event: StatusEvent) -> None:
        """Append to a domain's history (deleted with the domain)."""
        with self._conn(f"record status of {event.hostname}") as conn:
            conn.execute(
                "INSERT INTO status_history (hostname, at, status, error_code, message) "
                "VALUES (%s, %s, %s, %s, %s)",
                (event.hostname, _ts(event.at), event.status, event.error_code, event.message),
            )

    def status_history(self, hostname: str, limit: int = 100) -> list[StatusEvent]:
        """The newest ``limit`` entries for ``hostname``, newest first."""
        with self._conn(f"read the status history of {hostname}") as conn:
            rows = conn.execute(
                "SELECT hostname, at, status, error_code, message FROM status_history "
                "WHERE hostname = %s ORDER BY id DESC LIMIT %s",
                (hostname, limit),
            ).fetchall()
        return [StatusEvent(r[0], _utc(r[1]), r[2], r[3], r[4]) for r in rows]

    def save_ari(self, state: AriState) -> None:
        """Insert or replace the ARI state of ``state.hostname``."""
        with self._conn(f"save the ARI state of {state.hostname}") as conn:
            conn.execute(
                "INSERT INTO ari_state (hostname, serial, cert_id, renew_at, next_poll, checked_at) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (hostname) DO UPDATE SET "
                "serial = excluded.serial, cert_id = excluded.cert_id, renew_at = excluded.renew_at, "
                "next_poll = excluded.next_poll, checked_at = excluded.checked_at",
                (state.hostname, state.serial, state.cert_id, _ts_opt(state.renew_at),
                 _ts(state.next_poll), _ts(state.checked_at)),
            )

    def get_ari(self, hostname: str) -> AriState | None:
        row = self._one(
            f"read the ARI state of {hostname}",
            "SELECT hostname, serial, cert_id, renew_at, next_poll, checked_at FROM ari_state WHERE hostname = %s",
            (hostname,),
        )
        if row is None:
            return None
        return AriState(row[0], row[1], row[2], _utc_opt(row[3]), _utc(row[4]), _utc(row[5]))

    # -- failed-request log ---------------------------------------------------

    def log_failed_request(self, record: FailedRequestRecord) -> int:
        """Store a refused request; returns its id. Idempotent per ``idempotency_key``
        (a repeat updates ``status``/``origin``/``logged_at`` and keeps the one row)."""
        headers = json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in record.headers])
        with self._conn(f"log failed request {record.idempotency_key}") as conn:
            row = conn.execute(
                f"INSERT INTO failed_requests ({_FAILED_COLUMNS.partition(', ')[2]}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (idempotency_key) DO UPDATE SET status = excluded.status, "
                "origin = excluded.origin, logged_at = excluded.logged_at RETURNING id",
                (record.idempotency_key, record.domain, record.method, record.target, headers,
                 bytes(record.body), record.client, record.status, record.origin, _ts(record.received_at),
                 _ts(record.logged_at), _ts_opt(record.delivered_at)),
            ).fetchone()
        if row is None:  # pragma: no cover - INSERT .. DO UPDATE always returns the row
            raise StorageError(f"{self.where}: logging failed request {record.idempotency_key} returned no id")
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
        """Matching records with ``id > after_id``, in arrival (id) order."""
        where, params = _failed_filters(since, until, domain, status, delivered)
        where.append("id > %s")
        params.extend([after_id, limit])
        with self._conn("find failed requests") as conn:
            rows = conn.execute(
                f"SELECT {_FAILED_COLUMNS} FROM failed_requests WHERE {' AND '.join(where)} "
                "ORDER BY id LIMIT %s", params,
            ).fetchall()
        return [
            FailedRequestRecord(
                id=int(row[0]), idempotency_key=row[1], domain=row[2], method=row[3], target=row[4],
                headers=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(row[5])),
                body=bytes(row[6]), client=row[7], status=row[8], origin=row[9],
                received_at=_utc(row[10]), logged_at=_utc(row[11]), delivered_at=_utc_opt(row[12]),
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
        """How many records ``find_failed_requests`` would return without a limit."""
        where, params = _failed_filters(since, until, domain, status, delivered)
        row = self._one("count failed requests",
                        f"SELECT COUNT(*) FROM failed_requests WHERE {' AND '.join(where)}", tuple(params))
        return int(row[0])

    def mark_failed_delivered(self, ids: list[int], now: datetime) -> int:
        """Set ``delivered_at = now`` where still unset; returns how many changed."""
        if not ids:
            return 0
        with self._conn("mark failed requests delivered") as conn:
            # One array parameter: no statement text built from the id count.
            return int(conn.execute(
                "UPDATE failed_requests SET delivered_at = %s WHERE delivered_at IS NULL AND id = ANY(%s)",
                (_ts(now), list(ids)),
            ).rowcount)

    def prune_failed_requests(self, before: datetime) -> int:
        """Delete records logged before ``before``; returns how many."""
        with self._conn("prune failed requests") as conn:
            return int(conn.execute("DELETE FROM failed_requests WHERE logged_at < %s", (_ts(before),)).rowcount)

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

    def __enter__(self) -> PostgresStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
