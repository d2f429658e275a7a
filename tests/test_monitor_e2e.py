"""Probes, alerts and metrics against a live edge: real Pebble, real `edgeproxy serve` with
two worker processes, a real relay whose answer the tests change, a local webhook receiver.

One stack for the module (one certificate issuance): tests run in file order and the
401 test leaves the relay healthy again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.cli import main as cli_main
from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess, verified_client
from edgeproxy.devtools.upstreams import RecordedRequest, RecordingRelay, ScriptOrigin

pytestmark = pytest.mark.e2e

HOST = "probe1.example.test"
VENDOR_RELAY = "https://relay.vendor.invalid"


@dataclass
class Stack:
    edge: EdgeProcess
    relay: RecordingRelay
    hook: RecordingRelay  # the webhook receiver: records every alert
    roots: list[bytes]
    config_path: Path

    def alerts(self, key: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(r.body) for r in self.hook.snapshot()]
        return [a for a in out if key is None or a["key"] == key]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.edge.admin_url}/metrics", timeout=5, trust_env=False).text
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pebble_factory_module) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    state = tmp_path_factory.mktemp("monitor-edge")
    with ScriptOrigin() as origin, RecordingRelay() as relay, RecordingRelay(status=200) as hook:
        config = EdgeConfig(
            state_dir=state, acme_directory="", acme_ca_bundle="",
            script_url=origin.script_url, relay_url=f"{relay.url}/ingest",
        )
        pebble = pebble_factory_module(config.http_port)
        root = state / "pebble-root.pem"
        root.write_bytes(pebble.root_pem())
        config.acme_directory = pebble.directory_url
        config.acme_ca_bundle = str(pebble.ca_bundle_path)
        config.extra = {
            "upstream": {"rewrite": {VENDOR_RELAY: "https://{host}{api_path}"}},
            "monitor": {"interval": 0.5, "fail_after": 3, "ca_bundle": str(root), "connect": "127.0.0.1", "timeout": 5.0},
            "alerts": {"webhook_url": f"{hook.url}/alerts", "resend_interval": 3600.0,
                       "retries": 2, "retry_delay": 0.1},
            "log": {"format": "json", "access_log": True},
        }
        with EdgeProcess(config, workers=2) as edge:
            with edge.admin() as admin:
                assert admin.post("/v1/domains", json={"hostname": HOST}).status_code == 201
            edge.wait_status(HOST, "active", timeout=60)
            # Workers poll the change feed every second: until both have the certificate,
            # a connection may still meet the fallback (what monitor.fail_after absorbs).
            time.sleep(2.0)
            yield Stack(edge, relay, hook, [pebble.root_pem()], state / "edgeproxy.toml")


def last_check(stack: Stack) -> dict[str, Any] | None:
    with stack.edge.admin() as admin:
        check: dict[str, Any] | None = admin.get(f"/v1/domains/{HOST}").json()["last_check"]
        return check


def is_probe(request: RecordedRequest) -> bool:
    return request.headers.get("x-edgeproxy-probe") == "1"


def test_healthy_domain_passes_cli_and_loop(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    check = wait_for("a passing last_check", lambda: (c := last_check(stack)) and c["ok"] and c)
    assert [s["name"] for s in check["steps"]] == ["dns", "tls", "script", "event"]
    assert check["days_left"] > 14
    # The loop's probe events reached the relay, marked so that it can discard them.
    probes = [r for r in stack.relay.snapshot() if is_probe(r)]
    assert probes and probes[0].path == "/ingest" and b"edgeproxy-probe" in probes[0].body

    code = cli_main(["--config", str(stack.config_path), "check", "--all", "--connect", "127.0.0.1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith(f"ok    {HOST}  dns --connect 127.0.0.1  tls ")
    assert "script 200 rewritten (2 rules)  event 202" in out

    code = cli_main(["--config", str(stack.config_path), "check", "--domain", HOST, "--connect", "127.0.0.1",
                     "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] is True and report["results"][0]["hostname"] == HOST
    assert stack.alerts() == []  # a healthy edge alerts nobody
    with stack.edge.admin() as admin:
        (listed,) = admin.get("/v1/domains").json()["domains"]
    assert listed["last_check"]["hostname"] == HOST


def test_probe_fails_on_wrong_trust_or_unknown_name(stack: Stack, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Without the configured bundle the system roots do not know Pebble: the handshake must fail.
    monkeypatch.setenv("EDGEPROXY_MONITOR_CA_BUNDLE", "")
    code = cli_main(["--config", str(stack.config_path), "check", "--domain", HOST, "--connect", "127.0.0.1"])
    out = capsys.readouterr().out
    assert code == 1 and out.startswith(f"FAIL  {HOST}  tls: certificate rejected"), out
    monkeypatch.delenv("EDGEPROXY_MONITOR_CA_BUNDLE")
    # A name the edge does not serve gets the fallback certificate, which fails verification.
    code = cli_main(["--config", str(stack.config_path), "check", "--domain", "nobody.example.test",
                     "--connect", "127.0.0.1"])
    out = capsys.readouterr().out
    assert code == 1 and "tls: certificate rejected" in out, out


def test_relay_401_fails_probe_alerts_once_and_resolves_once(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    key = f"probe:{HOST}"
    stack.relay.status = 401
    try:
        trigger = wait_for("a trigger at the webhook", lambda: [a for a in stack.alerts(key) if a["action"] == "trigger"])
        assert trigger[0]["kind"] == "probe_failing" and trigger[0]["severity"] == "critical"
        assert "event: relay answered 401" in trigger[0]["summary"]
        check = last_check(stack)
        assert check is not None and check["ok"] is False and check["error"].startswith("event: relay answered 401")
        code = cli_main(["--config", str(stack.config_path), "check", "--connect", "127.0.0.1"])
        assert code == 1
        assert capsys.readouterr().out.startswith(f"FAIL  {HOST}  event: relay answered 401")
        time.sleep(1.5)  # three more failing rounds: deduplicated, nothing resent
        assert len(stack.alerts(key)) == 1
    finally:
        stack.relay.status = 202
    wait_for("a resolve at the webhook", lambda: [a for a in stack.alerts(key) if a["action"] == "resolve"])
    time.sleep(1.5)  # more healthy rounds: no second resolve
    actions = [a["action"] for a in stack.alerts(key)]
    assert actions == ["trigger", "resolve"]
    wait_for("a passing last_check again", lambda: (c := last_check(stack)) and c["ok"])


def test_metrics_aggregate_workers_and_move_with_traffic(stack: Stack) -> None:
    before = stack.metrics()

    def value(snapshot: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
        return sum(v for (n, lbl), v in snapshot.items()
                   if n == name and all(dict(lbl).get(k) == want for k, want in labels.items()))

    assert value(before, "edgeproxy_acme_orders_total", result="issued") >= 1
    assert value(before, "edgeproxy_certificates", state="valid") == 1
    assert value(before, "edgeproxy_domains", status="active") == 1
    assert value(before, "edgeproxy_certificate_earliest_expiry_seconds") > 14 * 86400
    assert value(before, "edgeproxy_probes_total", result="ok") >= 1
    assert value(before, "edgeproxy_probes_total", result="failed") >= 1  # the 401 test

    n = 20
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # new connections: both workers take some
    https = f"https://127.0.0.1:{stack.edge.config.https_port}"
    with verified_client(stack.roots) as client:
        for _ in range(n):
            r = client.post(f"{https}/api/v1/m/collect", headers={"Host": HOST}, content=b"{}",
                            extensions={"sni_hostname": HOST})
            assert r.status_code == 202 and len(r.headers["x-request-id"]) == 16
    with httpx.Client(verify=False, limits=no_reuse, trust_env=False, timeout=5) as anon:
        for i in range(n):
            r = anon.get(f"{https}/js/app.js", headers={"Host": f"x{i}.example.test"},
                         extensions={"sni_hostname": f"x{i}.example.test"})
            assert r.status_code == 421
            r = anon.get(f"http://127.0.0.1:{stack.edge.config.http_port}/", headers={"Host": "nobody.example.test"})
            assert r.status_code == 404
    after = stack.metrics()
    # Refusals come only from our requests (probes never send an unknown host): exact, over both workers.
    for listener in ("https", "http"):
        assert (value(after, "edgeproxy_requests_refused_total", listener=listener)
                - value(before, "edgeproxy_requests_refused_total", listener=listener)) == n
    assert (value(after, "edgeproxy_http_requests_total", listener="https", route="script", status="421")
            - value(before, "edgeproxy_http_requests_total", listener="https", route="script", status="421")) == n
    # The probe loop also posts events meanwhile, hence ">=".
    assert (value(after, "edgeproxy_http_requests_total", listener="https", route="api", status="202")
            - value(before, "edgeproxy_http_requests_total", listener="https", route="api", status="202")) >= n
    assert (value(after, "edgeproxy_relay_duration_seconds_count")
            - value(before, "edgeproxy_relay_duration_seconds_count")) >= n
    assert value(after, "edgeproxy_relay_responses_total", code_class="4xx") >= 1  # the 401 test
    # No per-domain labels by default.
    assert not any(HOST in str(labels) for (_n, labels) in after)


def test_logs_are_json_with_request_ids(stack: Stack) -> None:
    lines = [json.loads(line) for line in stack.edge.log_text().splitlines() if line.startswith("{")]
    assert lines, stack.edge.log_text()[-2000:]
    access = [line for line in lines if line["logger"] == "edgeproxy.access"]
    assert access and all(len(line["request_id"]) == 16 and "status" in line for line in access)
    assert {line["pid"] for line in access} and all("level" in line and "ts" in line for line in lines)
