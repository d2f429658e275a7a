"""CertStore at scale: lazy contexts in a bounded LRU, bulk loading, and
that the right certificate is served for the right SNI, and a removed name is not."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeproxy.edge.certstore import CertStore, record_from_pem
from edgeproxy.edge.tlsnative import handshake
from edgeproxy.control.keys import SealedStorage, generate_master_key, load_keyring
from edgeproxy.config import StorageSettings
from edgeproxy.storage.base import Storage, leaf_der_of
from edgeproxy.storage.sqlite import SqliteStorage

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test intermediate")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


CA_KEY, CA_CERT = _ca()


def _pair(host: str, serial: int = 2, days: int = 90) -> tuple[bytes, bytes]:
    """(key_pem, chain_pem): a leaf for ``host`` plus the shared intermediate."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(CA_CERT.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(CA_KEY, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    chain = leaf.public_bytes(serialization.Encoding.PEM) + CA_CERT.public_bytes(serialization.Encoding.PEM)
    return key_pem, chain


def _register(storage: Storage, host: str, serial: int = 2, days: int = 90) -> None:
    if storage.get_domain(host) is None:
        storage.add_domain(host, "active", NOW)
    key_pem, chain = _pair(host, serial, days)
    storage.save_certificate(record_from_pem(host, key_pem, chain, NOW))


