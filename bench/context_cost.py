"""What one per-name ``SSLContext`` costs on the default TLS path: CPU per part and memory.

Owns: the microbenchmark behind the choice of the default path's cache size and
context build (bench/README.md, "The default TLS path"). Builds contexts from
EC P-256 material like the bench store's (PKCS#8 key, leaf + one intermediate),
times each part of ``certstore.build_context`` and of variants, and measures
the RSS one cached context holds (OpenSSL allocates with libc ``malloc``, which
tracemalloc does not see; tracemalloc is reported too, for the Python side).

Also times reloading a context that held another name's certificate (measured, not
kept: bench/README.md). Usage: ``python bench/context_cost.py [N]`` (default 2,000). Prints JSON.
"""

from __future__ import annotations

import gc
import json
import os
import ssl
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402

from edgeproxy.edge import tlspolicy  # noqa: E402
from edgeproxy.edge.certstore import ALPN_PROTOCOLS, CertStore, build_context  # noqa: E402


def rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def per_call_us(fn: Callable[[int], object], n: int) -> float:
    t0 = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    from edgeproxy.storage.sqlite import SqliteStorage

    db = fixtures.cached_db(10_000)
    store = CertStore(SqliteStorage(str(db)), cache_size=n + 10)
    store.refresh_blocking()
    names = sorted(store._material)[:n]
    pairs = [store._codec.unpack(store._material[name]) for name in names]  # (chain_pem, key_pem)
    leaf_only = [(c.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n", k) for c, k in pairs]

    def memfd_load(ctx: ssl.SSLContext, material: bytes) -> None:
        fd = os.memfd_create("edgeproxy-cert", os.MFD_CLOEXEC)
        try:
            os.write(fd, material)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

    def bare(i: int) -> ssl.SSLContext:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def policy(i: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tlspolicy.apply(ctx, "intermediate")
        ctx.set_alpn_protocols(ALPN_PROTOCOLS)
        return ctx

    def full(i: int) -> ssl.SSLContext:
        chain, key = pairs[i]
        return build_context(chain, key)

    def no_inter(i: int) -> ssl.SSLContext:
        chain, key = leaf_only[i]
        return build_context(chain, key)

    def empty_file(i: int) -> None:
        fd = os.memfd_create("edgeproxy-cert", os.MFD_CLOEXEC)
        os.write(fd, pairs[i][0])
        with open(f"/proc/self/fd/{fd}", "rb") as fh:
            fh.read()
        os.close(fd)

    # Measured and not kept: reloading a context that another name's certificate
    # was evicted from (load_cert_chain into it) instead of building a new one.
    spare = [full(i) for i in range(n)]
    calls = iter(range(10 * n))

    def reload_evicted(i: int) -> ssl.SSLContext:
        c = next(calls)
        ctx = spare[(i + c // n + 1) % n]  # holds another name's certificate, same key type
        chain, key = pairs[i]
        memfd_load(ctx, chain.rstrip(b"\n") + b"\n" + key)
        return ctx

    timings = {}
    for label, fn in [("SSLContext()", bare), ("SSLContext + policy + ALPN", policy),
                      ("memfd write + open + read", empty_file),
                      ("build_context, leaf only", no_inter), ("build_context, leaf + intermediate", full),
                      ("reload an evicted context, leaf + intermediate", reload_evicted)]:
        fn(0)
        timings[label] = round(min(per_call_us(fn, n) for _ in range(3)), 1)

    # Memory per context as the cache holds it: RSS and tracemalloc around n contexts kept.
    gc.collect()
    before = rss_kb()
    tracemalloc.start()
    kept = [full(i) for i in range(n)]
    py_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    gc.collect()
    after = rss_kb()
    print(json.dumps({
        "contexts": n, "openssl": ssl.OPENSSL_VERSION, "us_per_call (CPU, best of 3)": timings,
        "rss_kb_per_context": round((after - before) / len(kept), 2),
        "tracemalloc_bytes_per_context": round(py_bytes / len(kept), 1),
    }, indent=1))


if __name__ == "__main__":
    main()
