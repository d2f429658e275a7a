"""Benchmark fixtures: a throwaway CA, many leaf certificates, and SQLite stores holding them.

Owns: generating N registered, active domains with certificates fast enough for
``make bench`` (100,000 in well under a minute, cached under ``bench/.cache``).
Every leaf is signed by one intermediate (as with Let's Encrypt, the chain is
leaf + intermediate) and carries ~400 bytes of filler extension so that its size
is close to a real Let's Encrypt leaf with SCTs. All leaves share one P-256 key:
generating 100,000 keys would dominate the set-up time, and the edge keeps and
loads every key separately anyway (one row, one PEM copy, one context each).

Rows are written with plain SQL in one transaction into a schema created by
``SqliteStorage`` itself (the Storage API commits and fsyncs per call, which
would take minutes for 100,000 names); a change-feed row per name is written
too, exactly as ``add_domain``/``save_certificate`` would, and so is ``leaf_der``
(the leaf as DER) that ``save_certificate`` stores next to the chain.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from edgeproxy.storage.sqlite import SqliteStorage

CACHE = Path(__file__).resolve().parent / ".cache"
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
FILLER_OID = ObjectIdentifier("1.3.6.1.4.1.55555.1.1")  # private arc: OpenSSL ignores it
# In the cached stores' file names: bump it whenever the rows written below change,
# so that a store cached by an older version is not reused (2: leaf_der).
ROWS_VERSION = 2


def host(i: int) -> str:
    return f"s{i:06d}.bench.test"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_or_make_ca() -> tuple[bytes, bytes, bytes]:
    """(intermediate key PEM, intermediate cert PEM, leaf key PEM), cached."""
    CACHE.mkdir(exist_ok=True)
    paths = [CACHE / n for n in ("inter.key", "inter.pem", "leaf.key")]
    if all(p.exists() for p in paths):
        inter_key_pem, inter_pem, leaf_key_pem = (p.read_bytes() for p in paths)
        return inter_key_pem, inter_pem, leaf_key_pem
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeproxy bench root")])
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeproxy bench intermediate")])
    inter = (x509.CertificateBuilder().subject_name(inter_name).issuer_name(root_name)
             .public_key(inter_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=3650))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(root_key, hashes.SHA256()))
    out = (_pem_key(inter_key), inter.public_bytes(serialization.Encoding.PEM),
           _pem_key(ec.generate_private_key(ec.SECP256R1())))
    for p, data in zip(paths, out):
        p.write_bytes(data)
    return out


def _leaves(args: tuple[int, int]) -> list[tuple[str, bytes, bytes, str]]:
    """(hostname, leaf PEM, leaf DER, serial hex) for hosts start..stop-1 (runs in a worker process)."""
    start, stop = args
    inter_key_pem, inter_pem, leaf_key_pem = _load_or_make_ca()
    inter_key = serialization.load_pem_private_key(inter_key_pem, None)
    leaf_key = serialization.load_pem_private_key(leaf_key_pem, None)
    # Both were written by _load_or_make_ca as P-256 keys.
    assert isinstance(inter_key, ec.EllipticCurvePrivateKey) and isinstance(leaf_key, ec.EllipticCurvePrivateKey)
    inter = x509.load_pem_x509_certificate(inter_pem)
    leaf_pub = leaf_key.public_key()
    filler = os.urandom(400)
    out = []
    for i in range(start, stop):
        name = host(i)
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(inter.subject).public_key(leaf_pub).serial_number(serial)
                .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=90))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.UnrecognizedExtension(FILLER_OID, b"\x04\x82\x01\x90" + filler), critical=False)
                .sign(inter_key, hashes.SHA256()))
        out.append((name, cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER),
                    format(serial, "x")))
    return out


def _ts(value: dt.datetime) -> str:
    from edgeproxy.storage.sql import SQLITE
    return str(SQLITE.encode_time(value))


def cached_db(n: int) -> Path:
    """A SQLite store with ``n`` active domains s000000..; built once, then reused."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"store-v{ROWS_VERSION}-{n}.db"
    if path.exists():
        return path
    tmp = CACHE / f"store-v{ROWS_VERSION}-{n}.tmp.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    SqliteStorage(str(tmp)).close()  # the real schema, created by the real backend
    inter_key_pem, inter_pem, leaf_key_pem = _load_or_make_ca()
    step = 2000
    chunks = [(s, min(s + step, n)) for s in range(0, n, step)]
    now, not_before, not_after = _ts(NOW), _ts(NOW - dt.timedelta(days=1)), _ts(NOW + dt.timedelta(days=90))
    issuer = x509.load_pem_x509_certificate(inter_pem).subject.rfc4514_string()
    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for batch in pool.map(_leaves, chunks):
            conn.executemany("INSERT INTO domains (hostname, status, created_at, updated_at) VALUES (?, 'active', ?, ?)",
                             [(name, now, now) for name, _, _, _ in batch])
            conn.executemany(
                "INSERT INTO certificates (hostname, key_pem, chain_pem, not_before, not_after, serial, issuer, "
                "created_at, leaf_der) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(name, leaf_key_pem, leaf + inter_pem, not_before, not_after, serial, issuer, now, der)
                 for name, leaf, der, serial in batch])
            conn.executemany("INSERT INTO changes (hostname) VALUES (?)", [(name,) for name, _, _, _ in batch])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for suffix in ("-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    tmp.rename(path)
    return path


def install_db(n: int, state_dir: Path) -> Path:
    """Copy the cached store with ``n`` names to where an EdgeConfig expects it (mode 0600)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    dest = state_dir / "edgeproxy.db"
    shutil.copyfile(cached_db(n), dest)
    os.chmod(dest, 0o600)
    return dest


def chain_and_key(name_index: int, state_dir: Path) -> tuple[Path, Path]:
    """Files with one host's chain and key (for the ceiling server, which reads files)."""
    conn = sqlite3.connect(cached_db(max(1, name_index + 1)))
    chain, key = conn.execute("SELECT chain_pem, key_pem FROM certificates WHERE hostname = ?",
                              (host(name_index),)).fetchone()
    conn.close()
    state_dir.mkdir(parents=True, exist_ok=True)
    chain_path, key_path = state_dir / "chain.pem", state_dir / "key.pem"
    chain_path.write_bytes(chain)
    key_path.write_bytes(key)
    os.chmod(key_path, 0o600)
    return chain_path, key_path
