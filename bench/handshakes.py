"""New-TLS-handshakes-per-second client with a different SNI on every connection.

Owns: the load generator for the handshake scenario. h2load and wrk send one
SNI per run, so this client draws a random name per connection. Each worker
process runs threads that connect, complete a full TLS handshake (no session
resumption: every connection is new, as for a first visit), and close. Every
50th connection checks that the certificate served names the SNI it sent, so a
fast wrong answer cannot pass as a fast answer.

Client-side limit: the client shares the machine's 2 cores with the server and
pays for its own half of each handshake (ECDHE + signature verification is
skipped: CERT_NONE, but key exchange is not), so the absolute numbers are a
floor of what the server alone could do; the ratios between runs are the point.

Usage: ``python bench/handshakes.py PORT NAMES SECONDS [PROCS THREADS [zipf]]``
where NAMES is how many names ``s000000.bench.test``.. to draw from, uniformly
at random, or with ``zipf`` by rank with probability proportional to 1/rank
(a few busy sites and a long tail). Prints JSON.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID


def _host(i: int) -> str:
    return f"s{i:06d}.bench.test"


@dataclass
class Tally:
    """What one load process measured (sent back through a multiprocessing queue)."""

    lat: list[float] = field(default_factory=list)
    errors: int = 0
    wrong: int = 0
    checked: int = 0


def _worker(port: int, names: int, seconds: float, threads: int, seed: int, out: "multiprocessing.Queue[Tally]",
            zipf: bool = False) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    cum: list[float] | None = None
    if zipf:
        cum, acc = [], 0.0
        for rank in range(1, names + 1):
            acc += 1.0 / rank
            cum.append(acc)
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    results = Tally()

    def run(tid: int) -> None:
        rng = random.Random(seed * 1000 + tid)
        lat: list[float] = []
        errors = wrong = checked = 0
        n = 0
        while time.monotonic() < deadline:
            index = rng.choices(range(names), cum_weights=cum)[0] if cum else rng.randrange(names)
            name = _host(index)
            t0 = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    with ctx.wrap_socket(raw, server_hostname=name) as tls:
                        lat.append(time.perf_counter() - t0)
                        n += 1
                        if n % 50 == 0:
                            der = tls.getpeercert(binary_form=True)
                            cert = x509.load_der_x509_certificate(der or b"")
                            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
                            checked += 1
                            wrong += cn != name
            except OSError:
                errors += 1
        with lock:
            results.lat.extend(lat)
            results.errors += errors
            results.wrong += wrong
            results.checked += checked

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(results)


def main() -> None:
    port, names, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    procs = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    zipf = len(sys.argv) > 6 and sys.argv[6] == "zipf"
    queue: multiprocessing.Queue[Tally] = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_worker, args=(port, names, seconds, threads, s, queue, zipf))
               for s in range(procs)]
    start = time.monotonic()
    for w in workers:
        w.start()
    parts = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    elapsed = time.monotonic() - start
    lat = sorted(x for p in parts for x in p.lat)
    count = len(lat)
    print(json.dumps({
        "handshakes": count,
        "rate": count / seconds,
        "p50_ms": lat[count // 2] * 1000 if count else None,
        "p99_ms": lat[min(count - 1, int(count * 0.99))] * 1000 if count else None,
        "errors": sum(p.errors for p in parts),
        "wrong_cert": sum(p.wrong for p in parts),
        "checked": sum(p.checked for p in parts),
        "elapsed": elapsed,
    }))


if __name__ == "__main__":
    main()
