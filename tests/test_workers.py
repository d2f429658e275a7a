"""Several worker processes: a certificate issued while they run reaches every one of them."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import psutil
import pytest

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin

pytestmark = pytest.mark.e2e


def _owner_pid(pids: list[int], client_port: int, server_port: int) -> int | None:
    """Which process holds the accepted end of our connection (found by its peer port)."""
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == server_port and conn.raddr and conn.raddr.port == client_port:
                return pid
    return None


def test_second_worker_serves_certificate_issued_while_running(tmp_path: Path, pebble_factory) -> None:  # type: ignore[no-untyped-def]
    host = "late.example.test"
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(state_dir=tmp_path, acme_directory="", acme_ca_bundle="",
                            script_url=origin.script_url, relay_url=relay.url)
        pebble = pebble_factory(config.http_port)
        config.acme_directory, config.acme_ca_bundle = pebble.directory_url, str(pebble.ca_bundle_path)
        with EdgeProcess(config, workers=2) as edge:
            assert edge.proc is not None
            parent = psutil.Process(edge.proc.pid)
            def spawned_workers() -> list[int]:
                # Workers are forked at start-up (same command line as the parent);
                # multiprocessing may also start a resource tracker: count only workers.
                return [c.pid for c in parent.children() if "resource_tracker" not in " ".join(c.cmdline())]

            deadline = time.monotonic() + 20
            while len(spawned_workers()) < 1:
                assert time.monotonic() < deadline, "the second worker never started"
                time.sleep(0.1)
            workers = [parent.pid] + spawned_workers()
            assert len(workers) == 2
            time.sleep(1.0)  # let the child finish its start-up before the name exists

            # Registered only now: both workers were already running.
            with edge.admin() as admin:
                assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
            edge.wait_status(host)
            # Workers poll the change feed every proxy.cert_refresh_interval (1 s):
            # after two intervals every one of them must serve the new certificate.
            time.sleep(2.0)

            roots = "\n".join([pebble.root_pem().decode()])
            ctx = ssl.create_default_context(cadata=roots)
            served_by: dict[int, int] = {}
            open_conns = []
            deadline = time.monotonic() + 30
            while len(served_by) < 2:
                assert time.monotonic() < deadline, f"only workers {served_by} answered"
                raw = socket.create_connection(("127.0.0.1", config.https_port), timeout=5)
                try:
                    # The handshake verifies the chain and the name: a worker that
                    # missed the new certificate would present the fallback and fail here.
                    tls = ctx.wrap_socket(raw, server_hostname=host)
                except ssl.SSLCertVerificationError as exc:
                    raise AssertionError(f"a worker served the wrong certificate: {exc}") from exc
                open_conns.append(tls)
                owner = _owner_pid(workers, tls.getsockname()[1], config.https_port)
                if owner is not None:
                    served_by[owner] = served_by.get(owner, 0) + 1
            for conn in open_conns:
                conn.close()
            assert set(served_by) == set(workers)
