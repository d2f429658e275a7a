"""Profile the edge under load with py-spy: ``python bench/profile.py get|post|beacon|handshakes [seconds]``.

Starts a 1-name edge (100,000 names for ``handshakes``), the fast relay and the
script origin, runs wrk (``handshakes.py``, a random name per connection)
against it and records the edge process with ``py-spy record`` (flame graph SVG and a
``--format raw`` collapsed-stack file under ``bench/.cache/``). Prints the top
frames by own time. Used before each optimisation (see bench/README.md).
"""

from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402
import run  # noqa: E402

from edgeproxy.devtools.edgeproc import EdgeProcess, free_port  # noqa: E402
from edgeproxy.devtools.upstreams import ScriptOrigin  # noqa: E402


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "get"
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    out = fixtures.CACHE / f"profile-{mode}"
    with tempfile.TemporaryDirectory() as tmp, ScriptOrigin(run.bench_script()) as origin:
        work = Path(tmp)
        relay_port = free_port()
        with run.process([run.PY, str(run.HERE / "relay.py"), str(relay_port)], work / "relay.log"):
            run.wait_port(relay_port)
            names = 100_000 if mode == "handshakes" else 1
            fixtures.install_db(names, work / "edge")
            config = run.edge_config(work / "edge", origin, relay_port)
            with EdgeProcess(config) as edge:
                run.first_https_200(config.https_port, run.HOST0, time.monotonic() + 20)
                assert edge.proc is not None
                run.settle(edge.proc.pid)  # the monitor's first round is start-up work, not load
                body = b'{"type":"pageview"}' if mode == "post" else None
                path = {"post": "/api/v1/m/collect",
                        "beacon": "/api/v1/m/media.gif?kind=pageview&hostname=www.shop.example&path=%2Fcart&ts=1"}.get(
                            mode, "/js/app.js")
                result: dict[str, object] = {}
                if mode == "handshakes":
                    load = threading.Thread(target=lambda: result.update(
                        run.handshakes(config.https_port, names, seconds + 1)))
                else:
                    load = threading.Thread(target=lambda: result.update(
                        run.wrk(config.https_port, path, seconds + 1, body=body, warmup=0)))
                load.start()
                spy = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(edge.proc.pid), "-d", str(seconds), "-r", "200",
                                      "--nonblocking", "-f", "raw", "-o", f"{out}.txt"],
                                     check=False, capture_output=True, text=True)
                if spy.returncode != 0:
                    sys.exit(f"py-spy failed: {spy.stderr[-2000:]}")
                load.join()
                rate = result.get("rate", result.get("rps"))
                print(f"load: {rate:.0f}/s under profiling")
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(f"{out}.txt").read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
    for frame, samples in own.most_common(25):
        print(f"{100 * samples / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
