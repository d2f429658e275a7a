"""The spool, the forwarding policy and the replayer without a network.

The relay here is a plain async function standing in for ``EdgeProxy.forward``
(the seam the spool wraps); the spool file, the store and the worker processes
are real. End-to-end behaviour against a real edge is in ``test_spool_e2e.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgeproxy.config import Settings, SpoolSettings, load_settings
from edgeproxy.edge.proxy import ForwardRequest, ForwardResult
from edgeproxy.edge.spool import (
    Replayer,
    ReplayFilters,
    Spool,
    SpoolFull,
    SpoolingRelay,
    backoff_delay,
    classify,
    entry_for,
    parse_time,
    reduce_ip,
    replay_failed,
    request_for,
    spool_metrics,
    spool_path,
)
from edgeproxy.storage import open_storage

SPAWN = multiprocessing.get_context("spawn")
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def request(n: int, host: str = "a.example.com", body: bytes | None = None) -> ForwardRequest:
    key = f"key-{host}-{n}"
    return ForwardRequest(target=f"/collect?n={n}", headers=((b"content-type", b"application/json"),
                                                            (b"idempotency-key", key.encode()),
                                                            (b"x-forwarded-for", b"203.0.113.77, 10.1.2.3")),
                          body=body if body is not None else f'{{"n":{n}}}'.encode(), host=host,
                          idempotency_key=key, client="203.0.113.77", received_at=time.time())


def ok(status: int = 202) -> ForwardResult:
    return ForwardResult(status, (), b"{}")


def test_classify_retries_what_the_relay_may_take_later() -> None:
    assert classify(ok(200)) == classify(ok(204)) == classify(ok(302)) == "delivered"
    for status in (500, 502, 503, 504, 408, 429):
        assert classify(ok(status)) == "retry", status
    assert classify(ForwardResult(502, (), b"", error="connect")) == "retry"
    for status in (400, 401, 403, 404, 410, 413, 422):
        assert classify(ok(status)) == "refused", status


def test_backoff_is_exponential_jittered_and_capped() -> None:
    assert [backoff_delay(n, 0.5, 10, 0.999999) for n in (1, 2, 3, 4, 5, 6)] == pytest.approx(
        [0.5, 1, 2, 4, 8, 10], rel=1e-5)
    assert backoff_delay(3, 0.5, 10, 0.0) == 0.0
    assert backoff_delay(10_000, 0.5, 60, 0.5) == 30.0


def test_ip_retention_full_truncated_none() -> None:
    assert reduce_ip("203.0.113.77", "full") == "203.0.113.77"
    assert reduce_ip("203.0.113.77", "truncated") == "203.0.113.0"
    assert reduce_ip("2001:db8:1234:5678::1", "truncated") == "2001:db8:1234::"
    assert reduce_ip("203.0.113.77", "none") is None
    assert reduce_ip("not-an-ip", "truncated") is None


def test_parse_time_iso_and_relative() -> None:
    assert parse_time("7d", NOW) == NOW - timedelta(days=7)
    assert parse_time("90m", NOW) == NOW - timedelta(minutes=90)
    assert parse_time("2026-11-01", NOW) == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert parse_time("2026-11-01T02:00:00+02:00", NOW) == datetime(2026, 11, 1, tzinfo=timezone.utc)


def test_spool_path_defaults_next_to_the_sqlite_store(tmp_path: Path) -> None:
    settings = load_settings(env={"EDGEPROXY_STORAGE_URL": f"sqlite://{tmp_path}/x/edge.db"})
    assert spool_path(settings) == f"{tmp_path}/x/spool.db"
    assert spool_path(load_settings(env={"EDGEPROXY_SPOOL_PATH": "/srv/s.db"})) == "/srv/s.db"


def test_put_is_durable_in_arrival_order_and_commits_in_groups(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")
    spool = Spool(path, max_bytes=10**9)

    async def main() -> list[int]:
        return await asyncio.gather(*(spool.put(entry_for(request(i))) for i in range(300)))

    ids = asyncio.run(main())
    assert ids == sorted(ids)  # ids follow submission order
    assert spool.commits < 300  # several requests per fsync (group commit)
    spool.close()
    reopened = Spool(path, max_bytes=10**9)
    entries = reopened.head(1000)
    assert [e.idempotency_key for e in entries] == [f"key-a.example.com-{i}" for i in range(300)]
    assert request_for(entries[5]) == replace(request(5), received_at=entries[5].received_at)
    stats = reopened.stats(time.time())
    assert stats.depth == 300 and stats.bytes > 0 and stats.oldest_age_seconds >= 0
    assert spool_metrics(reopened, time.time())["edgeproxy_spool_depth"] == 300.0
    depth, age = reopened.depth_age()
    assert depth == 300 and age >= 0
    reopened.delete([e.id for e in entries[:100]])
    assert reopened.stats(time.time()).depth == 200
    reopened.close()


def test_full_spool_refuses_and_keeps_every_acknowledged_entry(tmp_path: Path) -> None:
    one = entry_for(request(0))
    size = one.size(one.headers_json())
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=size * 10 + size // 2)

    async def main() -> list[int | BaseException]:
        return await asyncio.gather(*(spool.put(entry_for(request(i))) for i in range(25)),
                                    return_exceptions=True)

    outcomes = asyncio.run(main())
    acked = [i for i, o in enumerate(outcomes) if isinstance(o, int)]
    assert len(acked) == 10
    assert all(isinstance(o, SpoolFull) for o in outcomes if not isinstance(o, int))
    assert [e.idempotency_key for e in spool.head(100)] == [f"key-a.example.com-{i}" for i in acked]
    spool.close()


def _writer_process(path: str, worker: int, count: int) -> None:
    spool = Spool(path, max_bytes=10**9)

    async def main() -> None:
        await asyncio.gather(*(spool.put(entry_for(request(i, f"w{worker}.example.com")))
                               for i in range(count)))

    asyncio.run(main())
    spool.close()


def test_worker_processes_share_one_spool_file(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")
    Spool(path, max_bytes=10**9).close()
    procs = [SPAWN.Process(target=_writer_process, args=(path, w, 150)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    spool = Spool(path, max_bytes=10**9)
    entries = spool.head(10_000)
    assert len(entries) == 450 and len({e.idempotency_key for e in entries}) == 450
    assert spool.stats(time.time()).domains == {f"w{w}.example.com": 150 for w in range(3)}
    spool.close()


def _spool_forever(path: str, ready: "multiprocessing.synchronize.Event") -> None:
    spool = Spool(path, max_bytes=10**9)

    async def main() -> None:
        n = 0
        while True:
            await spool.put(entry_for(request(n)))
            with open(path + ".acked", "a") as fh:  # written only after put() returned
                fh.write(f"key-a.example.com-{n}\n")
            n += 1
            if n == 20:
                ready.set()

    asyncio.run(main())


def test_sigkill_while_writing_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")
    ready = SPAWN.Event()
    proc = SPAWN.Process(target=_spool_forever, args=(path, ready))
    proc.start()
    assert ready.wait(30)
    time.sleep(0.2)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    acked = Path(path + ".acked").read_text().split()
    spool = Spool(path, max_bytes=10**9)
    stored = {e.idempotency_key for e in spool.head(1_000_000)}
    assert len(acked) >= 20
    assert set(acked) <= stored
    spool.close()


class FakeRelay:
    """A ``relay.Relay`` stand-in: answers from ``script`` (then ``default``)."""

    def __init__(self, default: int = 202) -> None:
        self.default = default
        self.fail_next = 0
        self.status_next = 0
        self.seen: list[ForwardRequest] = []

    async def send(self, req: ForwardRequest) -> ForwardResult:
        self.seen.append(req)
        if self.fail_next:
            self.fail_next -= 1
            return ForwardResult(502, (), b"", error="connect")
        return ok(self.default)

    async def aclose(self) -> None:
        return None


def settings(**kw: float) -> SpoolSettings:
    base: dict[str, float] = {"replay_rate": 10_000, "replay_window": 4, "backoff_base": 0.01,
                              "backoff_cap": 0.05, "poll_interval": 0.01}
    base.update(kw)
    return SpoolSettings(**base)  # type: ignore[arg-type]


def test_forwarder_policy_spools_retryable_logs_refused(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=10**9)
    store = open_storage(f"sqlite://{tmp_path}/edge.db")
    relay = FakeRelay()
    fwd = SpoolingRelay(relay, spool, store, ip_retention="truncated")

    async def main() -> list[int]:
        statuses = [(await fwd.send(request(0))).status]
        relay.fail_next = 1
        statuses.append((await fwd.send(request(1))).status)
        relay.default = 401
        statuses.append((await fwd.send(request(2))).status)
        return statuses

    assert asyncio.run(main()) == [202, 202, 401]
    assert [e.idempotency_key for e in spool.head(10)] == ["key-a.example.com-1"]
    (logged,) = store.find_failed_requests()
    assert (logged.idempotency_key, logged.status, logged.origin) == ("key-a.example.com-2", 401, "relay")
    assert logged.client == "203.0.113.0"
    assert dict(logged.headers)[b"x-forwarded-for"] == b"203.0.113.0, 10.1.2.0"
    spool.close()
    store.close()


def test_probe_events_are_never_spooled_nor_logged(tmp_path: Path) -> None:
    """A probe must see the live relay: a spooled 202 would hide the outage it pages about."""
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=10**9)
    store = open_storage(f"sqlite://{tmp_path}/edge.db")
    relay = FakeRelay()
    fwd = SpoolingRelay(relay, spool, store)
    probe = dataclasses.replace(request(0), headers=request(0).headers + ((b"x-edgeproxy-probe", b"1"),))

    async def main() -> list[int]:
        relay.fail_next = 1
        down = (await fwd.send(probe)).status
        relay.default = 401
        refused = (await fwd.send(probe)).status
        relay.default = 202
        return [down, refused, (await fwd.send(probe)).status]

    assert asyncio.run(main()) == [502, 401, 202]
    assert spool.head(10) == [] and store.find_failed_requests() == []
    spool.close()
    store.close()


def test_replayer_drains_in_arrival_order_with_backoff_then_dead_letters(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=10**9)
    store = open_storage(f"sqlite://{tmp_path}/edge.db")
    spool.put_many(entry_for(request(i, host)) for i in range(10) for host in ("a.x.com", "b.x.com"))
    relay = FakeRelay()
    relay.fail_next = 3
    alerts: list[str] = []
    replayer = Replayer(spool, relay, settings(), storage=store, alert=lambda code, _m: alerts.append(code))

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(replayer.run(stop))
        for _ in range(500):
            if spool.stats(time.time()).depth == 0:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(main())
    assert spool.stats(time.time()).depth == 0
    delivered = [r for r in relay.seen]
    for host in ("a.x.com", "b.x.com"):
        keys = [r.idempotency_key for r in delivered if r.host == host]
        # Every key at least once; the first delivery of each follows arrival order.
        firsts = list(dict.fromkeys(keys))
        assert firsts == [f"key-{host}-{i}" for i in range(10)]
    assert replayer.totals.retried >= 1 and replayer.totals.delivered == 20

    # Dead letters: with the clock 8 days ahead, an undeliverable entry moves and alerts.
    spool.put_many([entry_for(request(99))])
    relay.fail_next = 100
    later = Replayer(spool, relay, settings(dead_letter_days=7), storage=store,
                     clock=lambda: time.time() + 8 * 86400, alert=lambda code, _m: alerts.append(code))
    result = asyncio.run(later.drain_once())
    assert result.dead == 1 and alerts == ["spool_dead_letter"]
    stats = spool.stats(time.time())
    assert stats.depth == 0 and stats.dead_letters == 1
    spool.close()
    store.close()


def test_replayer_moves_newly_refused_entries_to_the_failed_log(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=10**9)
    store = open_storage(f"sqlite://{tmp_path}/edge.db")
    spool.put_many(entry_for(request(i)) for i in range(3))
    result = asyncio.run(Replayer(spool, FakeRelay(403), settings(), storage=store).drain_once())
    assert result.refused == 3 and spool.stats(time.time()).depth == 0
    assert [r.status for r in store.find_failed_requests()] == [403, 403, 403]
    spool.close()
    store.close()


def test_replay_failed_sends_each_once_and_a_second_run_nothing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeproxy.edge.spool

    monkeypatch.setattr(edgeproxy.edge.spool, "_REPLAY_PAGE", 5)  # several pages: streamed, never all in memory
    store = open_storage(f"sqlite://{tmp_path}/edge.db")
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=10**9)
    fwd = SpoolingRelay(FakeRelay(401), spool, store)
    for i in range(12):
        asyncio.run(fwd.send(request(i, "a.x.com" if i % 3 else "b.x.com")))
    relay = FakeRelay()
    seen_progress: list[tuple[int, int, str]] = []
    dry = asyncio.run(replay_failed(store, relay, ReplayFilters(), dry_run=True,
                                    progress=lambda d, t, _r, o: seen_progress.append((d, t, o))))
    assert dry.selected == 12 and relay.seen == []
    assert seen_progress == [(i, 12, "would send") for i in range(1, 13)]
    only_b = asyncio.run(replay_failed(store, relay, ReplayFilters(domain="b.x.com", status=401)))
    assert (only_b.selected, only_b.delivered) == (4, 4)
    rest = asyncio.run(replay_failed(store, relay, ReplayFilters(since=NOW - timedelta(days=3650))))
    assert (rest.selected, rest.delivered, rest.failed) == (8, 8, 0)
    keys = [r.idempotency_key for r in relay.seen]
    assert sorted(keys) == sorted(f"key-{'a.x.com' if i % 3 else 'b.x.com'}-{i}" for i in range(12))
    assert all(dict(r.headers)[b"idempotency-key"] == r.idempotency_key.encode() for r in relay.seen)
    again = asyncio.run(replay_failed(store, relay, ReplayFilters()))
    assert again.selected == 0 and len(relay.seen) == 12
    spool.close()
    store.close()


def test_config_keys_for_issue_3() -> None:
    s: Settings = load_settings(env={"EDGEPROXY_SPOOL_MAX_BYTES": "4096", "EDGEPROXY_PRIVACY_IP_RETENTION": "none",
                                     "EDGEPROXY_FAILED_LOG_RETENTION_DAYS": "30"})
    assert (s.spool.max_bytes, s.privacy.ip_retention, s.failed_log.retention_days) == (4096, "none", 30.0)
    with pytest.raises(Exception, match="ip_retention"):
        load_settings(env={"EDGEPROXY_PRIVACY_IP_RETENTION": "partial"})
