"""Schema management and moving a node onto the shared store, through the real CLI.

``edgeproxy migrate`` and ``edgeproxy storage copy`` run as subprocesses against
the machine's PostgreSQL (a fresh schema per test) and a SQLite file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edgeproxy.control.keys import KeyRing, SealedStorage, generate_master_key, load_keyring
from edgeproxy.config import StorageSettings
from edgeproxy.storage import (
    AccountRecord,
    CertificateRecord,
    ChallengeRecord,
    FailedRequestRecord,
    Storage,
    open_storage,
)
from edgeproxy.storage.base import AriState, FiringAlert, OutboxEvent, StatusEvent

NOW = datetime(2025, 6, 1, 8, 30, 0, 250000, tzinfo=timezone.utc)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeproxy", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def fill(store: Storage, n: int = 3) -> None:
    store.save_account(AccountRecord("https://acme.example/dir", b"ACCOUNT KEY", '{"uri": "https://acme.example/acct/1"}'))
    store.save_account(AccountRecord("https://other.example/dir", b"OTHER KEY", ""))
    for i in range(n):
        host = f"shop{i}.example"
        store.add_domain(host, "issuing", NOW + timedelta(minutes=i))
        store.update_domain(host, NOW + timedelta(hours=i), status="failing" if i == 2 else "active",
                            error_code="acme_dns" if i == 2 else None, error_message="no CNAME" if i == 2 else None,
                            next_attempt_at=NOW + timedelta(days=60 + i), attempts=i)
        if i < 2:
            store.save_certificate(CertificateRecord(host, f"KEY {i}".encode(), f"CHAIN {i}".encode(), NOW,
                                                     NOW + timedelta(days=90), f"{i:x}", "CN=Test", NOW))
    store.put_challenge(ChallengeRecord("tok", "tok.k", "shop0.example", NOW))
    store.add_status_event(StatusEvent("shop0.example", NOW, "issuing"))
    store.add_status_event(StatusEvent("shop0.example", NOW + timedelta(minutes=1), "active"))
    store.save_ari(AriState("shop0.example", "0", "aki.0", NOW + timedelta(days=50), NOW + timedelta(hours=6), NOW))
    for k in range(3):
        store.log_failed_request(FailedRequestRecord(
            idempotency_key=f"key-{k}", domain="shop1.example", method="POST", target="/collect",
            headers=((b"idempotency-key", f"key-{k}".encode()),), body=b"\x00body", client=None, status=401,
            origin="relay", received_at=NOW, logged_at=NOW, delivered_at=NOW if k == 0 else None))
    # Two webhook events waiting for their receiver (a node moves with them), one delivered.
    store.append_events([OutboxEvent(f"evt-{k}", "https://app.example/hooks", "domain.active", "shop0.example",
                                     NOW + timedelta(seconds=k), f'{{"n": {k}}}') for k in range(3)])
    [delivered] = [d for d in store.claim_deliveries("node", NOW + timedelta(hours=1), 60, 10)]
    store.record_attempt(delivered.seq, "node", NOW + timedelta(hours=1), state="delivered",
                         next_attempt_at=NOW + timedelta(hours=1), error=None, status=200)
    store.claim_alert(FiringAlert("probe:shop2.example", "probe_failing", "critical", "shop2 down", "{}", NOW, NOW),
                      resend_after=3600)


def snapshot(store: Storage) -> tuple[object, ...]:
    domains = store.list_domains()
    return (domains, [store.get_certificate(d.hostname) for d in domains], store.list_accounts(),
            [store.status_history(d.hostname) for d in domains], [store.get_ari(d.hostname) for d in domains],
            [replace(r, id=0) for r in store.find_failed_requests(delivered=None)],
            [(d.event_id, d.hostname, d.payload) for d in store.list_deliveries(state="pending")],
            store.firing_alerts())


def test_migrate_is_versioned_and_idempotent(pg_url: str, tmp_path: Path) -> None:
    from edgeproxy.storage.postgres import SCHEMA_VERSION

    first = cli("migrate", "--url", pg_url)
    assert first.returncode == 0, first.stderr
    assert f"migrated from version 0 to {SCHEMA_VERSION}" in first.stdout
    # Through the config (environment override), as an operator would run it.
    again = cli("migrate", env={"EDGEPROXY_STORAGE_URL": pg_url})
    assert again.returncode == 0, again.stderr
    assert f"at version {SCHEMA_VERSION}; nothing to do" in again.stdout
    sqlite = cli("migrate", "--url", f"sqlite://{tmp_path}/n/edgeproxy.db")
    assert sqlite.returncode == 0 and (tmp_path / "n" / "edgeproxy.db").exists()


def test_auto_migrate_off_refuses_until_migrated(pg_url: str) -> None:
    env = {"EDGEPROXY_STORAGE_URL": pg_url, "EDGEPROXY_STORAGE_AUTO_MIGRATE": "false"}
    refused = cli("domains", "list", env=env)
    assert refused.returncode == 1
    assert "run `edgeproxy migrate`" in refused.stderr
    assert cli("migrate", env=env).returncode == 0
    listed = cli("domains", "list", env=env)
    assert listed.returncode == 0 and "no domains registered" in listed.stdout
    # Keys on a shared store without a master key: the operator is told why it matters.
    assert "key_encryption_key_file is not set" in listed.stderr


def test_storage_copy_sqlite_to_postgres(pg_url: str, tmp_path: Path) -> None:
    src_url = f"sqlite://{tmp_path}/node/edgeproxy.db"
    src = open_storage(src_url)
    fill(src)
    expected = snapshot(src)
    src.close()

    copied = cli("storage", "copy", "--from", src_url, "--to", pg_url)
    assert copied.returncode == 0, copied.stderr
    assert "copied domain 3/3 shop2.example (failing, no certificate)" in copied.stdout
    assert "copied failed-request log 3/3" in copied.stdout
    assert ("3 domain(s), 2 certificate(s) with their keys, 2 ACME account(s), 3 failed request(s), "
            "2 webhook event(s) not yet delivered, 1 firing alert(s) copied" in copied.stdout)
    dst = open_storage(pg_url)
    try:
        assert snapshot(dst) == expected  # created_at, updated_at, schedule, errors: all kept
        assert dst.get_challenge("tok") is None  # minutes-long tokens are not moved
    finally:
        dst.close()

    refused = cli("storage", "copy", "--from", src_url, "--to", pg_url)
    assert refused.returncode == 1
    assert "target_not_empty" in refused.stderr and "--force" in refused.stderr
    forced = cli("storage", "copy", "--from", src_url, "--to", pg_url, "--force")
    assert forced.returncode == 0, forced.stderr
    dst = open_storage(pg_url)
    try:
        assert snapshot(dst) == expected  # idempotent: nothing duplicated or changed
    finally:
        dst.close()


def test_storage_copy_moves_sealed_keys_verbatim(pg_url: str, tmp_path: Path) -> None:
    key_file = str(tmp_path / "master.key")
    generate_master_key(key_file)
    ring: KeyRing = load_keyring(StorageSettings(key_encryption_key_file=key_file))
    src_url = f"sqlite://{tmp_path}/node/edgeproxy.db"
    sealed_src = SealedStorage(open_storage(src_url), ring)
    fill(sealed_src)  # type: ignore[arg-type]
    expected = snapshot(sealed_src)  # type: ignore[arg-type]
    sealed_src.close()

    assert cli("storage", "copy", "--from", src_url, "--to", pg_url).returncode == 0
    raw = open_storage(pg_url)
    try:
        cert = raw.get_certificate("shop0.example")
        assert cert is not None and cert.key_pem.startswith(b"edgeproxy-sealed:v1:")  # still sealed in PostgreSQL
    finally:
        raw.close()
    sealed_dst = SealedStorage(open_storage(pg_url), ring)
    try:
        assert snapshot(sealed_dst) == expected  # type: ignore[arg-type]
    finally:
        sealed_dst.close()
