"""Renewal end to end: real `edgeproxy serve` and `edgeproxy renew` processes, real Pebble.

- A certificate reaches its renewal window (Pebble issues 20-second certificates,
  so the window opens after 10 s), a cron-style `edgeproxy renew` renews it, and
  the running proxy serves the new serial without a restart.
- A cron run and the serve loop started together order exactly one certificate
  per name (one storage lock per name, re-checked after taking it).
- With the DNS pre-check on, a name without the customer's record waits in
  `pending_dns` with the record to add, visible with its history on the admin API.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.pebble import ChallTestSrv, Pebble
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin
from edgeproxy.control.renew import CERT_NAMES, ORDER
from edgeproxy.storage.sqlite import SqliteStorage

pytestmark = pytest.mark.e2e


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeproxy", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=90)


def served_serial(port: int, hostname: str, root_pem: bytes) -> str:
    """The serial of the certificate the edge presents for SNI ``hostname``, verified against Pebble's root."""
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=hostname) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


@pytest.fixture
def stack(tmp_path: Path, pebble_factory: Any) -> Iterator[tuple[EdgeConfig, Pebble]]:
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(state_dir=tmp_path, acme_directory="", acme_ca_bundle="",
                            script_url=origin.script_url, relay_url=relay.url)
        pebble = pebble_factory(config.http_port, nonce_reject=0, authz_reuse=0, validity_seconds=20)
        config.acme_directory, config.acme_ca_bundle = pebble.directory_url, str(pebble.ca_bundle_path)
        yield config, pebble


def test_renewal_window_cron_renews_and_the_running_proxy_serves_the_new_serial(
    stack: tuple[EdgeConfig, Pebble]
) -> None:
    config, pebble = stack
    host = "renewme.example.test"
    with EdgeProcess(config) as edge:
        path = config.state_dir / "edgeproxy.toml"
        pid = edge.proc.pid if edge.proc else 0
        with edge.admin() as admin:
            assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
        first = edge.wait_status(host, "active", timeout=30)
        root = pebble.root_pem()
        deadline = time.monotonic() + 10
        while served_serial(config.https_port, host, root) != first["certificate"]["serial"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)

        # Before the window: cron has nothing to do.
        early = run_cli(path, "renew")
        assert early.returncode == 0, early.stdout + early.stderr
        assert "0 issued" in early.stdout

        # 20 s certificates: the backstop (1/2 of the lifetime left under 10 days) opens at 10 s.
        due = dt.datetime.fromisoformat(first["next_attempt_at"].replace("Z", "+00:00"))
        time.sleep(max(0.0, (due - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 0.5)
        renewed = run_cli(path, "renew")
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        assert f"issued  {host}" in renewed.stdout

        with edge.admin() as admin:
            view = admin.get(f"/v1/domains/{host}").json()
            history = admin.get(f"/v1/domains/{host}/history").json()["history"]
        new_serial = view["certificate"]["serial"]
        assert new_serial != first["certificate"]["serial"]
        assert [h["status"] for h in history][:3] == ["active", "renewing", "active"]
        # The running workers pick the new pair up from the change feed: no restart.
        deadline = time.monotonic() + 10
        while served_serial(config.https_port, host, root) != new_serial:
            assert time.monotonic() < deadline, "the running proxy still serves the old certificate"
            time.sleep(0.2)
        assert edge.proc is not None and edge.proc.pid == pid and edge.proc.poll() is None


def test_cron_and_loop_started_together_order_once_per_name(stack: tuple[EdgeConfig, Pebble]) -> None:
    config, _pebble = stack
    config.extra = {"renew": {"concurrency": 4}}
    path = config.write()
    names = [f"race{i}.example.test" for i in range(8)]
    for name in names:
        assert run_cli(path, "domains", "add", name).returncode == 0
    # Both start at once: the loop's first full pass and the cron pass see all 8 due.
    # Cron starts the moment the edge listens (in production the edge is always up
    # when cron runs; before it listens, Pebble's HTTP-01 check would be refused).
    with EdgeProcess(config) as edge:
        cron = subprocess.Popen([sys.executable, "-m", "edgeproxy", "--config", str(path), "renew"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = cron.communicate(timeout=90)
        for name in names:
            edge.wait_status(name, "active", timeout=30)
    assert cron.returncode == 0, out
    cron_issued = [n for n in names if f"issued  {n}" in out]
    storage = SqliteStorage(str(config.db_path))
    try:
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
        assert len(storage.events_since(ORDER, config.acme_directory, since)) == len(names), out
        for name in names:
            assert len(storage.events_since(CERT_NAMES, name, since)) == 1, name
    finally:
        storage.close()
    print(f"cron issued {len(cron_issued)}, the serve loop {len(names) - len(cron_issued)}")


def test_dns_precheck_through_serve_keeps_pending_dns_with_the_record(
    stack: tuple[EdgeConfig, Pebble], challtestsrv: ChallTestSrv
) -> None:
    config, _pebble = stack
    config.dns_check = True
    config.extra = {"dns": {"resolver": challtestsrv.dns_address, "edge_ips": ["192.0.2.10"]}}
    host = "pending.example.test"
    # challtestsrv answers every name with 127.0.0.1 by default: not our (configured) edge IP.
    with EdgeProcess(config) as edge:
        with edge.admin() as admin:
            assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
        view = edge.wait_status(host, "pending_dns", timeout=15)
        assert view["error"]["code"] == "dns_elsewhere"
        assert f"{host}. CNAME edge.example.net." in view["error"]["message"]
        assert "127.0.0.1" in view["error"]["message"]
        with edge.admin() as admin:
            history = admin.get(f"/v1/domains/{host}/history").json()["history"]
        assert [h["status"] for h in history] == ["pending_dns", "issuing"]
        assert history[0]["error_code"] == "dns_elsewhere"
