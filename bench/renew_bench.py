"""Benchmark: one renewal pass over N certificates that are all due at once, against real Pebble.

    .venv/bin/python bench/renew_bench.py [--count 1000] [--concurrency 32]

Seeds N active domains whose (self-signed, 90-day) certificates are past their
renewal time, then runs ``RenewalService.run_pass()`` once: every name goes
through the ARI check (Pebble 2.4 has none: backstop), a real ACME order,
HTTP-01 validation against a local responder that answers from the same SQLite
store, finalization and the atomic save. Pebble runs with PEBBLE_VA_NOSLEEP=1
and no random nonce rejection. The DNS pre-check is off and the rate budgets
are unlimited (at Let's Encrypt 1,000 renewals need ARI's exemption from the
300-orders-per-3-hours budget). Prints wall time, certificates per second, peak
orders in flight and resident memory sampled through the pass.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime as dt
import gc
import json
import resource
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeproxy.control.acme_client import AcmeIssuer
from edgeproxy.edge.certstore import CertStore
from edgeproxy.devtools.pebble import ChallTestSrv, Pebble
from edgeproxy.devtools.upstreams import Http01Responder
from edgeproxy.control.renew import RenewalService, RenewPolicy
from edgeproxy.storage.sqlite import SqliteStorage

UTC = dt.timezone.utc


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def self_signed(hostname: str, now: dt.datetime) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=80)).not_valid_after(now + dt.timedelta(days=10))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--trace", action="store_true", help="print the top Python allocations left after the pass")
    parser.add_argument("--no-refresh", action="store_true",
                        help="like cron `edgeproxy renew`: do not load the new certificates into this process's SNI map")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ChallTestSrv(default_ipv4="127.0.0.1", default_ipv6="") as dns:
        storage = SqliteStorage(str(Path(tmp) / "bench.db"))
        http = Http01Responder(storage.get_challenge)
        with Pebble(http_port=http.port, nonce_reject=0, dns_server=dns.dns_address) as pebble:
            now = dt.datetime.now(UTC)
            certstore = CertStore(storage)
            names = [f"n{i:04d}.bench.test" for i in range(args.count)]
            for name in names:
                storage.add_domain(name, "active", now)
                key_pem, chain_pem = self_signed(name, now)
                certstore.save(name, key_pem, chain_pem, now)
                storage.update_domain(name, now, status="active", next_attempt_at=now)
            issuer = AcmeIssuer(storage=storage, directory_url=pebble.directory_url,
                                ca_bundle=str(pebble.ca_bundle_path), timeout=120)
            service = RenewalService(
                storage, certstore, issuer, concurrency=args.concurrency, dns=None,
                policy=RenewPolicy(account=pebble.directory_url, orders_per_3h=0, certs_per_domain=0,
                                   duplicate_certs=0, failed_validations=0, extra_suffixes=("test",)),
            )
            samples: list[float] = []
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    samples.append(rss_mib())
                    time.sleep(0.5)

            if args.trace:
                tracemalloc.start(10)
            sampler = threading.Thread(target=sample, daemon=True)
            rss_before = rss_mib()
            sampler.start()
            started = time.monotonic()
            result = asyncio.run(service.run_pass(refresh=not args.no_refresh))
            wall = time.monotonic() - started
            done.set()
            sampler.join()
            if args.trace:
                gc.collect()
                snapshot = tracemalloc.take_snapshot()
                print(f"python heap after the pass: {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MiB")
                for stat in snapshot.statistics("traceback")[:5]:
                    print(stat)
                    for line in stat.traceback.format()[-6:]:
                        print("   ", line)
            # Separate memory still in use from memory glibc merely keeps: OpenSSL's
            # many small allocations per order fragment the heap, and free()d
            # pages are not returned to the OS until trimmed.
            gc.collect()
            rss_after_pass = rss_mib()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            rss_after_trim = rss_mib()
            renewed = sum(1 for n in names if (c := storage.get_certificate(n)) is not None
                          and "Pebble" in c.issuer)
            quarter = max(1, len(samples) // 4)
            report = {
                "certificates": args.count,
                "concurrency": args.concurrency,
                "issued": len(result.issued),
                "failed": len(result.failed),
                "renewed_by_pebble": renewed,
                "wall_seconds": round(wall, 1),
                "certs_per_second": round(len(result.issued) / wall, 1),
                "peak_orders_in_flight": result.orders_in_flight_peak,
                "rss_mib_before": round(rss_before, 1),
                "rss_mib_first_quarter_max": round(max(samples[:quarter]), 1),
                "rss_mib_last_quarter_max": round(max(samples[-quarter:]), 1),
                "rss_mib_peak": round(max(samples), 1),
                "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "rss_mib_after_pass_gc": round(rss_after_pass, 1),
                "rss_mib_after_malloc_trim": round(rss_after_trim, 1),
                "tls_contexts_held": len(certstore.cache),
            }
            if result.failed:
                report["first_failure"] = str(next(iter(result.failed.values())))
            print(json.dumps(report, indent=2))
        http.close()
        storage.close()


if __name__ == "__main__":
    main()
