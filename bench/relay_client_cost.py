"""CPU per relay call, in process: ``python bench/relay_client_cost.py [N] [CONCURRENCY] [PASSES]``.

Starts the fast relay (``relay.py``) as its own process, then, in this process on
uvloop, sends N forwarded events through ``HttpRelay.send`` per client and kind (a
POST event and a GET beacon with the headers the edge forwards), CONCURRENCY at a
time, and reports this process's CPU time (``time.process_time``: user + system,
so the shared machine's load moves it far less than req/s) per call, in
microseconds, the median over PASSES alternating passes. ``--profile`` runs one
long pass of the default client under py-spy instead (own time by frame).
``--only=POST`` or ``--only=GET beacon`` runs one kind: under ``valgrind --tool=callgrind``
two runs of different N give instructions per call from the difference of their
totals (README, "relay client CPU per event"), which the machine's load moves not at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

from edgeproxy.config import UpstreamSettings  # noqa: E402
from edgeproxy.devtools.edgeproc import free_port  # noqa: E402
from edgeproxy.edge.relay import ForwardRequest, HttpRelay  # noqa: E402

HOST = "shop.example.test"
HEADERS = (
    (b"content-type", b"text/plain;charset=UTF-8"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"),
    (b"accept-language", b"en-US,en;q=0.9"),
    (b"origin", b"https://shop.example.test"),
    (b"referer", b"https://shop.example.test/products/42?utm_source=news"),
    (b"x-forwarded-for", b"198.51.100.7"),
    (b"x-forwarded-host", HOST.encode()),
    (b"x-forwarded-proto", b"https"),
    (b"idempotency-key", b"0f" * 16),
)
BODY = b'{"n":"pageview","u":"https://shop.example.test/products/42","d":"shop.example.test","r":null,"w":1280}'
KINDS = {
    "POST": ForwardRequest("/api/event", HEADERS, BODY, HOST),
    "GET beacon": ForwardRequest("/api/event?n=pageview&u=https%3A%2F%2Fshop.example.test%2Fp%2F42&d=shop.example.test&w=1280",
                                 tuple(h for h in HEADERS if h[0] != b"content-type"), b"", HOST, method="GET"),
}
# httpx on httpcore's pool: ~5,000 us per call at 50 in flight (2026-12-03), left out.
CLIENTS = ("aiohttp",)


async def measure(relay: HttpRelay, request: ForwardRequest, n: int, concurrency: int) -> float:
    """CPU microseconds per ``relay.send`` over n calls (after a warm-up), concurrency at a time.

    A GET beacon's query differs per call (a page URL, a timestamp), so each call gets
    its own target: a per-target cache in the client must not flatter beacons."""
    targets = [f"{request.target}&t={i}" for i in range(n)] if request.method == "GET" else [request.target] * n
    requests = [dataclasses.replace(request, target=t) for t in targets]

    async def worker(count: int) -> None:
        for _ in range(count):
            result = await relay.send(requests.pop())
            assert result.status == 202, result

    requests *= 2  # the warm-up's calls too
    await asyncio.gather(*(worker(20) for _ in range(concurrency)))  # pool filled, imports done
    started = time.process_time()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    return (time.process_time() - started) / (n // concurrency * concurrency) * 1e6


async def one(client: str, kind: str, port: int, n: int, concurrency: int) -> float:
    relay = HttpRelay(f"http://127.0.0.1:{port}/ingest", UpstreamSettings(client=client, pool_size=64))
    try:
        return await measure(relay, KINDS[kind], n, concurrency)
    finally:
        await relay.aclose()


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 20000
    concurrency = int(args[1]) if len(args) > 1 else 50
    passes = int(args[2]) if len(args) > 2 else 5
    port = free_port()
    relay = subprocess.Popen([run.PY, str(run.HERE / "relay.py"), str(port)], stdout=subprocess.PIPE)
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == b"ready"
        if "--profile" in sys.argv:
            for kind in KINDS:
                print(kind, f"{uvloop.run(one('aiohttp', kind, port, n, concurrency)):.1f} us/call")
            return
        kinds = [k for k in KINDS if f"--only={k}" in sys.argv] or list(KINDS)
        samples: dict[tuple[str, str], list[float]] = {(c, k): [] for c in CLIENTS for k in kinds}
        for _ in range(passes):
            for key in samples:
                samples[key].append(uvloop.run(one(*key, port, n, concurrency)))
        print(f"CPU us per HttpRelay.send, median of {passes} passes of {n} calls, {concurrency} in flight")
        for (client, kind), values in samples.items():
            print(f"{client:8} {kind:10} {statistics.median(values):7.1f}  (min {min(values):.1f}, max {max(values):.1f})")
    finally:
        relay.terminate()
        relay.wait()


if __name__ == "__main__":
    main()
