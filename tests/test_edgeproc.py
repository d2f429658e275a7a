"""The local-edge harness survives a port that was taken between choosing and binding it."""

from __future__ import annotations

import socket
from pathlib import Path

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin


def test_start_picks_new_ports_when_the_admin_port_is_taken(tmp_path: Path) -> None:
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(state_dir=tmp_path, acme_directory="https://127.0.0.1:1/dir", acme_ca_bundle="",
                            script_url=origin.script_url, relay_url=relay.url)
        taken = config.admin_port
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", taken))
            squatter.listen()
            with EdgeProcess(config) as edge:
                assert config.admin_port != taken
                with edge.admin_client() as client:
                    assert client.get("/healthz").status_code == 200
        assert "(listen.admin): Address already in use" in edge.log_text()
