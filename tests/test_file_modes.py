"""Every file holding keys, tokens, request bodies or visitor IPs is 0600
in a 0700 directory, whichever command creates it (``serve``, ``replay``,
``spool ...``), under a permissive umask (022), and a file left wider is tightened."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin
from edgeproxy.private_files import private_directory, private_file

SIDE = ("-wal", "-shm")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # what most shells and service managers hand a process
    try:
        yield
    finally:
        os.umask(old)


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ,
           "EDGEPROXY_STORAGE_URL": f"sqlite://{tmp}/state/edgeproxy.db",
           "EDGEPROXY_SPOOL_PATH": str(tmp / "spool" / "spool.db"),
           "EDGEPROXY_ADMIN_TOKEN_FILE": str(tmp / "state" / "admin-token"),
           "EDGEPROXY_ADMIN_TOKENS_FILE": str(tmp / "state" / "admin-tokens.json")}
    return subprocess.run([sys.executable, "-m", "edgeproxy", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def _assert_private(*files: Path) -> None:
    for path in files:
        assert path.exists(), path
        assert _mode(path) == 0o600, f"{path} is {_mode(path):04o}"
        assert _mode(path.parent) == 0o700, f"{path.parent} is {_mode(path.parent):04o}"


@pytest.mark.parametrize("command", [["spool", "stats"], ["spool", "list"], ["replay", "--dry-run"]],
                         ids=["spool-stats", "spool-list", "replay"])
def test_cli_commands_create_private_files(tmp_path: Path, umask_022: None, command: list[str]) -> None:
    result = _cli(tmp_path, *command)
    assert result.returncode == 0, result.stderr
    created = [p for p in (tmp_path / "spool" / "spool.db", tmp_path / "state" / "edgeproxy.db") if p.exists()]
    assert tmp_path / "spool" / "spool.db" in created or command[0] == "replay"
    assert created
    _assert_private(*created)
    for db in created:
        _assert_private(*(Path(f"{db}{s}") for s in SIDE if Path(f"{db}{s}").exists()))


def test_serve_creates_private_files(tmp_path: Path, umask_022: None) -> None:
    state = tmp_path / "fresh" / "state"
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(state_dir=state, acme_directory="https://127.0.0.1:9/directory", acme_ca_bundle="",
                            script_url=origin.script_url, relay_url=f"{relay.url}/ingest",
                            extra={"renew": {"interval": 3600.0}, "monitor": {"interval": 0.0}})
        state.mkdir(parents=True, mode=0o700)  # the config file lives here; edgeproxy creates everything else
        with EdgeProcess(config):
            # While serving, both SQLite files are open in WAL mode: their -wal/-shm exist.
            files = [state / "edgeproxy.db", state / "spool.db", state / "admin-token"]
            files += [Path(f"{db}{s}") for db in (state / "edgeproxy.db", state / "spool.db") for s in SIDE]
            _assert_private(*files)


def test_existing_wide_files_are_tightened(tmp_path: Path, umask_022: None) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    db = spool_dir / "spool.db"
    assert _cli(tmp_path, "spool", "stats").returncode == 0
    os.chmod(db, 0o644)
    Path(f"{db}-wal").write_bytes(b"")
    os.chmod(f"{db}-wal", 0o644)
    result = _cli(tmp_path, "spool", "stats")
    assert result.returncode == 0, result.stderr
    _assert_private(db)
    if Path(f"{db}-wal").exists():
        assert _mode(Path(f"{db}-wal")) == 0o600


def test_a_shared_directory_is_reported_not_changed(tmp_path: Path, umask_022: None,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with caplog.at_level(logging.WARNING, logger="edgeproxy.files"):
        private_file(str(shared / "spool.db"))
    assert _mode(shared) == 0o755
    assert _mode(shared / "spool.db") == 0o600
    assert any("chmod 700" in r.getMessage() for r in caplog.records)
    nested = tmp_path / "a" / "b" / "c"
    private_directory(str(nested))
    assert _mode(nested) == 0o700 and _mode(nested.parent) == 0o700
