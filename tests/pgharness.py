"""PostgreSQL for the test suite: the shared server, throwaway schemas, private clusters.

Owns: checking that the machine's PostgreSQL answers (and saying how to fix it
when it does not), creating and dropping an isolated schema per test, and
running a private throwaway cluster (``initdb`` + ``pg_ctl`` in a temporary
directory, on a free port) that a test may stop and start without touching the
shared server.
Must not import: ``pytest`` (library code), ``acme``, anything of ours but
``devtools.edgeproc.free_port``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import psycopg
from psycopg import sql

from edgeproxy.devtools.edgeproc import free_port

__all__ = [
    "DEFAULT_URL",
    "PgHarnessError",
    "main",
    "PrivateCluster",
    "require_server",
    "temp_schema",
    "with_search_path",
]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
START_HINT = (
    "start it with `make postgres` (runs `pg_ctlcluster --skip-systemctl-redirect "
    "<version> main start`), or set EDGEPROXY_TEST_PG_URL to a reachable server"
)


class PgHarnessError(RuntimeError):
    """PostgreSQL is missing, unreachable, or a private cluster did not start."""


def require_server(url: str = DEFAULT_URL, timeout: float = 5.0) -> None:
    """Raise ``PgHarnessError`` (with what to do) unless ``url`` accepts connections."""
    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise PgHarnessError(f"PostgreSQL at {url} is not reachable ({exc}); {START_HINT}") from exc


def with_search_path(url: str, schema: str) -> str:
    """``url`` with libpq ``options=-csearch_path=<schema>`` (tables land in that schema)."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}', safe='')}"


@contextmanager
def temp_schema(url: str = DEFAULT_URL, prefix: str = "edgeproxy_test") -> Iterator[str]:
    """A fresh, empty schema on ``url``; yields a URL whose search_path is it.
    Dropped (CASCADE) on exit."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        # The name is ours (hex), quoted as an identifier all the same.
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield with_search_path(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _bindir() -> Path:
    for version in sorted(Path("/usr/lib/postgresql").glob("*"), reverse=True):
        if (version / "bin" / "initdb").exists():
            return version / "bin"
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PgHarnessError("initdb not found: install Debian's postgresql package")


class PrivateCluster:
    """A throwaway PostgreSQL cluster in a temporary directory, on a free port.

    ``initdb`` refuses to run as root, so when we are root the cluster belongs to
    the ``postgres`` system user (commands run through ``runuser``). Trust
    authentication on 127.0.0.1 only; database ``test``. ``stop()``/``start()``
    may be called repeatedly (an outage in the middle of a test); ``close()``
    stops it and removes the directory.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="edgeproxy-pg-"))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "postgres.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PgHarnessError("running as root needs a 'postgres' system user for initdb") from exc
            self._user = "postgres"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        cmd = [str(a) for a in args]
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-3000:] if self.logfile.exists() else ""
            raise PgHarnessError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n{log}")

    def init(self) -> Self:
        self.sockdir.mkdir()
        if self._user:
            entry = pwd.getpwnam(self._user)
            for path in (self.root, self.sockdir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                  "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8")
        return self

    def start(self, timeout: float = 30.0) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.sockdir} "
                "-c fsync=off -c max_connections=100")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                  "-o", opts, "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)
        base = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(base, autocommit=True, connect_timeout=2) as conn:
                    if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'test'").fetchone() is None:
                        conn.execute("CREATE DATABASE test")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown: open connections are terminated, like a crashed or restarted server."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def close(self) -> None:
        try:
            if self.running():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.init()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``python tests/pgharness.py URL``: wait up to 30 s for PostgreSQL
    at URL; exit 1 with what to do when it never answers (``make postgres``)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    url = args[0] if args else DEFAULT_URL
    deadline = time.monotonic() + 30
    while True:
        try:
            require_server(url, timeout=3)
            print(f"PostgreSQL reachable at {url}")
            return 0
        except PgHarnessError as exc:
            if time.monotonic() > deadline:
                print(f"PostgreSQL is NOT reachable, the PostgreSQL tests cannot run: {exc}", file=sys.stderr)
                return 1
            time.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())
