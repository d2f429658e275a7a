"""Every statement of the ``Storage`` contract, written once for SQLite and PostgreSQL.

Owns: the data-manipulation SQL (queries, upserts, the change feed's pruning,
the failed-request log) and the decoding of rows into the records of
``storage.base``. Implements :class:`edgeproxy.storage.base.Storage` on top of
a small set of hooks a backend provides (its :class:`Dialect` and four
context managers); the contract itself lives in ``base.py`` and is checked on
both backends by ``tests/test_storage_contract.py``.
Must not import: ``sqlite3``, ``psycopg``, ``acme``, ``httpx``, ``hypercorn``.

What stays in a backend module, and why:

- its schema (DDL types differ: ``TEXT`` times and ``BLOB`` in SQLite,
  ``TIMESTAMPTZ``/``BYTEA`` and versioned migrations in PostgreSQL);
- connections and transactions (a connection per thread with ``BEGIN
  IMMEDIATE`` on one file; a pool of autocommit connections with explicit
  transactions on a server), and the mapping of its driver's errors;
- the change feed's sequence numbers (SQLite's ``AUTOINCREMENT`` is assigned
  under the single writer lock; PostgreSQL needs a locked counter row so that
  seqs follow commit order) and what happens after a removal (SQLite
  checkpoints the WAL so a removed key leaves the disk).

Statements here use ``?`` placeholders; a dialect whose driver wants ``%s``
rewrites them once per statement (:meth:`Dialect.sql`). No value is ever
formatted into SQL text: only constant fragments and placeholders are joined.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from types import TracebackType
from typing import Any, Protocol, Self

from edgeproxy.errors import DomainExists, DomainNotFound
from edgeproxy.storage.base import (
    DOMAIN_STATUSES,
    AccountRecord,
    AriState,
    CertificateRecord,
    CertificateVisitor,
    ChallengeRecord,
    DomainRecord,
    Delivery,
    FailedRequestRecord,
    FiringAlert,
    OutboxEvent,
    ProbeRecord,
    StatusEvent,
    leaf_der_of,
)

__all__ = ["Cursor", "Connection", "Dialect", "SqlStorage", "SQLITE", "POSTGRES"]

_MAX_UTC = datetime.max.replace(tzinfo=timezone.utc)

# SQLite's default limit on host parameters was 999 before 3.32; 500 stays under it
# with room for the other parameters of a statement.
_IN_CHUNK = 500

_DOMAIN_COLUMNS = (
    "hostname, status, created_at, updated_at, error_code, error_message, next_attempt_at, attempts"
)
_CERT_COLUMNS = (
    "hostname, key_pem, chain_pem, not_before, not_after, serial, issuer, created_at, acme_directory, "
    "fallback_reason, acme_serial"
)
_ALERT_COLUMNS = "key, kind, severity, summary, details_json, since, last_sent"
_PROBE_COLUMNS = "hostname, checked_at, ok, result_json, consecutive_failures"
_OUTBOX_COLUMNS = ("seq, event_id, endpoint, event_type, hostname, occurred_at, payload, state, attempts, "
                   "next_attempt_at, horizon_from, last_error, last_status, delivered_at")
_FAILED_COLUMNS = (
    "id, idempotency_key, domain, method, target, headers_json, body, client, status, origin, "
    "received_at, logged_at, delivered_at"
)


class Cursor(Protocol):
    """What a statement returns, on both drivers (DB-API 2.0, PEP 249)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A connection inside a backend's transaction; ``sql`` uses ``?`` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Any: ...


# -- dialects: how values and a few constructs are spelled ------------------------------


def _require_aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: storage needs timezone-aware UTC times")
    return value.astimezone(timezone.utc)


