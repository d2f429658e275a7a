"""``edgeproxy demo``: the whole flow on one machine, against a real ACME server.

Owns: orchestrating Pebble + pebble-challtestsrv, a local script origin and a
relay that prints what it receives, and a real ``edgeproxy serve`` process on
the embedded defaults (SQLite); then it registers a domain through the admin
API, waits for the certificate, fetches the script and posts an event over
HTTPS verified against Pebble's root, printing each step with its timing.
Must not import: ``acme`` (it talks to the edge the way an operator would).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .devtools.edgeproc import EdgeConfig, EdgeProcess, verified_client
from .devtools.pebble import ChallTestSrv, HarnessError, Pebble, missing_binaries
from .devtools.upstreams import RecordedRequest, RecordingRelay, ScriptOrigin

__all__ = ["run_demo"]

DEMO_HOST = "cdn.shop.demo.test"
VENDOR_RELAY = "https://relay.vendor.invalid"


class _Steps:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.2f}s] {text}", flush=True)


def _on_relay(request: RecordedRequest) -> None:
    interesting = {k: v for k, v in request.headers.items() if k.startswith("x-forwarded") or k == "idempotency-key"}
    print(f"          relay received {request.method} {request.path} {request.body!r} {interesting}", flush=True)


def run_demo(keep: bool = False) -> int:
    """Run the demo; 0 on a verified round trip.

    The state directory (database, certificates, ``edge.log``) is removed only
    after a successful run without ``keep``: after a failure or an interruption
    it is kept, and its path printed, so the log the run advertised can be read.
    """
    missing = missing_binaries()
    if missing:
        print(f"edgeproxy demo needs {', '.join(missing)}: apt-get install -y pebble (or run `make demo`)", file=sys.stderr)
        return 1
    steps = _Steps()
    # SIGTERM unwinds like Ctrl-C so that every child process is cleaned up.
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    state = Path(tempfile.mkdtemp(prefix="edgeproxy-demo-"))
    code = 1
    try:
        code = _run(state, keep, steps)
        return code
    finally:
        if previous is not None:  # None: a handler not installed from Python; leave it
            signal.signal(signal.SIGTERM, previous)
        # Every child process has stopped by now (the ExitStack in _run has closed).
        if code == 0 and not keep:
            shutil.rmtree(state, ignore_errors=True)
            steps.say(f"removed the state directory {state} (`edgeproxy demo --keep` keeps it, and keeps serving)")
        else:
            steps.say(f"kept the state directory {state} (edgeproxy's log: {state / 'edge.log'})")


def _run(state: Path, keep: bool, steps: _Steps) -> int:
    with contextlib.ExitStack() as stack:
        try:
            dns = stack.enter_context(ChallTestSrv())
            steps.say(f"pebble-challtestsrv (mock DNS) on {dns.dns_address}")
            origin = stack.enter_context(ScriptOrigin())
            relay = stack.enter_context(RecordingRelay(on_request=_on_relay))
            relay.pixel = True  # answers image beacons with a 1x1 GIF, as a vendor's pixel endpoint does
            steps.say(f"vendor script origin {origin.script_url}, queue relay {relay.url}")
            config = EdgeConfig(
                state_dir=state, acme_directory="", acme_ca_bundle="",
                script_url=origin.script_url, relay_url=f"{relay.url}/ingest",
                extra={"upstream": {"rewrite": {VENDOR_RELAY: "https://{host}{api_path}"}}},
            )
            pebble = stack.enter_context(Pebble(http_port=config.http_port, dns_server=dns.dns_address))
            config.acme_directory, config.acme_ca_bundle = pebble.directory_url, str(pebble.ca_bundle_path)
            steps.say(f"Pebble ACME server {pebble.directory_url} (HTTP-01 checks go to port {config.http_port})")
            edge = stack.enter_context(EdgeProcess(config))
            steps.say(
                f"edgeproxy serving http :{config.http_port}, https :{config.https_port}, "
                f"admin 127.0.0.1:{config.admin_port} (state in {state}, log {edge.log_path})"
            )

            with edge.admin() as admin:
                response = admin.post("/v1/domains", json={"hostname": DEMO_HOST})
                if response.status_code != 201:
                    print(f"registration failed: {response.status_code} {response.text}", file=sys.stderr)
                    return 1
                view = response.json()
            record = view["dns"]["records"][0]
            steps.say(f"registered {DEMO_HOST}: customer adds  {record['name']} {record['type']} {record['value']}")
            steps.say(f"snippet: {view['snippet']}")
            view = edge.wait_status(DEMO_HOST, "active", timeout=90)
            cert = view["certificate"]
            steps.say(f"certificate issued over HTTP-01: serial {cert['serial']}, issuer {cert['issuer']!r}, "
                      f"not after {cert['not_after']}")

            base = f"https://127.0.0.1:{config.https_port}"
            sni = {"sni_hostname": DEMO_HOST}
            with verified_client([pebble.root_pem()], http2=True) as client:
                script = client.get(f"{base}/js/app.js", headers={"Host": DEMO_HOST}, extensions=sni)
                script.raise_for_status()
                endpoint = next((line.strip() for line in script.text.splitlines() if "endpoint =" in line), "")
                steps.say(f"GET https://{DEMO_HOST}/js/app.js -> {script.status_code} over {script.http_version}, "
                          f"TLS verified against Pebble's root; rewritten: {endpoint}")
                sent = b'{"type":"pageview","url":"https://shop.demo.test/"}'
                event = client.post(f"{base}/api/v1/m/collect", headers={"Host": DEMO_HOST},
                                    content=sent, extensions=sni)
                steps.say(f"POST https://{DEMO_HOST}/api/v1/m/collect -> {event.status_code} {event.text}")
                # An image beacon: a GET whose event is in its query, forwarded as a GET.
                pixel_path = "/api/v1/m/media.gif?kind=pageview&hostname=shop.demo.test&path=%2Fcart"
                pixel = client.get(f"{base}{pixel_path}", headers={"Host": DEMO_HOST}, extensions=sni)
                steps.say(f"GET https://{DEMO_HOST}{pixel_path} -> {pixel.status_code} "
                          f"{pixel.headers.get('content-type')}")
                misdirected = client.get(f"{base}/js/app.js", headers={"Host": "other.demo.test"}, extensions=sni)
                steps.say(f"GET with Host other.demo.test -> {misdirected.status_code} (never forwarded)")
            received = relay.snapshot()
            posts = [r for r in received if r.method == "POST"]
            beacons = [r for r in received if r.method == "GET" and r.path == "/ingest" + pixel_path[len("/api/v1/m"):]]
            if pixel.status_code != 200 or not beacons:
                print("the image beacon did not reach the relay as a GET with its query", file=sys.stderr)
                return 1
            if event.status_code >= 300 or not posts or posts[-1].body != sent:
                print("the event did not reach the relay intact", file=sys.stderr)
                return 1
            steps.say("verified HTTPS round trip complete")
            if keep:
                steps.say(f"serving until Ctrl-C; try: curl --resolve {DEMO_HOST}:{config.https_port}:127.0.0.1 "
                          f"--cacert <(curl -sk {pebble.management_url}/roots/0) "
                          f"https://{DEMO_HOST}:{config.https_port}/js/app.js")
                while True:
                    time.sleep(3600)
            return 0
        except KeyboardInterrupt:
            steps.say("interrupted; cleaning up")
            return 130
        except (HarnessError, RuntimeError, TimeoutError) as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
        finally:
            steps.say("stopping edgeproxy, Pebble, DNS, origin and relay")
