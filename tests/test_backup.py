"""deploy/edgeproxy-backup: the runbook's backup is consistent while the edge runs, and restores."""

from __future__ import annotations

import datetime as dt
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from edgeproxy.storage import CertificateRecord, open_storage

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "edgeproxy-backup"
NOW = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def backup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_backup_of_a_live_store_restores_everything(tmp_path: Path) -> None:
    live = tmp_path / "live" / "edgeproxy.db"
    live.parent.mkdir()
    storage = open_storage(f"sqlite://{live}")  # stays open, as under a running serve
    for n in range(3):
        storage.add_domain(f"cdn{n}.shop.example", "issuing", NOW)
    cert = CertificateRecord("cdn0.shop.example", b"-----KEY-----", b"-----CHAIN-----",
                             NOW, NOW + dt.timedelta(days=90), "0abc", "CN=Test CA", NOW)
    storage.save_certificate(cert)
    copy = tmp_path / "backups" / "edgeproxy-2026-11-01.db"
    copy.parent.mkdir()
    run = backup(str(live), str(copy))
    assert run.returncode == 0, run.stderr
    assert "(3 domains)" in run.stdout
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600  # it holds private keys
    storage.add_domain("after.shop.example", "issuing", NOW)  # after the backup: not in it
    storage.close()

    restored = tmp_path / "restored" / "edgeproxy.db"
    restored.parent.mkdir()
    shutil.copyfile(copy, restored)
    back = open_storage(f"sqlite://{restored}")
    try:
        assert [d.hostname for d in back.list_domains()] == [f"cdn{n}.shop.example" for n in range(3)]
        assert back.get_certificate("cdn0.shop.example") == cert
    finally:
        back.close()


def test_backup_of_a_stopped_store_and_failures(tmp_path: Path) -> None:
    db = tmp_path / "edgeproxy.db"
    open_storage(f"sqlite://{db}").close()
    assert backup(str(db), str(tmp_path / "copy.db")).returncode == 0
    missing = backup(str(tmp_path / "nope.db"), str(tmp_path / "x.db"))
    assert missing.returncode == 1 and "no such store" in missing.stderr
    assert backup().returncode == 2  # usage