def _time_as_text(value: datetime) -> str:
    """Fixed-width UTC text with microseconds (``2025-01-02T03:04:05.000006Z``):
    round-trips exactly and sorts like time, so comparisons happen in SQL."""
    # isoformat pads the year to 4 digits (strftime %Y does not on glibc).
    return _require_aware(value).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _time_from_text(text: str) -> datetime:
    if text.endswith("Z"):  # what _time_as_text writes; fromisoformat makes it aware (3.11+)
        return datetime.fromisoformat(text)
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def _time_from_driver(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


@lru_cache(maxsize=512)
def _percent_placeholders(sql: str) -> str:
    if "%" in sql:  # a literal % would need doubling for psycopg; none of ours has one
        raise ValueError(f"statement has a literal %: {sql!r}")
    return sql.replace("?", "%s")


@dataclass(frozen=True)
class Dialect:
    """How one database spells what the shared statements need.

    ``encode_time``/``decode_time``: datetime to the driver's value and back
    (aware UTC in, aware UTC out; naive datetimes raise ``ValueError``).
    ``array_parameters``: ``column = ANY(?)`` with one list parameter instead of
    ``column IN (?, ?, ...)``. ``key_share_lock``: the row lock a certificate
    save takes on its domain so a concurrent removal waits; ``update_lock``: the
    one it takes when it also writes lifecycle events, so a concurrent status
    change of the same domain (which locks the row by updating it) commits its
    events entirely before or after, in the order of their outbox seqs (both
    empty where one writer at a time is the rule anyway).
    """

    name: str
    encode_time: Callable[[datetime], Any]
    decode_time: Callable[[Any], datetime]
    placeholders: Callable[[str], str]
    array_parameters: bool
    key_share_lock: str
    update_lock: str

    def sql(self, statement: str) -> str:
        return self.placeholders(statement)

    def member_of(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """``column`` is one of ``values`` (non-empty): the SQL fragment and its parameters."""
        if self.array_parameters:
            return f"{column} = ANY(?)", [list(values)]
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)


SQLITE = Dialect("sqlite", _time_as_text, _time_from_text, lambda sql: sql,
                 array_parameters=False, key_share_lock="", update_lock="")
POSTGRES = Dialect("postgresql", _require_aware, _time_from_driver, _percent_placeholders,
                   array_parameters=True, key_share_lock=" FOR KEY SHARE", update_lock=" FOR UPDATE")


def _check_status(status: str) -> None:
    if status not in DOMAIN_STATUSES:
        raise ValueError(f"unknown domain status {status!r}; expected one of {DOMAIN_STATUSES}")


class SqlStorage(ABC):
    """The ``Storage`` contract in SQL; a backend subclass supplies the hooks below.

    Hooks (each maps its driver's errors to ``StorageError``/``StorageUnavailable``
    and names ``action`` in the message):

    - ``_write(action)``: a write transaction; commits on success, rolls back on
      any exception; serializes read-modify-write sequences against other writers.
    - ``_read(action)``: a read transaction (every statement sees one snapshot).
    - ``_query(action)``: a connection for one statement, no transaction.
    - ``_append_change(conn, hostname)``: add a change-feed row in ``conn``'s transaction.
    - ``_feed_position(conn)``: ``(newest seq, pruned_through)`` in ``conn``'s transaction.
    - ``_lock_feed(conn)``: serialize feed pruning (a no-op where writers are serialized).
    - ``_stream(conn, sql, params)``: rows of a large result without holding them all.
    - ``_after_remove(hostname)``: runs after a removal committed (default: nothing).
    - ``close()``: release every connection; idempotent; later calls raise ``StorageError``.
    """

    dialect: Dialect
    _keep_changes: int
    #: Opportunistic pruning runs when a new change's seq is a multiple of this.
    PRUNE_EVERY = 256

    @abstractmethod
    def _write(self, action: str) -> AbstractContextManager[Connection]: ...

    @abstractmethod
    def _read(self, action: str) -> AbstractContextManager[Connection]: ...

    @abstractmethod
    def _query(self, action: str) -> AbstractContextManager[Connection]: ...

    @abstractmethod
    def _append_change(self, conn: Connection, hostname: str) -> None: ...

    @abstractmethod
    def _feed_position(self, conn: Connection) -> tuple[int, int]: ...

    def _lock_feed(self, conn: Connection) -> None:
        return None

    def _stream(self, conn: Connection, sql: str, params: Sequence[Any]) -> Iterable[Any]:
        return conn.execute(sql, params)

    def _after_remove(self, hostname: str) -> None:
        return None

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------

    def _ts(self, value: datetime) -> Any:
        return self.dialect.encode_time(value)

    def _ts_opt(self, value: datetime | None) -> Any:
        return None if value is None else self.dialect.encode_time(value)

    def _dt(self, value: Any) -> datetime:
        return self.dialect.decode_time(value)

    def _dt_opt(self, value: Any) -> datetime | None:
        return None if value is None else self.dialect.decode_time(value)

    def _one(self, action: str, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._query(action) as conn:
            return conn.execute(sql, params).fetchone()

    def _all(self, action: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._query(action) as conn:
            return conn.execute(sql, params).fetchall()

    def _domain(self, row: Any) -> DomainRecord:
        return DomainRecord(
            hostname=row[0], status=row[1], created_at=self._dt(row[2]), updated_at=self._dt(row[3]),
            error_code=row[4], error_message=row[5], next_attempt_at=self._dt_opt(row[6]), attempts=row[7],
        )

    def _certificate(self, row: Any) -> CertificateRecord:
        return CertificateRecord(
            hostname=row[0], key_pem=bytes(row[1]), chain_pem=bytes(row[2]), not_before=self._dt(row[3]),
            not_after=self._dt(row[4]), serial=row[5], issuer=row[6], created_at=self._dt(row[7]),
            # The issuing CA only when recorded for this very certificate (acme_serial):
            # an older edgeproxy's upsert renews chain and serial without these columns.
            acme_directory=(row[8] or "") if row[10] == row[5] else "",
            fallback_reason=(row[9] or "") if row[10] == row[5] else "",
        )

    # -- domains -----------------------------------------------------------------------

    def add_domain(self, hostname: str, status: str, now: datetime,
                   events: Sequence[OutboxEvent] = (), *, next_attempt_at: datetime | None = None) -> DomainRecord:
        _check_status(status)
        stamp = self._ts(now)
        with self._write(f"add domain {hostname}") as conn:
            rows = conn.execute(
                "INSERT INTO domains (hostname, status, created_at, updated_at, next_attempt_at, attempts) "
                f"VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (hostname) DO NOTHING RETURNING {_DOMAIN_COLUMNS}",
                (hostname, status, stamp, stamp, self._ts_opt(next_attempt_at)),
            ).fetchall()  # fetchall: SQLite finishes a RETURNING statement only when it is read out
            if not rows:
                raise DomainExists(f"{hostname} is already registered")
            self._append_change(conn, hostname)
            self._insert_outbox(conn, events)
        return self._domain(rows[0])

    def get_domain(self, hostname: str) -> DomainRecord | None:
        row = self._one(f"read domain {hostname}",
                        f"SELECT {_DOMAIN_COLUMNS} FROM domains WHERE hostname = ?", (hostname,))
        return None if row is None else self._domain(row)

    def list_domains(self) -> list[DomainRecord]:
        # Hostnames sort bytewise on both (PostgreSQL's column is COLLATE "C").
        rows = self._all("list domains", f"SELECT {_DOMAIN_COLUMNS} FROM domains ORDER BY hostname")
        return [self._domain(row) for row in rows]

    def due_domains(
        self, now: datetime, statuses: Sequence[str] | None = None, limit: int | None = None
    ) -> list[DomainRecord]:
        # A range scan of domains_next_attempt; NULL compares as unknown, so it is never due.
        sql = f"SELECT {_DOMAIN_COLUMNS} FROM domains WHERE next_attempt_at <= ?"
        params: list[Any] = [self._ts(now)]
        if statuses is not None:
            if not statuses:
                return []
            term, values = self.dialect.member_of("status", statuses)
            sql += f" AND {term}"
            params.extend(values)
        sql += " ORDER BY next_attempt_at, hostname"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        return [self._domain(row) for row in self._all("list due domains", sql, params)]

    def count_domains(self) -> int:
        return int(self._one("count domains", "SELECT COUNT(*) FROM domains")[0])

    def domain_statuses(self) -> list[tuple[str, str]]:
        rows = self._all("list domain statuses", "SELECT hostname, status FROM domains ORDER BY hostname")
        return [(str(row[0]), str(row[1])) for row in rows]

    def count_domains_by_status(self) -> dict[str, int]:
        rows = self._all("count domains by status", "SELECT status, COUNT(*) FROM domains GROUP BY status")
        return {str(row[0]): int(row[1]) for row in rows}

    def domain_created_times_since(self, since: datetime) -> list[datetime]:
        rows = self._all("list recent registrations",
                         "SELECT created_at FROM domains WHERE created_at >= ? ORDER BY created_at",
                         (self._ts(since),))
        return [self._dt(row[0]) for row in rows]

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
        events: Sequence[OutboxEvent] = (),
    ) -> DomainRecord:
        _check_status(status)
        params = (status, self._ts(now), error_code, error_message, self._ts_opt(next_attempt_at), attempts,
                  hostname)
        with self._write(f"update domain {hostname}") as conn:
            rows = conn.execute(
                "UPDATE domains SET status = ?, updated_at = ?, error_code = ?, "
                "error_message = ?, next_attempt_at = ?, attempts = ? "
                f"WHERE hostname = ? RETURNING {_DOMAIN_COLUMNS}",
                params,
            ).fetchall()
            if not rows:
                raise DomainNotFound(f"{hostname} is not registered")
            self._append_change(conn, hostname)
            self._insert_outbox(conn, events)
        return self._domain(rows[0])

    def remove_domain(self, hostname: str, events: Sequence[OutboxEvent] = ()) -> bool:
        with self._write(f"remove domain {hostname}") as conn:
            if not conn.execute("DELETE FROM domains WHERE hostname = ? RETURNING hostname", (hostname,)).fetchall():
                return False
            # The certificate goes by ON DELETE CASCADE too; said explicitly so the
            # key's removal never depends on a pragma (SQLite's foreign_keys).
            for table in ("certificates", "challenges", "status_history", "ari_state", "probe_results"):
                conn.execute(f"DELETE FROM {table} WHERE hostname = ?", (hostname,))
            self._append_change(conn, hostname)
            self._insert_outbox(conn, events)
        self._after_remove(hostname)
        return True

    # -- certificates ------------------------------------------------------------------

    def save_certificate(self, cert: CertificateRecord, events: Sequence[OutboxEvent] = ()) -> None:
        params = (
            cert.hostname, bytes(cert.key_pem), bytes(cert.chain_pem), self._ts(cert.not_before),
            self._ts(cert.not_after), cert.serial, cert.issuer, self._ts(cert.created_at),
            cert.acme_directory or None, cert.fallback_reason or None, cert.serial if cert.acme_directory else None,
            leaf_der_of(cert.chain_pem),
        )
        with self._write(f"save the certificate of {cert.hostname}") as conn:
            # The key-share lock (PostgreSQL): a concurrent remove_domain waits for
            # this commit, then deletes the certificate too, instead of racing past it.
            lock = self.dialect.update_lock if events else self.dialect.key_share_lock
            if conn.execute(f"SELECT 1 FROM domains WHERE hostname = ?{lock}",
                            (cert.hostname,)).fetchone() is None:
                raise DomainNotFound(f"{cert.hostname} is not registered (removed meanwhile?)")
            conn.execute(
                f"INSERT INTO certificates ({_CERT_COLUMNS}, leaf_der) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (hostname) DO UPDATE SET key_pem = excluded.key_pem, "
                "chain_pem = excluded.chain_pem, not_before = excluded.not_before, "
                "not_after = excluded.not_after, serial = excluded.serial, "
                "issuer = excluded.issuer, created_at = excluded.created_at, "
                "acme_directory = excluded.acme_directory, fallback_reason = excluded.fallback_reason, "
                "acme_serial = excluded.acme_serial, leaf_der = excluded.leaf_der",
                params,
            )
            self._append_change(conn, cert.hostname)
            self._insert_outbox(conn, events)

    def get_certificate(self, hostname: str) -> CertificateRecord | None:
        row = self._one(f"read the certificate of {hostname}",
                        f"SELECT {_CERT_COLUMNS} FROM certificates WHERE hostname = ?", (hostname,))
        return None if row is None else self._certificate(row)

    def scan_certificates(self, hostnames: Sequence[str], visit: CertificateVisitor) -> set[str]:
        """Which of ``hostnames`` are registered; and, in the same snapshot,
        ``visit(hostname, key_pem, chain_pem, leaf_der, not_after, serial)`` for each
        of them that has a certificate, one row at a time (``leaf_der`` is None for
        rows saved without it: see ``CertificateVisitor``).

        Not part of the ``Storage`` protocol: the certstore uses it when present
        to load 100,000 names at start-up in one scan instead of two point
        queries per name, without ever holding every row in memory at once.
        """
        names = sorted(set(hostnames))
        if not names:
            return set()
        columns = "SELECT hostname, key_pem, chain_pem, leaf_der, not_after, serial FROM certificates"
        with self._read("read certificates in bulk") as conn:
            if len(names) > _IN_CHUNK:  # most of the table: one scan beats a long list of lookups
                wanted = set(names)
                registered = {row[0] for row in conn.execute("SELECT hostname FROM domains") if row[0] in wanted}
                rows = self._stream(conn, columns, ())
            else:
                term, params = self.dialect.member_of("hostname", names)
                registered = {row[0] for row in conn.execute(f"SELECT hostname FROM domains WHERE {term}", params)}
                rows = self._stream(conn, f"{columns} WHERE {term}", params)
            for hostname, key_pem, chain_pem, leaf_der, not_after, serial in rows:
                if hostname in registered:
                    visit(hostname, bytes(key_pem), bytes(chain_pem), None if leaf_der is None else bytes(leaf_der),
                          self._dt(not_after), serial)
        return registered

    # -- HTTP-01 challenges ------------------------------------------------------------

    def put_challenge(self, challenge: ChallengeRecord) -> None:
        with self._write(f"publish challenge token for {challenge.hostname}") as conn:
            conn.execute(
                "INSERT INTO challenges (token, key_authorization, hostname, expires_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (token) DO UPDATE SET "
                "key_authorization = excluded.key_authorization, "
                "hostname = excluded.hostname, expires_at = excluded.expires_at",
                (challenge.token, challenge.key_authorization, challenge.hostname,
                 self._ts(challenge.expires_at)),
            )

    def get_challenge(self, token: str) -> ChallengeRecord | None:
        row = self._one("read a challenge token",
                        "SELECT token, key_authorization, hostname, expires_at FROM challenges WHERE token = ?",
                        (token,))
        if row is None:
            return None
        return ChallengeRecord(token=row[0], key_authorization=row[1], hostname=row[2], expires_at=self._dt(row[3]))

    def delete_challenge(self, token: str) -> None:
        with self._write("delete a challenge token") as conn:
            conn.execute("DELETE FROM challenges WHERE token = ?", (token,))

    # -- ACME accounts -----------------------------------------------------------------

    def get_account(self, directory_url: str) -> AccountRecord | None:
        row = self._one("read the ACME account",
                        "SELECT directory_url, key_pem, registration_json FROM accounts WHERE directory_url = ?",
                        (directory_url,))
        return None if row is None else AccountRecord(row[0], bytes(row[1]), row[2])

    def list_accounts(self) -> list[AccountRecord]:
        rows = self._all("list ACME accounts",
                         "SELECT directory_url, key_pem, registration_json FROM accounts ORDER BY directory_url")
        return [AccountRecord(r[0], bytes(r[1]), r[2]) for r in rows]

    def save_account(self, account: AccountRecord) -> None:
        with self._write("save the ACME account") as conn:
            conn.execute(
                "INSERT INTO accounts (directory_url, key_pem, registration_json) VALUES (?, ?, ?) "
                "ON CONFLICT (directory_url) DO UPDATE SET key_pem = excluded.key_pem, "
                "registration_json = excluded.registration_json",
                (account.directory_url, bytes(account.key_pem), account.registration_json),
            )

    # -- change feed -------------------------------------------------------------------

    def _prune_after(self, conn: Connection, seq: int) -> None:
        """Opportunistic pruning, called by ``_append_change`` with the new seq."""
        if self.PRUNE_EVERY > 0 and seq % self.PRUNE_EVERY == 0:
            self._prune(conn, self._keep_changes)

    def _prune(self, conn: Connection, keep_last: int) -> int:
        newest, pruned_through = self._feed_position(conn)
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
            self._lock_feed(conn)
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
            newest, pruned_through = self._feed_position(conn)
            if 0 < seq <= newest and seq >= pruned_through:
                rows = conn.execute("SELECT hostname FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
                return newest, [row[0] for row in rows]
            registered = [row[0] for row in conn.execute("SELECT hostname FROM domains ORDER BY hostname").fetchall()]
            since = seq if 0 < seq <= newest else 0
            recent = conn.execute("SELECT hostname FROM changes WHERE seq > ? ORDER BY seq", (since,)).fetchall()
        seen = set(registered)
        hostnames = list(registered)
        for (hostname,) in recent:
            if hostname not in seen:
                seen.add(hostname)
                hostnames.append(hostname)
        return newest, hostnames

    # -- locks -------------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl_seconds: float, now: datetime) -> bool:
        """Take or extend a lease. True if ``owner`` now holds ``name`` until
        ``now + ttl``; False if another owner holds an unexpired lease. An
        expired lease (crashed holder) is taken over.

        A lease is expired once ``now >= expires_at``. ``now`` comes from the
        caller, so nodes sharing a store need roughly synchronized clocks (NTP)."""
        stamp = self._ts(now)
        try:
            expires = now + timedelta(seconds=ttl_seconds)
        except OverflowError:
            expires = _MAX_UTC
        with self._write(f"take lock {name}") as conn:
            # One statement, atomic under concurrency: insert a free lease, or
            # overwrite one that is ours or expired; a live lease of another owner
            # makes the WHERE false and nothing is returned.
            rows = conn.execute(
                "INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at "
                "WHERE locks.owner = excluded.owner OR locks.expires_at <= ? RETURNING 1",
                (name, owner, self._ts(expires), stamp),
            ).fetchall()
        return bool(rows)

    def unlock(self, name: str, owner: str) -> None:
        with self._write(f"release lock {name}") as conn:
            conn.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))

    # -- rate-budget ledger, status history, ARI state ---------------------------------

    def record_event(self, kind: str, key: str, at: datetime) -> None:
        with self._write(f"record {kind} event") as conn:
            conn.execute("INSERT INTO budget_events (kind, key, at) VALUES (?, ?, ?)", (kind, key, self._ts(at)))

    def events_since(self, kind: str, key: str, since: datetime) -> list[datetime]:
        rows = self._all(f"read {kind} events",
                         "SELECT at FROM budget_events WHERE kind = ? AND key = ? AND at >= ? ORDER BY at",
                         (kind, key, self._ts(since)))
        return [self._dt(row[0]) for row in rows]

    def prune_events(self, before: datetime) -> int:
        with self._write("prune budget events") as conn:
            return int(conn.execute("DELETE FROM budget_events WHERE at < ?", (self._ts(before),)).rowcount)

    def add_status_event(self, event: StatusEvent) -> None:
        with self._write(f"record status of {event.hostname}") as conn:
            conn.execute(
                "INSERT INTO status_history (hostname, at, status, error_code, message) VALUES (?, ?, ?, ?, ?)",
                (event.hostname, self._ts(event.at), event.status, event.error_code, event.message),
            )

    def status_history(self, hostname: str, limit: int = 100) -> list[StatusEvent]:
        rows = self._all(f"read the status history of {hostname}",
                         "SELECT hostname, at, status, error_code, message FROM status_history "
                         "WHERE hostname = ? ORDER BY id DESC LIMIT ?", (hostname, limit))
        return [StatusEvent(r[0], self._dt(r[1]), r[2], r[3], r[4]) for r in rows]

    def save_ari(self, state: AriState) -> None:
        with self._write(f"save the ARI state of {state.hostname}") as conn:
            conn.execute(
                "INSERT INTO ari_state (hostname, serial, cert_id, renew_at, next_poll, checked_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hostname) DO UPDATE SET "
                "serial = excluded.serial, cert_id = excluded.cert_id, renew_at = excluded.renew_at, "
                "next_poll = excluded.next_poll, checked_at = excluded.checked_at",
                (state.hostname, state.serial, state.cert_id, self._ts_opt(state.renew_at),
                 self._ts(state.next_poll), self._ts(state.checked_at)),
            )

    def get_ari(self, hostname: str) -> AriState | None:
        row = self._one(f"read the ARI state of {hostname}",
                        "SELECT hostname, serial, cert_id, renew_at, next_poll, checked_at FROM ari_state "
                        "WHERE hostname = ?", (hostname,))
        if row is None:
            return None
        return AriState(row[0], row[1], row[2], self._dt_opt(row[3]), self._dt(row[4]), self._dt(row[5]))

    # -- failed-request log ------------------------------------------------------------

    def _failed_filters(self, since: datetime | None, until: datetime | None, domain: str | None,
                        status: int | None, delivered: bool | None) -> tuple[list[str], list[Any]]:
        """WHERE terms (constant SQL) and their parameters for the failed-request log filters."""
        where = ["1 = 1"]
        params: list[Any] = []
        for term, value in (("received_at >= ?", self._ts_opt(since)), ("received_at < ?", self._ts_opt(until)),
                            ("domain = ?", domain), ("status = ?", status)):
            if value is not None:
                where.append(term)
                params.append(value)
        if delivered is not None:
            where.append("delivered_at IS NOT NULL" if delivered else "delivered_at IS NULL")
        return where, params

    def log_failed_request(self, record: FailedRequestRecord) -> int:
        headers = json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in record.headers])
        with self._write(f"log failed request {record.idempotency_key}") as conn:
            rows = conn.execute(
                f"INSERT INTO failed_requests ({_FAILED_COLUMNS.partition(', ')[2]}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (idempotency_key) DO UPDATE SET status = excluded.status, "
                "origin = excluded.origin, logged_at = excluded.logged_at RETURNING id",
                (record.idempotency_key, record.domain, record.method, record.target, headers,
                 bytes(record.body), record.client, record.status, record.origin, self._ts(record.received_at),
                 self._ts(record.logged_at), self._ts_opt(record.delivered_at)),
            ).fetchall()
        return int(rows[0][0])  # an upsert returns its row whether it inserted or updated

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
        where, params = self._failed_filters(since, until, domain, status, delivered)
        where.append("id > ?")
        params.extend([after_id, limit])
        rows = self._all("find failed requests",
                         f"SELECT {_FAILED_COLUMNS} FROM failed_requests WHERE {' AND '.join(where)} "
                         "ORDER BY id LIMIT ?", params)
        return [
            FailedRequestRecord(
                id=int(row[0]), idempotency_key=row[1], domain=row[2], method=row[3], target=row[4],
                headers=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(row[5])),
                body=bytes(row[6]), client=row[7], status=row[8], origin=row[9],
                received_at=self._dt(row[10]), logged_at=self._dt(row[11]), delivered_at=self._dt_opt(row[12]),
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
        where, params = self._failed_filters(since, until, domain, status, delivered)
        row = self._one("count failed requests", f"SELECT COUNT(*) FROM failed_requests WHERE {' AND '.join(where)}",
                        params)
        return int(row[0])

    def mark_failed_delivered(self, ids: list[int], now: datetime) -> int:
        if not ids:
            return 0
        changed = 0
        with self._write("mark failed requests delivered") as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                term, params = self.dialect.member_of("id", ids[start:start + _IN_CHUNK])
                changed += conn.execute(
                    f"UPDATE failed_requests SET delivered_at = ? WHERE delivered_at IS NULL AND {term}",
                    [self._ts(now), *params],
                ).rowcount
        return changed

    def prune_failed_requests(self, before: datetime) -> int:
        with self._write("prune failed requests") as conn:
            return int(conn.execute("DELETE FROM failed_requests WHERE logged_at < ?", (self._ts(before),)).rowcount)

    # -- monitor state -----------------------------------------------------------------

    def _alert(self, row: Any) -> FiringAlert:
        return FiringAlert(row[0], row[1], row[2], row[3], row[4], self._dt(row[5]), self._dt(row[6]))

    def _probe(self, row: Any) -> ProbeRecord:
        return ProbeRecord(row[0], self._dt(row[1]), bool(row[2]), row[3], int(row[4]))

    def firing_alerts(self) -> list[FiringAlert]:
        rows = self._all("read the firing alerts", f"SELECT {_ALERT_COLUMNS} FROM monitor_alerts ORDER BY key")
        return [self._alert(row) for row in rows]

    def claim_alert(self, alert: FiringAlert, resend_after: float) -> str | None:
        try:
            due = alert.last_sent - timedelta(seconds=resend_after)
        except OverflowError:
            due = datetime.min.replace(tzinfo=timezone.utc)
        with self._write(f"claim alert {alert.key}") as conn:
            existed = conn.execute("SELECT 1 FROM monitor_alerts WHERE key = ?", (alert.key,)).fetchone() is not None
            # Two nodes that both saw no row: one inserts, the other's upsert meets
            # that fresh last_sent in its WHERE and returns nothing.
            rows = conn.execute(
                f"INSERT INTO monitor_alerts ({_ALERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET kind = excluded.kind, severity = excluded.severity, "
                "summary = excluded.summary, details_json = excluded.details_json, last_sent = excluded.last_sent "
                "WHERE monitor_alerts.last_sent <= ? RETURNING 1",
                (alert.key, alert.kind, alert.severity, alert.summary, alert.details_json, self._ts(alert.since),
                 self._ts(alert.last_sent), self._ts(due)),
            ).fetchall()
        if not rows:
            return None
        return "resend" if existed else "trigger"

    def release_alert(self, key: str) -> FiringAlert | None:
        with self._write(f"release alert {key}") as conn:
            rows = conn.execute(f"DELETE FROM monitor_alerts WHERE key = ? RETURNING {_ALERT_COLUMNS}",
                                (key,)).fetchall()
        return self._alert(rows[0]) if rows else None

    def save_probes(self, records: Sequence[ProbeRecord]) -> None:
        if not records:
            return
        with self._write(f"save {len(records)} probe results") as conn:
            # Only for registered domains: a probe that finishes after its domain
            # was removed must not leave a row behind.
            conn.executemany(
                f"INSERT INTO probe_results ({_PROBE_COLUMNS}) SELECT ?, ?, ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM domains WHERE hostname = ?) "
                "ON CONFLICT (hostname) DO UPDATE SET checked_at = excluded.checked_at, ok = excluded.ok, "
                "result_json = excluded.result_json, consecutive_failures = excluded.consecutive_failures",
                [(r.hostname, self._ts(r.checked_at), r.ok, r.result_json, r.consecutive_failures, r.hostname)
                 for r in records],
            )

    def get_probe(self, hostname: str) -> ProbeRecord | None:
        row = self._one(f"read the last probe of {hostname}",
                        f"SELECT {_PROBE_COLUMNS} FROM probe_results WHERE hostname = ?", (hostname,))
        return None if row is None else self._probe(row)

    def probe_failures(self) -> dict[str, int]:
        rows = self._all("read failing probes",
                         "SELECT hostname, consecutive_failures FROM probe_results WHERE consecutive_failures > 0")
        return {str(row[0]): int(row[1]) for row in rows}

    # -- lifecycle-webhook outbox (EventOutbox) ------------------------------------------

    def _delivery(self, row: Any) -> Delivery:
        return Delivery(seq=int(row[0]), event_id=row[1], endpoint=row[2], event_type=row[3], hostname=row[4],
                        occurred_at=self._dt(row[5]), payload=row[6], state=row[7], attempts=int(row[8]),
                        next_attempt_at=self._dt(row[9]), horizon_from=self._dt(row[10]), last_error=row[11],
                        last_status=row[12], delivered_at=self._dt_opt(row[13]))

    def _insert_outbox(self, conn: Connection, events: Sequence[OutboxEvent]) -> int:
        """Append ``events`` inside the caller's write transaction; returns how many were new."""
        added = 0
        for event in events:
            stamp = self._ts(event.occurred_at)
            added += conn.execute(
                "INSERT INTO event_outbox (event_id, endpoint, event_type, hostname, occurred_at, payload, state, "
                "attempts, next_attempt_at, horizon_from) VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?) "
                "ON CONFLICT (event_id, endpoint) DO NOTHING",
                (event.event_id, event.endpoint, event.event_type, event.hostname, stamp, event.payload, stamp,
                 stamp),
            ).rowcount
        return added

    def append_events(self, events: Sequence[OutboxEvent]) -> int:
        if not events:
            return 0
        with self._write("append lifecycle events") as conn:
            return self._insert_outbox(conn, events)

    def claim_deliveries(self, owner: str, now: datetime, lease_seconds: float, limit: int) -> list[Delivery]:
        stamp = self._ts(now)
        until = self._ts(now + timedelta(seconds=lease_seconds))
        claimed: list[Delivery] = []
        with self._write("claim webhook deliveries") as conn:
            # Only the oldest pending row of each (endpoint, hostname) is a head of line:
            # a domain's events reach an endpoint in order.
            heads = conn.execute(
                "SELECT o.seq FROM event_outbox o WHERE o.state = 'pending' AND o.next_attempt_at <= ? "
                "AND (o.claimed_until IS NULL OR o.claimed_until <= ?) "
                "AND o.seq = (SELECT MIN(p.seq) FROM event_outbox p WHERE p.state = 'pending' "
                "AND p.endpoint = o.endpoint AND p.hostname = o.hostname) ORDER BY o.seq LIMIT ?",
                (stamp, stamp, limit),
            ).fetchall()
            for (seq,) in heads:
                # Conditional on the lease still being free: a concurrent claimer
                # (another node on PostgreSQL) that took it first wins, we skip it.
                rows = conn.execute(
                    "UPDATE event_outbox SET claimed_by = ?, claimed_until = ? WHERE seq = ? AND state = 'pending' "
                    f"AND (claimed_until IS NULL OR claimed_until <= ?) RETURNING {_OUTBOX_COLUMNS}",
                    (owner, until, seq, stamp),
                ).fetchall()
                claimed.extend(self._delivery(row) for row in rows)
        return claimed

    def record_attempt(self, seq: int, owner: str, now: datetime, *, state: str, next_attempt_at: datetime,
                       error: str | None, status: int | None) -> bool:
        with self._write(f"record webhook delivery attempt {seq}") as conn:
            return conn.execute(
                "UPDATE event_outbox SET state = ?, attempts = attempts + 1, next_attempt_at = ?, last_error = ?, "
                "last_status = ?, delivered_at = COALESCE(?, delivered_at), claimed_by = NULL, claimed_until = NULL "
                "WHERE seq = ? AND claimed_by = ?",
                (state, self._ts(next_attempt_at), error, status,
                 self._ts(now) if state == "delivered" else None, seq, owner),
            ).rowcount == 1

    def list_deliveries(self, *, state: str | None = None, event_id: str | None = None,
                        hostname: str | None = None, limit: int = 100) -> list[Delivery]:
        where, params = ["1 = 1"], []
        for column, value in (("state", state), ("event_id", event_id), ("hostname", hostname)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        rows = self._all("list webhook deliveries",
                         f"SELECT {_OUTBOX_COLUMNS} FROM event_outbox WHERE {' AND '.join(where)} "
                         "ORDER BY seq DESC LIMIT ?", [*params, max(0, limit)])
        return [self._delivery(row) for row in rows]

    def redeliver_event(self, event_id: str, now: datetime) -> int:
        with self._write(f"redeliver event {event_id}") as conn:
            return int(conn.execute(
                "UPDATE event_outbox SET state = 'pending', next_attempt_at = ?, horizon_from = ? WHERE event_id = ?",
                (self._ts(now), self._ts(now), event_id),
            ).rowcount)

    def count_deliveries_by_state(self) -> dict[str, int]:
        rows = self._all("count webhook deliveries", "SELECT state, COUNT(*) FROM event_outbox GROUP BY state")
        return {str(row[0]): int(row[1]) for row in rows}

    def prune_deliveries(self, before: datetime) -> int:
        with self._write("prune webhook deliveries") as conn:
            return int(conn.execute("DELETE FROM event_outbox WHERE state <> 'pending' AND occurred_at < ?",
                                    (self._ts(before),)).rowcount)

    def expiring_certificates(self, before: datetime) -> list[tuple[str, str]]:
        rows = self._all("list expiring certificates",
                         "SELECT hostname, serial FROM certificates WHERE not_after < ? ORDER BY hostname",
                         (self._ts(before),))
        return [(str(row[0]), str(row[1])) for row in rows]
