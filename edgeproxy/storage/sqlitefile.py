"""One SQLite file in WAL mode, shared by the threads and processes of a node.

Owns: the connection layer both SQLite stores use (the shared store's
``SqliteStorage`` and the node-local spool file): a connection per thread,
fork safety, enabling WAL, transactions, and handing ``sqlite3`` errors to the
owner's mapping. What is stored, the schema and the error classes belong to
the owner.
Must not import: anything of ours.

Choices (and why):

- Durability: WAL journal + ``synchronous=FULL`` (the owner's pragmas say it),
  so a committed write survives a power cut and a SIGKILL mid-transaction
  leaves the previous state (https://sqlite.org/wal.html,
  https://sqlite.org/pragma.html#pragma_synchronous). WAL needs a local
  filesystem (shared memory index): never NFS.
- One connection per thread (``threading.local``), not one shared connection
  behind a lock: with WAL, readers never wait for a writer, and a thread stuck
  in ``busy_timeout`` behind another process's write does not stall this
  process's readers. Every connection is tracked so ``close()`` closes them
  (hence ``check_same_thread=False``); connections of dead threads are closed
  when the next one is opened.
- After ``fork()`` the child never touches (not even closes) the connections it
  inherited and opens its own (https://sqlite.org/howtocorrupt.html section 2.6).
- Transactions: ``BEGIN IMMEDIATE`` for every write (the write lock is taken up
  front, so read-modify-write sequences cannot interleave and a busy database
  fails at ``BEGIN`` instead of in the middle), plain ``BEGIN`` for
  multi-statement reads (one snapshot).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

__all__ = ["SqliteFile", "is_busy"]

# Connections inherited through fork(): kept referenced so their finalizer never
# runs sqlite3_close() in the child (closing could checkpoint or unlink the WAL
# under the parent's feet). A handful of objects per fork.
_INHERITED: list[sqlite3.Connection] = []

_BUSY_NAMES = ("SQLITE_BUSY", "SQLITE_LOCKED")
_BUSY_TEXT = ("database is locked", "database table is locked")

#: ``map_error(exc, action)``: the owner's exception for a sqlite3 error while doing ``action``.
ErrorMap = Callable[[sqlite3.Error, str], Exception]


def is_busy(exc: sqlite3.Error) -> bool:
    """Another connection holds a lock we needed (retry later), as opposed to a broken file."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name.startswith(_BUSY_NAMES) or any(t in str(exc) for t in _BUSY_TEXT)


class SqliteFile:
    """Connections and transactions on one SQLite file; thread-safe, fork-safe.

    ``pragmas`` run on every new connection (``"synchronous=FULL"``, ...);
    ``busy_timeout`` (seconds) is how long a statement waits for another
    writer; ``map_error`` turns every ``sqlite3.Error`` into the owner's
    exception, so none escapes. After :meth:`close` every call raises what
    ``closed()`` returns.
    """

    def __init__(self, path: str, *, busy_timeout: float, pragmas: Sequence[str], map_error: ErrorMap,
                 closed: Callable[[], Exception]) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._pragmas = tuple(pragmas)
        self._map_error = map_error
        self._closed_error = closed
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._pid = os.getpid()
        self.closed = False

    # -- connections -----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,  # sqlite3_busy_timeout
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # close() may run on another thread
            )
        except sqlite3.Error as exc:
            raise self._map_error(exc, "open the database") from exc
        try:
            for pragma in self._pragmas:
                conn.execute(f"PRAGMA {pragma}")
        except sqlite3.Error as exc:
            conn.close()
            raise self._map_error(exc, "configure the connection") from exc
        return conn

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self.closed:
            raise self._closed_error()
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

    def enable_wal(self) -> None:
        """Put the file in WAL mode (persistent: only the first opener changes it).

        Switching needs an exclusive lock, and SQLite returns SQLITE_BUSY at once
        (no busy handler) while another process opens the same new file, so
        this retries until ``busy_timeout``."""
        conn = self.connection()
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.002
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.Error as exc:
                if not is_busy(exc) or time.monotonic() >= deadline:
                    raise self._map_error(exc, "enable WAL journal mode") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        if str(mode).lower() != "wal":
            raise self._map_error(
                sqlite3.OperationalError(f"journal mode is {mode!r}, not WAL: the file must be on a local filesystem"),
                "enable WAL journal mode")

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def write(self, action: str) -> Iterator[sqlite3.Connection]:
        """A BEGIN IMMEDIATE transaction; commits on success, rolls back on any exception."""
        with self._transaction("BEGIN IMMEDIATE", action) as conn:
            yield conn

    @contextmanager
    def read(self, action: str) -> Iterator[sqlite3.Connection]:
        """A read transaction: every SELECT inside sees one snapshot."""
        with self._transaction("BEGIN", action) as conn:
            yield conn

    @contextmanager
    def query(self, action: str) -> Iterator[sqlite3.Connection]:
        """This thread's connection for one statement (autocommit: no transaction)."""
        conn = self.connection()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise self._map_error(exc, action) from exc

    @contextmanager
    def _transaction(self, begin: str, action: str) -> Iterator[sqlite3.Connection]:
        conn = self.connection()
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
            raise self._map_error(exc, action) from exc

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection opened in this process. Idempotent."""
        if self.closed:
            return
        self.closed = True
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