def _served(store: CertStore, name: str) -> x509.Certificate:
    """Run a real TLS handshake in memory with SNI = ``name``; the leaf the server chose."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    der = handshake(store.server_context(), client_ctx, name)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture
def storage(tmp_path: Path) -> SqliteStorage:
    return SqliteStorage(str(tmp_path / "db" / "edge.db"))


@pytest.fixture(params=[True, False], ids=["native", "contexts"])
def make_store(request: pytest.FixtureRequest) -> Callable[..., CertStore]:
    """Every test runs on both ways of serving a name: the opt-in native
    per-connection path (which must load on this machine) and one built
    SSLContext per name (the default)."""
    def make(storage: Any, cache_size: int) -> CertStore:
        store = CertStore(storage, cache_size=cache_size, native=request.param)
        assert (store.native is not None) is request.param
        return store
    return make


def test_nothing_is_built_at_refresh_and_each_sni_gets_its_own_certificate(storage: SqliteStorage,
        make_store: Callable[..., CertStore]) -> None:
    hosts = [f"shop{i}.example.test" for i in range(12)]
    for host in hosts:
        _register(storage, host)
    store = make_store(storage, cache_size=4)
    assert store.refresh_blocking(NOW) == len(hosts)
    assert store.built == 0 and not store.cache  # lazy: no context before a handshake
    assert all(store.hosts[h] for h in hosts)
    for host in reversed(hosts):
        served = _served(store, host)
        assert served is not None
        assert _cn(served) == host
    assert store.built == len(hosts)
    assert len(store.cache) == 4  # bounded
    assert list(store.cache) == list(reversed(hosts))[-4:]  # the most recently used survive


def test_lru_keeps_hot_names_and_rebuilds_evicted_ones_correctly(storage: SqliteStorage,
        make_store: Callable[..., CertStore]) -> None:
    for host in ("a.example.test", "b.example.test", "c.example.test"):
        _register(storage, host)
    store = make_store(storage, cache_size=2)
    store.refresh_blocking(NOW)
    a = store.certificate_for("a.example.test")
    store.certificate_for("b.example.test")
    assert store.certificate_for("a.example.test") is a  # a hit: same object, now most recent
    store.certificate_for("c.example.test")  # evicts b, the least recently used
    assert set(store.cache) == {"a.example.test", "c.example.test"}
    built = store.built
    served = _served(store, "b.example.test")
    assert _cn(served) == "b.example.test"
    assert store.built == built + 1


def test_unknown_removed_and_expired_names_get_the_fallback(storage: SqliteStorage,
        make_store: Callable[..., CertStore]) -> None:
    _register(storage, "keep.example.test")
    _register(storage, "gone.example.test")
    _register(storage, "old.example.test", days=0)  # not_after == NOW: no longer valid
    store = make_store(storage, cache_size=8)
    store.refresh_blocking(NOW)
    assert store.hosts["old.example.test"] is False  # expired: registered, not servable
    served = _served(store, "gone.example.test")
    assert _cn(served) == "gone.example.test"
    assert "gone.example.test" in store.cache
    storage.remove_domain("gone.example.test")
    store.refresh_blocking(NOW)
    assert "gone.example.test" not in store.hosts
    assert "gone.example.test" not in store.cache  # the built context went with it
    for name in ("gone.example.test", "old.example.test", "never.example.test"):
        served = _served(store, name)
        assert _cn(served) == "edgeproxy-fallback.invalid"
    served = _served(store, "keep.example.test")
    assert _cn(served) == "keep.example.test"


def test_renewal_replaces_a_cached_context(storage: SqliteStorage,
        make_store: Callable[..., CertStore]) -> None:
    _register(storage, "r.example.test", serial=10)
    store = make_store(storage, cache_size=8)
    store.refresh_blocking(NOW)
    first = _served(store, "r.example.test")
    assert first.serial_number == 10
    _register(storage, "r.example.test", serial=11)
    store.refresh_blocking(NOW)
    second = _served(store, "r.example.test")
    assert second.serial_number == 11


def test_the_chain_is_served_whole_and_intermediates_are_shared(storage: SqliteStorage,
        make_store: Callable[..., CertStore]) -> None:
    _register(storage, "x.example.test")
    _register(storage, "y.example.test")
    store = make_store(storage, cache_size=8)
    store.refresh_blocking(NOW)
    assert store._codec._tails == [CA_CERT.public_bytes(serialization.Encoding.PEM)]  # one shared copy
    chain, key = store._codec.unpack(store._material["x.example.test"])
    assert chain.count(b"BEGIN CERTIFICATE") == 2 and key.startswith(b"-----BEGIN PRIVATE KEY-----")
    # TLS 1.2 sends the Certificate message in the clear: the intermediate must be in it.
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    sent: list[bytes] = []
    leaf = handshake(store.server_context(), client, "x.example.test", sent)
    assert leaf is not None and _cn(x509.load_der_x509_certificate(leaf)) == "x.example.test"
    assert CA_CERT.public_bytes(serialization.Encoding.DER) in b"".join(sent)


def test_bulk_scan_matches_point_reads_and_sealed_storage_opens_keys(tmp_path: Path,
        make_store: Callable[..., CertStore]) -> None:
    kek = tmp_path / "master.key"
    generate_master_key(str(kek))
    inner = SqliteStorage(str(tmp_path / "db" / "edge.db"))
    sealed = SealedStorage(inner, load_keyring(StorageSettings(key_encryption_key_file=str(kek))))
    hosts = [f"s{i}.example.test" for i in range(3)]
    for host in hosts:
        _register(sealed, host)  # type: ignore[arg-type]
    inner.add_domain("pending.example.test", "issuing", NOW)
    for names in (hosts + ["pending.example.test", "nope.example.test"],
                  [f"filler{i}.example.test" for i in range(600)] + hosts):  # point and scan paths
        seen: dict[str, tuple[bytes, bytes, dt.datetime, str]] = {}
        ders: dict[str, bytes | None] = {}

        def visit(h: str, k: bytes, c: bytes, der: bytes | None, na: dt.datetime, s: str) -> None:
            seen[h] = (k, c, na, s)
            ders[h] = der

        registered = sealed.scan_certificates(names, visit)
        assert registered == {h for h in names if inner.get_domain(h) is not None}
        assert set(seen) == set(hosts)
        for host in hosts:
            record = sealed.get_certificate(host)
            assert record is not None
            # keys opened, not sealed blobs
            assert seen[host] == (record.key_pem, record.chain_pem, record.not_after, record.serial)
            assert seen[host][0].startswith(b"-----BEGIN")
            leaf = x509.load_pem_x509_certificate(record.chain_pem)
            assert ders[host] == leaf.public_bytes(serialization.Encoding.DER)  # passed through unsealed
    store = make_store(sealed, cache_size=8)
    store.refresh_blocking(NOW)
    served = _served(store, "s1.example.test")
    assert _cn(served) == "s1.example.test"


def test_material_round_trips_through_the_packed_form() -> None:
    from edgeproxy.edge.certstore import _Codec
    codec = _Codec()
    key_pem, chain = _pair("p.example.test")
    got_chain, got_key = codec.unpack(codec.pack(key_pem, chain))
    assert got_chain == chain and got_key == key_pem
    der = x509.load_pem_x509_certificate(chain).public_bytes(serialization.Encoding.DER)
    assert codec.pack(key_pem, chain, der) == codec.pack(key_pem, chain)  # stored DER or decoded PEM: same material
    # Intermediates written with other line endings or trailing blank lines are one shared copy.
    codec.pack(key_pem, chain.replace(b"-----\n-----BEGIN", b"-----\n\n-----BEGIN") + b"\n\n")
    assert codec._tails == [CA_CERT.public_bytes(serialization.Encoding.PEM)]
    odd_key = b"-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\nAAAA\n-----END EC PRIVATE KEY-----\n"
    assert codec.unpack(codec.pack(odd_key, chain))[1] == odd_key  # not plain PEM: kept verbatim
    with pytest.raises(ValueError):
        codec.pack(key_pem, b"not a chain")


def test_refresh_uses_the_stored_leaf_der_and_decodes_only_rows_without_it(
        storage: SqliteStorage, make_store: Callable[..., CertStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows saved with leaf_der are loaded without decoding the PEM leaf;
    rows from before it (leaf_der NULL) still load, by decoding, and serve the
    right certificate."""
    import edgeproxy.edge.certstore as certstore

    for i in range(6):
        _register(storage, f"n{i}.example.test", serial=10 + i)
    raw = storage._file.connection()
    raw.execute("UPDATE certificates SET leaf_der = NULL WHERE hostname IN ('n1.example.test', 'n4.example.test')")
    decoded: list[bytes] = []

    def counting(chain_pem: bytes) -> bytes | None:
        decoded.append(chain_pem)
        return leaf_der_of(chain_pem)

    monkeypatch.setattr(certstore, "leaf_der_of", counting)
    store = make_store(storage, cache_size=8)
    assert store.refresh_blocking(NOW) == 6
    assert sorted(x509.load_pem_x509_certificate(c).serial_number for c in decoded) == [11, 14]
    for i in range(6):
        served = _served(store, f"n{i}.example.test")
        assert _cn(served) == f"n{i}.example.test" and served.serial_number == 10 + i


