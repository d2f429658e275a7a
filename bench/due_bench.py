"""Benchmark: the renewal loop's due query and the registration limits at scale.

    .venv/bin/python bench/due_bench.py [--count 100000] [--repeats 5]

Fills a SQLite store with N domains (plain SQL, one transaction, into the schema
``SqliteStorage`` creates, as ``fixtures.py`` does; no certificates: these
queries never read them) shaped like a steady state: every active name has its
next look within the next 12 hours (the ARI poll), 60 names are due now (new
registrations, DNS re-checks, retries), 30 were registered in the last hour.
Then times, in this process, the code before the 100,000-domain scale work (``list_domains()`` and a
filter in Python, kept below as the reference) against what replaced it
(``RenewalService.due()``, ``_new_work()``, ``Registry._check_limits``), checks
that both give the same answer, and prints wall and CPU milliseconds (median of
``--repeats``). It also times the one-off index build on an existing file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeproxy.edge.certstore import CertStore
from edgeproxy.config import DomainsSettings, Settings
from edgeproxy.control.registry import Registry
from edgeproxy.control.renew import RenewalService, is_due
from edgeproxy.storage.base import DomainRecord
from edgeproxy.storage.sql import SQLITE
from edgeproxy.storage.sqlite import SqliteStorage

_ts = SQLITE.encode_time

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC).replace(microsecond=0)
DUE_NOW = {"issuing": 20, "pending_dns": 20, "failing": 10, "active": 10}  # due at NOW
RECENT = 30  # registered in the last hour


def fill(path: Path, count: int) -> None:
    SqliteStorage(str(path)).close()  # the real schema, indexes included
    rng = random.Random(8)
    rows: list[tuple[str, str, str, str, str | None]] = []
    special = [status for status, n in DUE_NOW.items() for _ in range(n)]
    for i in range(count):
        created = NOW - dt.timedelta(days=rng.uniform(1, 365))
        if i < RECENT:
            created = NOW - dt.timedelta(minutes=rng.uniform(0, 59))
        if i < len(special):
            status, next_at = special[i], NOW - dt.timedelta(seconds=rng.uniform(0, 3600))
        else:
            status, next_at = "active", NOW + dt.timedelta(seconds=rng.uniform(1, 12 * 3600))
        rows.append((f"s{i:06d}.bench.test", status, _ts(created), _ts(created), _ts(next_at)))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO domains (hostname, status, created_at, updated_at, next_attempt_at) "
                     "VALUES (?, ?, ?, ?, ?)", rows)
    conn.executemany("INSERT INTO changes (hostname) VALUES (?)", [(r[0],) for r in rows])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


# -- the code before the 100,000-domain scale work, as the reference ---------------------------------------------


def old_due(storage: SqliteStorage, now: dt.datetime) -> list[DomainRecord]:
    return [d for d in storage.list_domains() if is_due(d, now)]


def old_new_work(storage: SqliteStorage, now: dt.datetime) -> list[str]:
    return [d.hostname for d in storage.list_domains()
            if is_due(d, now) and d.status in ("issuing", "pending_dns", "failing")]


def old_check_limits(storage: SqliteStorage, now: dt.datetime, max_domains: int, per_hour: int) -> int:
    domains = storage.list_domains()
    if max_domains and len(domains) >= max_domains:
        return -1
    hour_ago = now - dt.timedelta(hours=1)
    recent = sorted(d.created_at for d in domains if d.created_at > hour_ago)
    return len(recent) if not (per_hour and len(recent) >= per_hour) else -2


# -- timing --------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(median wall ms, median CPU ms, last result)."""
    walls, cpus = [], []
    result: Any = None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        cpus.append((time.process_time() - c) * 1000)
        walls.append((time.perf_counter() - w) * 1000)
    return statistics.median(walls), statistics.median(cpus), result


class _NoIssuer:
    def issue(self, hostname: str, replaces: str | None = None) -> Any:
        raise AssertionError("the bench never orders")

    def renewal_info(self, hostname: str, chain_pem: bytes) -> Any:
        raise AssertionError("the bench never asks a CA")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="due-bench-") as tmp:
        path = Path(tmp) / "state" / "edgeproxy.db"
        started = time.perf_counter()
        fill(path, args.count)
        print(f"filled {args.count:,} domains in {time.perf_counter() - started:.1f} s")

        # The one-off cost of upgrading an existing file: drop the indexes, reopen.
        conn = sqlite3.connect(path)
        conn.execute("DROP INDEX domains_next_attempt")
        conn.execute("DROP INDEX domains_created")
        conn.close()
        started = time.perf_counter()
        storage = SqliteStorage(str(path))
        print(f"open + index build on the existing file: {(time.perf_counter() - started) * 1000:.0f} ms (once)")

        try:
            service = RenewalService(storage, CertStore(storage), _NoIssuer(), clock=lambda: NOW)
            max_domains, per_hour = args.count * 2, 1000
            settings = dataclasses.replace(
                Settings(), domains=DomainsSettings(max_domains=max_domains, registrations_per_hour=per_hour))
            registry = Registry(storage, settings, clock=lambda: NOW)
            cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
                ("RenewalService.due() (full pass)",
                 lambda: old_due(storage, NOW), lambda: service.due(NOW)),
                ("RenewalService._new_work() (every 5 s)",
                 lambda: old_new_work(storage, NOW), service._new_work),
                ("Registry._check_limits() (each registration)",
                 lambda: old_check_limits(storage, NOW, max_domains, per_hour),
                 lambda: registry._check_limits("new.bench.test", NOW)),
            ]
            print(f"\n{'path':<46} {'before ms':>10} {'(CPU)':>8} {'after ms':>10} {'(CPU)':>8} {'speed-up':>9}")
            for label, before, after in cases:
                b_wall, b_cpu, b_result = timed(before, args.repeats)
                a_wall, a_cpu, a_result = timed(after, args.repeats)
                if isinstance(b_result, list):
                    assert b_result == a_result, label  # same records, same order
                print(f"{label:<46} {b_wall:>10.1f} {b_cpu:>8.1f} {a_wall:>10.2f} {a_cpu:>8.2f} "
                      f"{b_wall / a_wall:>8.0f}x")
            due = service.due(NOW)
            print(f"\n{len(due)} due at NOW, {len(service._new_work())} of them new work; "
                  f"{storage.count_domains():,} domains, "
                  f"{len(storage.domain_created_times_since(NOW - dt.timedelta(hours=1)))} registered in the last hour")
        finally:
            storage.close()


if __name__ == "__main__":
    main()
