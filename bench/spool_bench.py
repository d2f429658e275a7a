"""Benchmark of the zero-data-loss path, loopback only, bounded loops.

Processes: a minimal keep-alive HTTP relay (asyncio), two edges (``EdgeProxy`` +
``SpoolingRelay`` + ``Spool``, served by hypercorn over plain HTTP; the SNI
gate is satisfied by a wrapper so TLS cost is left out of every number), and the
load generator (this process, httpx async, keep-alive). Edge A forwards to the
relay; edge B's relay port is closed, so everything it accepts goes to its spool.

Phases, all in one session:
1. direct client -> relay (baseline): throughput, p50/p99 latency;
2. client -> edge A -> relay: throughput, p99 added latency, edge CPU per request;
3. client -> edge B -> spool (relay down): ingest rate, edge CPU per request;
4. edge B at a paced 500 req/s, then the replayer drains B's spool to the relay.

Run: ``make bench-spool`` (or ``python bench/spool_bench.py [--requests N]``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import psutil

CONCURRENCY = 16
HOST = "bench.example.test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the relay -------------------------------------------------------------------------
def relay_main(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- an edge ---------------------------------------------------------------------------
def edge_main(port: int, relay_url: str, state: str) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from edgeproxy.config import load_settings
    from edgeproxy.edge.proxy import EdgeProxy, Site
    from edgeproxy.edge.relay import HttpRelay
    from edgeproxy.edge.spool import Spool, SpoolingRelay, spool_path
    from edgeproxy.storage import open_storage

    # The proxy logs every failed relay call: a per-request line would measure the terminal.
    logging.disable(logging.WARNING)
    settings = load_settings(env={
        "EDGEPROXY_UPSTREAM_RELAY": relay_url, "EDGEPROXY_UPSTREAM_SCRIPT": relay_url + "/latest.js",
        "EDGEPROXY_STORAGE_URL": f"sqlite://{state}/edge.db",
        "EDGEPROXY_UPSTREAM_CONNECT_TIMEOUT": "0.5", "EDGEPROXY_UPSTREAM_TIMEOUT": "1.0",
        # One load generator on 127.0.0.1 is one visitor: the per-visitor and
        # per-domain API limits would answer 429 and measure nothing.
        "EDGEPROXY_PROXY_RATE_PER_IP": "0", "EDGEPROXY_PROXY_RATE_PER_DOMAIN": "0",
    })

    async def no_challenge(_token: str) -> None:
        return None

    spool = Spool(spool_path(settings), max_bytes=settings.spool.max_bytes)
    storage = open_storage(settings.storage.url)
    relay = HttpRelay(settings.upstream.relay, settings.upstream)
    proxy = EdgeProxy(settings, resolve=lambda h: Site(h, True), challenge=no_challenge, relay=relay,
                      events=SpoolingRelay(relay, spool, storage))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("extensions", {})["tls"] = {"server_name": HOST}
            await proxy.https_app(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.backlog = 1024
    asyncio.run(serve(app, config))


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


# -- load --------------------------------------------------------------------------------
async def load(url: str, headers: dict[str, str], total: int, rate: float | None = None) -> tuple[float, list[float], dict[int, int]]:
    """POST ``total`` events over CONCURRENCY keep-alive connections (paced to ``rate``
    req/s if given): (elapsed seconds, latencies, status counts).

    A raw asyncio HTTP/1.1 client: a Python HTTP client library costs more CPU per
    request than the edge itself, and the baseline must measure the relay, not us."""
    parsed = httpx.URL(url)
    host_header = headers.get("Host", f"{parsed.host}:{parsed.port}")
    body = b'{"type":"pageview","url":"https://shop.example/p/1","ts":1700000000000}'
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() != "host")
    request = (f"POST {parsed.raw_path.decode()} HTTP/1.1\r\nHost: {host_header}\r\n{extra}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_index = 0
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal next_index
        reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
        try:
            while next_index < total:
                i = next_index
                next_index += 1
                if rate is not None:
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                status = int(head.split(b" ", 2)[1])
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - start, latencies, statuses


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def measured(name: str, proc: psutil.Process | None, run: Callable[[], Awaitable[tuple[float, list[float], dict[int, int]]]]) -> dict[str, float]:
    before = cpu(proc) if proc else 0.0
    elapsed, lat, statuses = await run()
    used = (cpu(proc) - before) if proc else 0.0
    n = len(lat)
    row = {"rps": n / elapsed, "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * pct(lat, 0.99),
           "cpu_us_per_req": 1e6 * used / n if proc else 0.0}
    print(f"{name:<34} {n:>6} req  {row['rps']:>8.0f} req/s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms"
          + (f"  edge CPU {row['cpu_us_per_req']:6.0f} us/req" if proc else "") + f"  {statuses}")
    return row


async def bench(total: int, paced_seconds: float) -> int:
    from edgeproxy.config import load_settings
    from edgeproxy.edge.proxy import EdgeProxy
    from edgeproxy.edge.spool import Replayer, Spool

    spawn = multiprocessing.get_context("spawn")
    relay_port, edge_a, edge_b, dead_port = free_port(), free_port(), free_port(), free_port()
    relay_url = f"http://127.0.0.1:{relay_port}"
    with tempfile.TemporaryDirectory() as state_a, tempfile.TemporaryDirectory() as state_b:
        procs = [
            spawn.Process(target=relay_main, args=(relay_port,), daemon=True),
            spawn.Process(target=edge_main, args=(edge_a, relay_url, state_a), daemon=True),
            spawn.Process(target=edge_main, args=(edge_b, f"http://127.0.0.1:{dead_port}", state_b), daemon=True),
        ]
        for p in procs:
            p.start()
        try:
            for port in (relay_port, edge_a, edge_b):
                wait_port(port)
            pa, pb = (psutil.Process(p.pid) for p in procs[1:])
            hdr = {"Host": HOST, "Content-Type": "application/json"}
            api = "/api/v1/m/collect"
            # Warm-up: connection pools, imports, first SQLite pages.
            await load(f"{relay_url}/collect", {}, 500)
            await load(f"http://127.0.0.1:{edge_a}{api}", hdr, 500)
            await load(f"http://127.0.0.1:{edge_b}{api}", hdr, 200)

            direct = await measured("direct client -> relay", None,
                                    lambda: load(f"{relay_url}/collect", {}, total))
            fwd = await measured("client -> edge -> relay (relay up)", pa,
                                 lambda: load(f"http://127.0.0.1:{edge_a}{api}", hdr, total))
            spooled = await measured("client -> edge -> spool (relay down)", pb,
                                     lambda: load(f"http://127.0.0.1:{edge_b}{api}", hdr, total))
            paced_n = int(500 * paced_seconds)
            paced = await measured("edge ingest paced at 500 req/s", pb,
                                   lambda: load(f"http://127.0.0.1:{edge_b}{api}", hdr, paced_n, rate=500))

            settings = load_settings(env={"EDGEPROXY_UPSTREAM_RELAY": relay_url,
                                          "EDGEPROXY_SPOOL_REPLAY_RATE": "1000000"})
            spool = Spool(os.path.join(state_b, "spool.db"), max_bytes=settings.spool.max_bytes)
            depth = spool.stats(time.time()).depth
            async def no_challenge(_token: str) -> None:
                return None
            proxy = EdgeProxy(settings, resolve=lambda _h: None, challenge=no_challenge)
            replayer = Replayer(spool, proxy.relay, settings.spool)
            t0 = time.perf_counter()
            for _ in range(depth // 100 + 10):  # bounded: each pass takes up to 1000 entries
                if (await replayer.drain_once()).sent == 0:
                    break
            drain_s = time.perf_counter() - t0
            await proxy.aclose()
            left = spool.stats(time.time()).depth
            spool.close()
            drain_rps = replayer.totals.delivered / drain_s
            print(f"{'replayer drain (rate uncapped)':<34} {replayer.totals.delivered:>6} req  {drain_rps:>8.0f} req/s"
                  f"  ({left} left)")

            print()
            print("ratios (same session):")
            print(f"  forward throughput / direct          {fwd['rps'] / direct['rps']:.2f}x")
            print(f"  forward p99 added latency            {fwd['p99_ms'] - direct['p99_ms']:+.2f} ms "
                  f"(p99 {fwd['p99_ms']:.2f} vs {direct['p99_ms']:.2f} ms)")
            print(f"  spool ingest throughput / direct     {spooled['rps'] / direct['rps']:.2f}x")
            print(f"  spooled CPU / forwarded CPU per req  {spooled['cpu_us_per_req'] / fwd['cpu_us_per_req']:.2f}x"
                  f"  (target <= 2x)")
            print(f"  replayer drain / 500 req/s ingest    {drain_rps / 500:.2f}x  (target >= 3x; paced ingest "
                  f"achieved {paced['rps']:.0f} req/s)")
            print(f"  replayer drain / edge max ingest     {drain_rps / spooled['rps']:.2f}x")
            print(f"  replayer drain / direct client       {drain_rps / direct['rps']:.2f}x")
            return 0 if left == 0 else 1
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.join(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per unpaced phase")
    parser.add_argument("--paced-seconds", type=float, default=4.0, help="length of the 500 req/s phase")
    args = parser.parse_args()
    return asyncio.run(bench(args.requests, args.paced_seconds))


if __name__ == "__main__":
    sys.exit(main())