def test_a_chain_renewed_by_an_older_edgeproxy_is_served_whole(storage: SqliteStorage,
        make_store: Callable[..., CertStore]) -> None:
    """An edgeproxy from before the 100,000-domain scale work writing to the same file renews a
    certificate without leaf_der: the new key must never be paired with the old
    leaf (the handshake would fail, or serve the old certificate)."""
    _register(storage, "r.example.test", serial=5)
    key_pem, chain = _pair("r.example.test", serial=6)
    storage._file.connection().execute(  # the pre-issue-8 upsert, verbatim
        "INSERT INTO certificates (hostname, key_pem, chain_pem, not_before, not_after, serial, issuer, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hostname) DO UPDATE SET key_pem = excluded.key_pem, "
        "chain_pem = excluded.chain_pem, not_before = excluded.not_before, not_after = excluded.not_after, "
        "serial = excluded.serial, issuer = excluded.issuer, created_at = excluded.created_at",
        ("r.example.test", key_pem, chain, "2026-10-31T00:00:00.000000Z", "2027-01-30T00:00:00.000000Z", "6",
         "CN=x", "2026-11-01T00:00:00.000000Z"))
    store = make_store(storage, cache_size=8)
    store.refresh_blocking(NOW)
    served = _served(store, "r.example.test")
    assert served.serial_number == 6


def test_async_refresh_loads_without_building(storage: SqliteStorage,
        make_store: Callable[..., CertStore]) -> None:
    for i in range(50):
        _register(storage, f"n{i}.example.test")
    store = make_store(storage, cache_size=8)
    assert asyncio.run(store.refresh(NOW)) == 50
    assert store.built == 0
    assert store.certificate_for("n7.example.test") is not None
    assert store.certificate_for("unknown.example.test") is None


