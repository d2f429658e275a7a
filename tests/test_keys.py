"""Private keys at rest: sealed with AES-256-GCM, never on disk as PEM, wrong keys refused."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.config import StorageSettings
from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess, verified_client
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin
from edgeproxy.errors import ConfigError
from edgeproxy.control.keys import SealedKeyError, SealedStorage, generate_master_key, load_keyring
from edgeproxy.storage.base import CertificateRecord, Storage
from edgeproxy.storage.sqlite import SqliteStorage

NOW = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)
PEM = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n"


def _ring(tmp_path: Path, name: str = "k1", previous: tuple[str, ...] = ()) -> tuple[StorageSettings, str]:
    path = str(tmp_path / name)
    if not Path(path).exists():
        generate_master_key(path)
    return StorageSettings(key_encryption_key_file=path, previous_key_files=previous), path


def test_seal_round_trip_binds_owner_and_key(tmp_path: Path) -> None:
    settings, _ = _ring(tmp_path)
    ring = load_keyring(settings)
    blob = ring.seal(PEM, "cert:a.example.test")
    assert b"PRIVATE KEY" not in blob and blob.startswith(b"edgeproxy-sealed:v1:")
    assert ring.open(blob, "cert:a.example.test") == PEM
    with pytest.raises(SealedKeyError, match="does not open"):
        ring.open(blob, "cert:b.example.test")  # moved onto another row
    other = load_keyring(_ring(tmp_path, "k2")[0])
    with pytest.raises(SealedKeyError, match="not configured"):
        other.open(blob, "cert:a.example.test")
    assert load_keyring(StorageSettings()).open(PEM, "x") == PEM  # unsealed PEM still reads


def test_bad_master_key_files_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="256-bit"):
        load_keyring(StorageSettings(key_encryption_key_file=str(tmp_path / "short")))
    with pytest.raises(ConfigError, match="does not exist"):
        load_keyring(StorageSettings(key_encryption_key_file=str(tmp_path / "missing")))
    with pytest.raises(FileExistsError):
        generate_master_key(str(tmp_path / "short"))  # never overwrites a key


def test_sealed_storage_keeps_no_pem_in_the_database(tmp_path: Path) -> None:
    inner = SqliteStorage(str(tmp_path / "db.sqlite"))
    store = SealedStorage(inner, load_keyring(_ring(tmp_path)[0]))
    store.add_domain("a.example.test", "issuing", NOW)
    cert = CertificateRecord("a.example.test", PEM, b"chain", NOW, NOW + dt.timedelta(days=90), "ab", "CN=x", NOW)
    store.save_certificate(cert)
    assert store.get_certificate("a.example.test") == cert
    assert b"PRIVATE KEY" not in inner.get_certificate("a.example.test").key_pem  # type: ignore[union-attr]
    inner.close()
    for path in tmp_path.glob("db.sqlite*"):
        assert b"PRIVATE KEY" not in path.read_bytes()


def test_sealed_storage_forwards_the_whole_protocol(tmp_path: Path) -> None:
    """Every Storage method reaches the backend through the wrapper, the
    indexed domain queries included."""
    inner = SqliteStorage(str(tmp_path / "db.sqlite"))
    store = SealedStorage(inner, load_keyring(_ring(tmp_path)[0]))
    try:
        for name in dir(Storage):
            if not name.startswith("_"):
                assert callable(getattr(store, name)), name
        store.add_domain("a.example.test", "issuing", NOW)
        store.update_domain("a.example.test", NOW, status="issuing", next_attempt_at=NOW)
        assert [d.hostname for d in store.due_domains(NOW, statuses=["issuing"])] == ["a.example.test"]
        assert store.count_domains() == 1
        assert store.domain_created_times_since(NOW - dt.timedelta(hours=1)) == [NOW]
    finally:
        inner.close()


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.exists()}


@pytest.mark.e2e
def test_sealed_edge_end_to_end_wrong_key_and_rotation(tmp_path: Path, pebble_factory) -> None:  # type: ignore[no-untyped-def]
    key1 = str(tmp_path / "master1.key")
    generate_master_key(key1)
    host = "sealed.example.test"
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(state_dir=tmp_path / "state", acme_directory="", acme_ca_bundle="",
                            script_url=origin.script_url, relay_url=relay.url,
                            extra={"storage": {"key_encryption_key_file": key1}})
        pebble = pebble_factory(config.http_port)
        config.acme_directory, config.acme_ca_bundle = pebble.directory_url, str(pebble.ca_bundle_path)
        with EdgeProcess(config) as edge:
            with edge.admin() as admin:
                assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
            edge.wait_status(host)
            with verified_client([pebble.root_pem()]) as client:
                served = client.get(f"https://127.0.0.1:{config.https_port}/js/app.js",
                                    headers={"Host": host}, extensions={"sni_hostname": host})
                assert served.status_code == 200
        db_files = sorted(config.state_dir.glob("edgeproxy.db*"))
        assert db_files
        for path in db_files:
            assert b"PRIVATE KEY" not in path.read_bytes(), path.name

        # A wrong master key: a clear start-up error, and not a byte changes on disk.
        wrong = str(tmp_path / "wrong.key")
        generate_master_key(wrong)
        before = _digest(db_files)
        bad = dataclasses.replace(config, extra={"storage": {"key_encryption_key_file": wrong}})
        with pytest.raises(RuntimeError, match="not configured"):
            EdgeProcess(bad).start(timeout=15)
        assert _digest(db_files) == before

        # Rotation: new key current, old key previous; rotate; then the old key can go.
        key2 = str(tmp_path / "master2.key")
        generate_master_key(key2)
        rotating = dataclasses.replace(config, extra={"storage": {"key_encryption_key_file": key2,
                                                                  "previous_key_files": [key1]}})
        path = rotating.write()
        result = subprocess.run([sys.executable, "-m", "edgeproxy", "--config", str(path), "keys", "rotate"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert f"resealed certificate {host}" in result.stdout
        only_new = dataclasses.replace(config, extra={"storage": {"key_encryption_key_file": key2}})
        with EdgeProcess(only_new) as edge:
            assert edge.wait_status(host)["status"] == "active"
            with verified_client([pebble.root_pem()]) as client:
                served = client.get(f"https://127.0.0.1:{config.https_port}/js/app.js",
                                    headers={"Host": host}, extensions={"sni_hostname": host})
                assert served.status_code == 200
