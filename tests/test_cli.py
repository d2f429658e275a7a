"""The CLI against a real edge and real Pebble: same service functions as the admin API, honest exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin

pytestmark = pytest.mark.e2e


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeproxy", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def edge(tmp_path: Path, pebble_factory) -> Iterator[EdgeProcess]:  # type: ignore[no-untyped-def]
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(state_dir=tmp_path, acme_directory="", acme_ca_bundle="",
                            script_url=origin.script_url, relay_url=relay.url)
        # authz_reuse=0: every order (renewals too) goes through a fresh HTTP-01 validation.
        pebble = pebble_factory(config.http_port, authz_reuse=0)
        config.acme_directory, config.acme_ca_bundle = pebble.directory_url, str(pebble.ca_bundle_path)
        with EdgeProcess(config) as proc:
            yield proc


def test_domains_commands_and_renew(edge: EdgeProcess) -> None:
    config = edge.config.state_dir / "edgeproxy.toml"
    host = "cli.example.test"

    added = run_cli(config, "domains", "add", "CLI.Example.Test.")
    assert added.returncode == 0, added.stderr
    assert f"registered {host}" in added.stdout
    assert "CNAME  edge.example.net." in added.stdout

    again = run_cli(config, "domains", "add", host)
    assert again.returncode == 1
    assert "already registered" in again.stderr or "domain_exists" in again.stderr

    bad = run_cli(config, "domains", "add", "192.0.2.1")
    assert bad.returncode == 1
    assert "ip_literal" in bad.stderr

    # The running serve picks up a registration made by another process.
    first = edge.wait_status(host, "active", timeout=30)
    listed = run_cli(config, "domains", "list")
    assert listed.returncode == 0
    assert host in listed.stdout and "active" in listed.stdout

    dry = run_cli(config, "renew", "--dry-run")
    assert dry.returncode == 0
    assert "0 due, nothing ordered" in dry.stdout

    # A forced renewal from "cron" while serve answers the HTTP-01 challenge.
    forced = run_cli(config, "renew", "--force", host)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert f"issued  {host}" in forced.stdout
    shown = json.loads(run_cli(config, "domains", "show", host).stdout)
    assert shown["status"] == "active"
    assert shown["certificate"]["serial"] != first["certificate"]["serial"]

    removed = run_cli(config, "domains", "remove", host)
    assert removed.returncode == 0
    assert run_cli(config, "domains", "show", host).returncode == 1
    assert "no domains registered" in run_cli(config, "domains", "list").stdout


def test_renew_exits_nonzero_when_an_order_fails(edge: EdgeProcess) -> None:
    config = edge.config.state_dir / "edgeproxy.toml"
    host = "down.example.test"
    assert run_cli(config, "domains", "add", host).returncode == 0
    edge.wait_status(host, "active", timeout=30)
    edge.stop()  # nobody answers HTTP-01 any more
    failed = run_cli(config, "renew", "--force", host)
    assert failed.returncode == 1
    assert f"failed  {host}" in failed.stdout
    assert "acme_connection" in failed.stdout
    # The failure is on the record, and the valid certificate is kept.
    shown = json.loads(run_cli(config, "domains", "show", host).stdout)
    assert shown["error"]["code"] == "acme_connection"
    assert shown["certificate"] is not None
    assert shown["next_attempt_at"] is not None


def test_help_everywhere() -> None:
    for args in (["--help"], ["serve", "--help"], ["domains", "--help"], ["domains", "add", "--help"],
                 ["renew", "--help"], ["demo", "--help"]):
        result = subprocess.run([sys.executable, "-m", "edgeproxy", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, args
        assert "usage: edgeproxy" in result.stdout