def test_cache_size_must_be_positive(storage: SqliteStorage) -> None:
    with pytest.raises(ValueError):
        CertStore(storage, cache_size=0)


def test_save_serves_the_new_certificate_in_this_process_at_once(storage: SqliteStorage,
        make_store: Callable[..., CertStore]) -> None:
    storage.add_domain("fresh.example.test", "issuing", NOW)
    store = make_store(storage, cache_size=8)
    store.refresh_blocking(NOW)
    assert store.hosts["fresh.example.test"] is False
    key_pem, chain = _pair("fresh.example.test", serial=77)
    store.save("fresh.example.test", key_pem, chain, NOW)
    assert store.hosts["fresh.example.test"] is True  # no refresh needed in the issuing process
    served = _served(store, "fresh.example.test")
    assert served.serial_number == 77


def test_expire_stops_serving_at_not_after_and_only_scans_once_one_is_due(storage: SqliteStorage,
        make_store: Callable[..., CertStore]) -> None:
    _register(storage, "short.example.test", days=2)
    _register(storage, "long.example.test", days=30)
    store = make_store(storage, cache_size=8)
    store.refresh_blocking(NOW)
    assert sorted(store.expiries()) == [NOW + dt.timedelta(days=2), NOW + dt.timedelta(days=30)]
    assert _served(store, "short.example.test") is not None
    # Before the earliest not_after nothing is scanned: a map that would fail to
    # iterate proves it (the shortcut is what keeps 100,000 names cheap each second).
    real, store.expires = store.expires, _Unscannable(store.expires)
    assert store.expire(NOW + dt.timedelta(days=1)) == []
    store.expires = real
    assert store.expire(NOW + dt.timedelta(days=2)) == ["short.example.test"]
    assert store.hosts["short.example.test"] is False and "short.example.test" not in store.cache
    served = _served(store, "short.example.test")
    assert _cn(served) == "edgeproxy-fallback.invalid"
    # A renewal published after the scan lowers the next expiry again.
    _register(storage, "short.example.test", serial=3, days=3)
    store.refresh_blocking(NOW)
    assert store.expire(NOW + dt.timedelta(days=2, hours=12)) == []
    assert store.hosts["short.example.test"] is True
    assert store.expire(NOW + dt.timedelta(days=3)) == ["short.example.test"]
    assert store.hosts["long.example.test"] is True
    store.trim_memory()  # glibc: returns free heap to the system; never fails elsewhere


class _Unscannable(dict[str, float]):
    def items(self) -> Any:
        raise AssertionError("expire() scanned the map before any certificate was due")

    def values(self) -> Any:
        raise AssertionError("expire() scanned the map before any certificate was due")


def test_a_store_started_from_a_loaded_map_serves_it_and_follows_changes_after_it(
        storage: SqliteStorage, make_store: Callable[..., CertStore]) -> None:
    """``serve`` loads the map once before forking its workers; each worker's store
    starts from it, serves every name without reading them again, and applies only
    the changes made after the load (the change feed from the map's position on)."""
    for host in ("a.example.test", "b.example.test"):
        _register(storage, host)
    loader = make_store(storage, cache_size=8)
    assert loader.refresh_blocking(NOW) == 2
    loaded = loader.snapshot()
    _register(storage, "late.example.test")  # after the load
    storage.remove_domain("b.example.test")
    worker = CertStore(storage, cache_size=8, native=loader.native is not None, loaded=loaded)
    assert worker.hosts == {"a.example.test": True, "b.example.test": True}  # no storage read yet
    assert _cn(_served(worker, "a.example.test")) == "a.example.test"
    assert worker.refresh_blocking(NOW) == 2  # only what changed since the load
    assert "b.example.test" not in worker.hosts
    assert _cn(_served(worker, "b.example.test")) == "edgeproxy-fallback.invalid"
    assert _cn(_served(worker, "late.example.test")) == "late.example.test"
    # A map whose certificate expires is still expired in the store started from it.
    _register(storage, "soon.example.test", days=1)
    loader.refresh_blocking(NOW)
    later = CertStore(storage, cache_size=8, loaded=loader.snapshot())
    assert later.expire(NOW + dt.timedelta(days=2)) != []
