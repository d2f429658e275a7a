"""Admin tokens: named, hashed at rest, effective without a restart, revocable."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import Stack
from edgeproxy.config import AdminSettings
from edgeproxy.errors import EdgeproxyError
from edgeproxy.control.tokens import TokenStore

NOW = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)


def test_tokens_are_stored_hashed_and_checked(tmp_path: Path) -> None:
    store = TokenStore(AdminSettings(str(tmp_path / "bootstrap"), str(tmp_path / "tokens.json")))
    ops = store.create("ops", NOW)
    ci = store.create("ci-deploy", NOW)
    text = (tmp_path / "tokens.json").read_text()
    assert ops not in text and ci not in text  # only hashes on disk
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600
    assert store.check(ops) == "ops" and store.check(ci) == "ci-deploy"
    assert store.check(ops + "x") is None and store.check("") is None
    assert [t.name for t in store.list()] == ["ci-deploy", "ops"]
    store.revoke("ops")
    assert store.check(ops) is None and store.check(ci) == "ci-deploy"
    with pytest.raises(EdgeproxyError, match="no token named"):
        store.revoke("ops")
    with pytest.raises(EdgeproxyError, match="exists"):
        store.create("ci-deploy", NOW)
    with pytest.raises(EdgeproxyError, match="token names"):
        store.create("bad name!", NOW)
    assert not (tmp_path / "bootstrap").exists()  # no bootstrap unless asked for


@pytest.mark.e2e
def test_cli_tokens_take_effect_on_a_running_edge(stack: Stack) -> None:
    config = str(stack.edge.config.state_dir / "edgeproxy.toml")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgeproxy", "--config", config, "tokens", *args],
                              capture_output=True, text=True, timeout=30)

    created = cli("create", "oncall")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    with httpx.Client(base_url=stack.edge.admin_url, trust_env=False, timeout=5) as client:
        auth = {"Authorization": f"Bearer {token}"}
        assert client.get("/v1/domains", headers=auth).status_code == 200
        assert "oncall" in cli("list").stdout and token not in cli("list").stdout
        assert cli("revoke", "oncall").returncode == 0
        assert client.get("/v1/domains", headers=auth).status_code == 401


@pytest.mark.e2e
def test_admin_api_on_a_unix_socket(tmp_path: Path, pebble_factory) -> None:  # type: ignore[no-untyped-def]
    from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
    from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin

    sock = tmp_path / "run" / "admin.sock"
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(state_dir=tmp_path / "state", acme_directory="", acme_ca_bundle="",
                            script_url=origin.script_url, relay_url=relay.url, admin_socket=str(sock))
        pebble = pebble_factory(config.http_port)
        config.acme_directory, config.acme_ca_bundle = pebble.directory_url, str(pebble.ca_bundle_path)
        with EdgeProcess(config) as edge:
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600  # only the edge's user may connect
            with edge.admin() as admin:
                assert admin.post("/v1/domains", json={"hostname": "uds.example.test"}).status_code == 201
            assert edge.wait_status("uds.example.test")["status"] == "active"
            with edge.admin_client() as anonymous:
                assert anonymous.get("/v1/domains").status_code == 401
            # No TCP admin listener exists: the configured admin port is not bound.
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{config.admin_port}/healthz", timeout=2)
