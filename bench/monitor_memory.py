"""Memory and CPU of one monitor round and one /metrics render over a large store, before
and after the 100,000-domain scale work's statuses-only reads: ``python bench/monitor_memory.py [STORE.db] [rounds]``.

Copies the store (default: ``bench/.cache/store-v2-100000.db`` of the main checkout, built
by ``bench/fixtures.py``) to a temporary directory, never opening the original, then runs
each measurement in a fresh interpreter so that peak and settled RSS belong to it alone:

- ``round``: ``MonitorService.run_round`` with a prober that answers at once (no network,
  no pacing), ``before`` being the round as it was (every record at the start and the end,
  every condition built) and ``after`` the current one. RSS is sampled every 2 ms in a
  thread (peak per round); settled RSS is read after ``gc.collect()``.
- ``trace``: the same rounds under ``tracemalloc`` (peak and retained Python allocations;
  a separate process, since tracing inflates RSS).
- ``metrics``: CPU time of rendering /metrics' state gauges, before (a Counter over
  ``list_domains()``) and after (``count_domains_by_status()``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from edgeproxy.config import Settings
from edgeproxy.metrics import StateCollector, render, scrape_registry
from edgeproxy.control.monitor import (
    PROBED_STATUSES, Alert, AlertDispatcher, MonitorService, ProbeResult, Step, conditions, increase_over)
from edgeproxy.storage import Storage, open_storage

DEFAULT_STORE = Path("/work/main/bench/.cache/store-v2-100000.db")


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class FastProber:
    """A passing probe, built like the real one (new steps and strings per probe), without I/O."""

    async def probe(self, hostname: str) -> ProbeResult:
        now = dt.datetime.now(dt.timezone.utc)
        steps = (Step("dns", True, "--connect 127.0.0.1"), Step("tls", True, f"{60.0:.1f}d left"),
                 Step("script", True, "200 rewritten"), Step("event", True, str(202)))
        return ProbeResult(hostname, True, steps, now, 0.004, 60.0, "127.0.0.1")


class BeforeMonitor(MonitorService):
    """``run_round`` as of e1d5328 (before the scale work's statuses-only reads); a failed probe prints instead of logging."""

    async def run_round(self) -> list[Alert]:
        domains = await asyncio.to_thread(self.storage.list_domains)
        now = self.clock()
        for domain in domains:
            if domain.status == "failing":
                self.failing_since.setdefault(domain.hostname, now)
            else:
                self.failing_since.pop(domain.hostname, None)
        known = {d.hostname for d in domains}
        for host in [h for h in self.failing_since if h not in known]:
            del self.failing_since[host]
        hosts = [d.hostname for d in domains if d.status in PROBED_STATUSES]
        del domains, known
        results = await self.probe_all(hosts)
        fresh = {r.hostname: r for r in results}
        self.consecutive_failures = {
            r.hostname: 0 if r.ok else self.consecutive_failures.get(r.hostname, 0) + 1 for r in results}
        self.results = fresh
        if self.on_result is not None:
            for result in results:
                self.on_result(result)
        for result in results:
            if not result.ok:
                print(f"probe failed for {result.hostname}: {result.failure}", file=sys.stderr)
        spool = await asyncio.to_thread(self.spool_stats) if self.spool_stats is not None else None
        relay_4xx: float | None = None
        if self.relay_4xx_total is not None:
            total = await asyncio.to_thread(self.relay_4xx_total)
            mono = time.monotonic()
            self._relay_samples.append((mono, total))
            window = self.settings.monitor.relay_4xx_window
            while len(self._relay_samples) > 2 and self._relay_samples[1][0] <= mono - window:
                self._relay_samples.pop(0)
            relay_4xx = increase_over(self._relay_samples, mono, window)
        domains = await asyncio.to_thread(self.storage.list_domains)
        round_conditions = conditions(results=results, domains=domains, failing_since=self.failing_since,
                                      now=self.clock(), settings=self.settings, spool=spool, relay_4xx=relay_4xx,
                                      consecutive_failures=self.consecutive_failures)
        alerts = self.state.evaluate(round_conditions, self.clock())
        await self.dispatcher.dispatch(alerts)
        return alerts


def service(variant: str, storage: Storage) -> MonitorService:
    base = Settings()
    settings = dataclasses.replace(base, monitor=dataclasses.replace(base.monitor, interval=0.0))
    cls = BeforeMonitor if variant == "before" else MonitorService
    return cls(settings, storage, FastProber(), AlertDispatcher([]),  # type: ignore[arg-type]
               spool_stats=lambda: (0, 0.0), relay_4xx_total=lambda: 0.0)


def child_round(variant: str, db: str, rounds: int, trace: bool) -> dict[str, Any]:
    storage = open_storage(f"sqlite://{db}")
    svc = service(variant, storage)
    gc.collect()
    out: dict[str, Any] = {"variant": variant, "start_rss_mb": rss_kb() / 1024, "rounds": []}
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb())
            time.sleep(0.002)

    if trace:
        tracemalloc.start()
    for _ in range(rounds):
        row: dict[str, Any] = {}
        if trace:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
        else:
            peak[0] = rss_kb()
            sampler = threading.Thread(target=sample, daemon=True)
            stop.clear()
            sampler.start()
        cpu, wall = time.process_time(), time.perf_counter()
        asyncio.run(svc.run_round())
        row["cpu_s"], row["wall_s"] = time.process_time() - cpu, time.perf_counter() - wall
        gc.collect()
        if trace:
            current, top = tracemalloc.get_traced_memory()
            row["traced_before_mb"] = before / 2**20
            row["traced_peak_mb"] = top / 2**20
            row["traced_after_mb"] = current / 2**20
        else:
            stop.set()
            sampler.join()
            row["peak_rss_mb"] = peak[0] / 1024
            row["settled_rss_mb"] = rss_kb() / 1024
        out["rounds"].append(row)
    out["results_held"] = len(svc.results)
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    storage.close()
    return out


def child_metrics(variant: str, db: str) -> dict[str, Any]:
    storage = open_storage(f"sqlite://{db}")
    if variant == "before":
        def counts() -> collections.Counter[str]:
            return collections.Counter([d.status for d in storage.list_domains()])
        state = StateCollector(domain_counts=counts, cert_expiries=lambda: [])
    else:
        state = StateCollector(domain_counts=storage.count_domains_by_status, cert_expiries=lambda: [])
    times = []
    text = b""
    for _ in range(5):
        cpu = time.process_time()
        text = render(scrape_registry(state))
        times.append(time.process_time() - cpu)
    storage.close()
    lines = [line for line in text.decode().splitlines() if line.startswith("edgeproxy_domains{")]
    return {"variant": variant, "render_cpu_ms_median": statistics.median(times) * 1000,
            "render_cpu_ms_all": [round(t * 1000, 1) for t in times], "domains": lines,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, variant, db, rounds = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        result = child_metrics(variant, db) if kind == "metrics" else child_round(variant, db, rounds,
                                                                                  kind == "trace")
        print(json.dumps(result))
        return
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_STORE
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "store.db"
        shutil.copyfile(source, db)  # opening a store may migrate it: never the original
        results = []
        for kind in ("round", "trace", "metrics"):
            for variant in ("before", "after"):
                proc = subprocess.run([sys.executable, __file__, "--child", kind, variant, str(db), str(rounds)],
                                      check=True, capture_output=True, text=True)
                result = {"kind": kind, **json.loads(proc.stdout.strip().splitlines()[-1])}
                results.append(result)
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
