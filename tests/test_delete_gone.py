"""DELETE /v1/domains/{host} removes the key and certificate from the
disk at once: the test reads the store files (main file, -wal, -shm) right after
the DELETE returns and finds none of their bytes.

Black-box, like the run that found 2 of 3 deletes leaving the certificate in the
main file: a real ``serve`` with 2 workers, whose certificate refreshes read the
store every second (readers that can keep a checkpoint busy).
"""

from __future__ import annotations

import base64
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin
from edgeproxy.storage.sqlite import SqliteStorage

from tlshelpers import seed

HOSTS = [f"gone{i}.example.test" for i in range(3)]


def _needles(key_pem: bytes, chain_pem: bytes) -> dict[str, bytes]:
    """Byte strings that only this key or certificate contains, in the forms storage could hold."""
    key = serialization.load_pem_private_key(key_pem, None)
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    leaf = x509.load_pem_x509_certificate(chain_pem)
    leaf_der = leaf.public_bytes(serialization.Encoding.DER)
    key_b64 = b"".join(key_pem.split(b"\n")[1:-2])
    leaf_b64 = base64.b64encode(leaf_der)
    return {
        "key DER": key_der[-40:],  # the private scalar and public point
        "key PEM": key_b64[20:80],
        "leaf DER": leaf_der[-64:],  # the CA's signature over this leaf
        "leaf PEM": leaf_b64[-80:-4],
    }


def _found(state: Path, needles: dict[str, bytes]) -> list[str]:
    hits = []
    for path in sorted(state.glob("edgeproxy.db*")):
        data = path.read_bytes()
        hits += [f"{what} in {path.name}" for what, needle in needles.items() if needle in data]
    return hits


def test_deleted_certificate_and_key_leave_the_store_files_at_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(state_dir=state, acme_directory="https://127.0.0.1:9/directory", acme_ca_bundle="",
                            script_url=origin.script_url, relay_url=f"{relay.url}/ingest",
                            extra={"renew": {"interval": 3600.0}, "monitor": {"interval": 0.0},
                                   "proxy": {"cert_refresh_interval": 0.05, "rate_per_ip": 0.0,
                                             "rate_per_domain": 0.0}})
        for host in HOSTS:
            seed(config.db_path, host)
        storage = SqliteStorage(str(config.db_path))
        needles = {}
        for host in HOSTS:
            cert = storage.get_certificate(host)
            assert cert is not None
            needles[host] = _needles(cert.key_pem, cert.chain_pem)
        storage.close()
        assert all(_found(state, n) for n in needles.values())  # the needles do find stored material

        stop = threading.Event()

        def reader() -> None:
            """Another process's reader, as a backup or a second node's refresh would be:
            short read transactions back to back."""
            conn = sqlite3.connect(config.db_path, isolation_level=None)
            while not stop.is_set():
                conn.execute("BEGIN")
                conn.execute("SELECT hostname, length(chain_pem) FROM certificates").fetchall()
                time.sleep(0.002)
                conn.execute("COMMIT")
            conn.close()

        with EdgeProcess(config, workers=2) as edge:
            readers = [threading.Thread(target=reader) for _ in range(2)]
            for thread in readers:
                thread.start()
            try:
                # A DELETE answers once the purge is done, which waits out the readers for
                # up to storage's purge_timeout (60 s): a loaded machine needed more than
                # the client's usual 10 s, so the client waits as long as the server may.
                with edge.admin(timeout=70.0) as admin:
                    for host in HOSTS:
                        assert admin.delete(f"/v1/domains/{host}").status_code == 204
                        assert _found(state, needles[host]) == [], host
            finally:
                stop.set()
                for thread in readers:
                    thread.join()


def _store_with(tmp_path: Path, host: str, **options: float) -> tuple[SqliteStorage, Path, dict[str, bytes]]:
    db = tmp_path / "db" / "edgeproxy.db"
    seed(db, host)
    storage = SqliteStorage(str(db), **options)
    cert = storage.get_certificate(host)
    assert cert is not None
    return storage, db, _needles(cert.key_pem, cert.chain_pem)


def _hold_snapshot(db: Path, seconds: float) -> threading.Thread:
    """Another process's reader holding a read transaction (an older snapshot) for ``seconds``."""
    started = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM certificates").fetchall()
        started.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    started.wait()
    return thread


def test_remove_domain_retries_a_busy_checkpoint_until_the_bytes_are_gone(tmp_path: Path) -> None:
    # busy_timeout far shorter than the reader: one checkpoint reports busy, as
    # with a slow reader in production; the purge must try again, not give up.
    storage, db, needles = _store_with(tmp_path, HOSTS[0], busy_timeout=0.05, purge_timeout=10.0)
    try:
        reader = _hold_snapshot(db, 1.0)
        started = time.monotonic()
        assert storage.remove_domain(HOSTS[0])
        assert time.monotonic() - started >= 0.8  # it waited for the reader
        assert _found(db.parent, needles) == []
        reader.join()
    finally:
        storage.close()


def test_remove_domain_raises_when_the_purge_cannot_complete(tmp_path: Path) -> None:
    from edgeproxy.errors import StorageUnavailable

    storage, db, needles = _store_with(tmp_path, HOSTS[0], busy_timeout=0.05, purge_timeout=0.3)
    seed(db, HOSTS[1])
    try:
        reader = _hold_snapshot(db, 1.5)
        with pytest.raises(StorageUnavailable, match="still in"):
            storage.remove_domain(HOSTS[0])
        assert storage.get_domain(HOSTS[0]) is None  # the removal itself is committed
        reader.join()
        assert storage.remove_domain(HOSTS[1])  # the next removal's checkpoint completes the purge
        assert _found(db.parent, needles) == []
    finally:
        storage.close()
