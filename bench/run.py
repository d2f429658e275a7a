"""``make bench``: edgeproxy against the bare hypercorn ceiling, side by side, in one run.

Owns: starting every process a scenario needs on loopback (the edge, the
ceiling, the fast relay, the script origin, Pebble), driving the load
generators (wrk from Debian; ``handshakes.py`` where the
SNI must vary), and printing one table of req/s, p50/p99 latency and ratios.
Results also go to ``bench/results.json``.

Scenarios (in this order):
  a. cached script GET over HTTPS keep-alive (HTTP/1.1, 50 connections);
  b. API POST forwarded to a fast local relay (``relay.py``); b2. a GET image beacon, likewise;
  c. new TLS handshakes/s with 1 registered name and with 100,000 names drawn at random;
  d. start-up time to the first served request, and RSS, with 10,000 and 100,000 certificates;
  e. registration (POST /v1/domains) to the first verified HTTPS 200, against Pebble.

Usage: ``python bench/run.py [--seconds 5] [--only a,b,c,d,e] [--workers 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402
from caddy import CaddySite, available as caddy_available  # noqa: E402

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess, free_port, verified_client  # noqa: E402
from edgeproxy.devtools.upstreams import ScriptOrigin  # noqa: E402

HERE = Path(__file__).resolve().parent
PY = sys.executable
HOST0 = fixtures.host(0)
CONNECTIONS = 50


def bench_script() -> str:
    """A ~5 KB tracker (the size the issue quotes), naming the vendor relay like a real one."""
    rng = random.Random(8)
    words = ["track", "event", "page", "view", "session", "queue", "flush", "beacon", "payload", "screen"]
    lines = ['/* vendor tracker (bench) */', '(function () {',
             '  var endpoint = "https://relay.vendor.invalid/collect";']
    while sum(len(x) + 1 for x in lines) < 5000:
        a, b = rng.sample(words, 2)
        lines.append(f"  function {a}_{b}_{rng.randrange(10**6)}(x) {{ return x && x.{b} ? x.{a} + {rng.randrange(999)} : null; }}")
    lines.append("})();")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """RSS of a process and its descendants (workers), in KB."""
    total = 0
    for p in _family(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _family(pid: int) -> list[int]:
    """The process and all its descendants (workers, their helpers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """RSS and PSS of the whole process tree, in KB (``/proc/PID/smaps_rollup``).

    RSS counts a page shared by two workers twice; PSS charges each process its
    share, so the tree's PSS is what the tree costs the machine."""
    total = {"rss": 0, "pss": 0, "processes": 0}
    for p in _family(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        total["processes"] += 1
        for line in text.splitlines():
            if line.startswith("Rss:"):
                total["rss"] += int(line.split()[1])
            elif line.startswith("Pss:"):
                total["pss"] += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (workers)."""
    total = 0.0
    for p in _family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def settle(pid: int, timeout: float = 30.0) -> float:
    """Wait until the edge is idle (< 5% of a core over 1 s); seconds waited.

    A node's start-up work does not end with the first served request: the
    monitor's first round reads every domain (~1 s of CPU at 100,000). A
    throughput run measures the steady state, so it starts after that."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        before = cpu_seconds(pid)
        time.sleep(1.0)
        if cpu_seconds(pid) - before < 0.05:
            break
    return time.monotonic() - t0


def wait_port(port: int, timeout: float = 20.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def edge_config(state: Path, origin: ScriptOrigin, relay_port: int, extra: dict[str, dict[str, Any]] | None = None) -> EdgeConfig:
    return EdgeConfig(
        state_dir=state, acme_directory="https://127.0.0.1:9/dir", acme_ca_bundle="",
        script_url=origin.script_url, relay_url=f"http://127.0.0.1:{relay_port}/ingest",
        extra={"upstream": {"rewrite": {"https://relay.vendor.invalid": "https://{host}{api_path}"}},
               **(extra or {})},
    )


def first_https_200(port: int, name: str, deadline: float) -> float:
    """Poll until the script answers 200 over HTTPS with SNI = name; the time it did."""
    client = httpx.Client(verify=False, trust_env=False, timeout=2.0)
    try:
        while time.monotonic() < deadline:
            try:
                r = client.get(f"https://127.0.0.1:{port}/js/app.js", headers={"Host": name},
                               extensions={"sni_hostname": name})
                if r.status_code == 200:
                    return time.monotonic()
            except httpx.TransportError:
                pass
            time.sleep(0.01)
    finally:
        client.close()
    raise RuntimeError(f"no 200 from {name} on {port}")


# ---------------------------------------------------------------------------------------
# load generators
# ---------------------------------------------------------------------------------------


_WRK_LUA = """
-- SNI and Host must be the custom name while the socket goes to 127.0.0.1:
-- wrk takes SNI from the URL host, so resolve that host to loopback ourselves.
local resolve = wrk.resolve
wrk.resolve = function(host, service) return resolve("127.0.0.1", service) end
wrk.headers["Accept-Encoding"] = "gzip"
"""


def _ms(value: str) -> float:
    m = re.match(r"([0-9.]+)(us|ms|s)", value)
    assert m, value
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def wrk(port: int, path: str, seconds: float, *, body: bytes | None = None, name: str = HOST0,
        connections: int = CONNECTIONS, warmup: float = 1.0, pid: int | None = None) -> dict[str, Any]:
    """wrk over TLS keep-alive (HTTP/1.1) with SNI/Host = name: req/s, p50/p99, non-2xx count;
    with ``pid``, also the server's CPU per request (its process tree's ``/proc`` times over
    the measured run: the figure that survives a shared machine best).

    (h2load 1.52 counts hypercorn's HTTP/1.1 answers as failed: hypercorn sends an
    empty reason phrase and h2load then never records the status.)
    """
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(_WRK_LUA)
        if body is not None:
            fh.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
            fh.write(f"wrk.body = {json.dumps(body.decode())}\n")
        script = fh.name
    url = f"https://{name}:{port}{path}"
    try:
        if warmup:
            subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(warmup))}s", "-s", script, url],
                           capture_output=True, timeout=warmup + 60)
        cpu0 = cpu_seconds(pid) if pid else 0.0
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                              "-s", script, url], capture_output=True, text=True, timeout=seconds + 60).stdout
        cpu = cpu_seconds(pid) - cpu0 if pid else None
    finally:
        os.unlink(script)
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    p50 = re.search(r"\n\s+50%\s+(\S+)", out)
    p99 = re.search(r"\n\s+99%\s+(\S+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    total = re.search(r"(\d+) requests in", out)
    non_2xx = int(bad.group(1)) if bad else 0
    requests = int(total.group(1)) if total else 0
    good = requests - non_2xx
    return {
        # Only 2xx answers count as served: a fast 421 or 502 is not throughput.
        "rps": float(rps.group(1)) * good / requests if rps and requests else 0.0,
        "p50_ms": _ms(p50.group(1)) if p50 else None,
        "p99_ms": _ms(p99.group(1)) if p99 else None,
        "requests": requests,
        "non_2xx": non_2xx,
        "socket_errors": errors.group(1) if errors else "",
        "cpu_ms": 1000 * cpu / good if cpu is not None and good else None,
        "raw": out[-900:],
    }


def handshakes(port: int, names: int, seconds: float, zipf: bool = False, pid: int | None = None) -> dict[str, Any]:
    argv = [PY, str(HERE / "handshakes.py"), str(port), str(names), str(seconds)] + (["2", "8", "zipf"] if zipf else [])
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(argv,
                         capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if pid and result.get("rate"):
        # The client's start-up is inside the window too: per handshake this is an upper bound.
        result["cpu_ms"] = 1000 * (cpu_seconds(pid) - cpu0) / result["handshakes"]
    return result


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------


def mean_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Average of repeated runs (numbers only); the machine is shared, so each pair
    of runs alternates reference and edge and the table shows the mean."""
    out: dict[str, Any] = dict(runs[-1])
    for key in ("rps", "rate", "p50_ms", "p99_ms", "cpu_ms"):
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = sum(values) / len(values)
    for key in ("non_2xx", "errors", "wrong_cert", "checked"):
        if key in runs[-1]:
            out[key] = sum(r.get(key, 0) for r in runs)
    out["runs"] = [r.get("rps", r.get("rate")) for r in runs]
    return out


def alternate(ref: Any, edge: Any, repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    refs, edges = [], []
    for i in range(repeats):
        if i % 2 == 0:
            refs.append(ref())
            edges.append(edge())
        else:
            edges.append(edge())
            refs.append(ref())
    return mean_of(edges), mean_of(refs)


class Table:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, scenario: str, target: str, edge: dict[str, Any] | None, ceiling: dict[str, Any] | None,
            key: str = "rps", note: str = "") -> None:
        ratio = None
        if edge and ceiling and edge.get(key) and ceiling.get(key):
            ratio = edge[key] / ceiling[key]
        self.rows.append({"scenario": scenario, "target": target, "edge": edge, "ceiling": ceiling,
                          "key": key, "ratio": ratio, "note": note})
        print(self.format_row(self.rows[-1]), flush=True)

    @staticmethod
    def _fmt(v: Any, nd: int = 1) -> str:
        return "-" if v is None else (f"{v:,.{nd}f}" if isinstance(v, float) else str(v))

    def format_row(self, r: dict[str, Any]) -> str:
        e, c = r["edge"] or {}, r["ceiling"] or {}
        return (f"| {r['scenario']} | {self._fmt(e.get(r['key']))} | {self._fmt(e.get('p50_ms'), 2)} | "
                f"{self._fmt(e.get('p99_ms'), 2)} | {self._fmt(c.get(r['key']))} | {self._fmt(c.get('p50_ms'), 2)} | "
                f"{self._fmt(c.get('p99_ms'), 2)} | {self._fmt(r['ratio'], 2)} | {r['target']} | {r['note']} |")

    HEADER = ("| scenario | edge | edge p50 ms | edge p99 ms | reference | ref p50 ms | ref p99 ms | ratio | target | note |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")


def scenario_ab(t: Table, work: Path, origin: ScriptOrigin, relay_port: int, seconds: float,
                workers: int, only: set[str], repeats: int, label: str = "", candidates: bool = True,
                ceiling_workers: int = 1) -> dict[str, Any]:
    """Scenarios a and b (and the 1-name handshake rate, which needs the same processes)."""
    found: dict[str, Any] = {}
    state = work / f"edge-1-w{workers}"
    fixtures.install_db(1, state)
    chain, key = fixtures.chain_and_key(0, work / "ceiling")
    config = edge_config(state, origin, relay_port)
    post = b'{"type":"pageview","url":"https://shop.example/","ts":1700000000000}'
    api = "/api/v1/m/collect"
    with EdgeProcess(config, workers=workers) as edge:
        first_https_200(config.https_port, HOST0, time.monotonic() + 20)
        with httpx.Client(verify=False, trust_env=False) as client, client.stream(
                "GET", f"https://127.0.0.1:{config.https_port}/js/app.js",
                headers={"Host": HOST0, "Accept-Encoding": "gzip"}, extensions={"sni_hostname": HOST0}) as r:
            assert r.status_code == 200 and r.headers.get("content-encoding") == "gzip"
            keep = [(k, v) for k, v in r.headers.raw if k.lower() not in (b"date", b"server")]
            body = b"".join(r.iter_raw())
        ceiling_port = free_port()
        spec = work / "ceiling" / "spec.json"
        spec.write_text(json.dumps({"port": ceiling_port, "certfile": str(chain), "keyfile": str(key),
                                    "workers": ceiling_workers,
                                    "script_body": body.hex(),
                                    "script_headers": [[k.decode(), v.decode()] for k, v in keep]}))
        with process([PY, str(HERE / "ceiling.py"), str(spec)], work / "ceiling.log"):
            wait_port(ceiling_port)
            port = config.https_port
            if "a" in only:
                e, c = alternate(lambda: wrk(ceiling_port, "/js/app.js", seconds),
                                 lambda: wrk(port, "/js/app.js", seconds), repeats)
                t.add(f"a. script GET ({len(body)} B gzip of {len(origin.script)} B), HTTP/1.1 keep-alive, "
                      f"{CONNECTIONS} conns{label} (req/s)", ">= 0.90", e, c, note=f"non-2xx {e['non_2xx']}")
                found["a"] = (e, c)
            if "b" in only:
                e, c = alternate(lambda: wrk(ceiling_port, api, seconds, body=post),
                                 lambda: wrk(port, api, seconds, body=post), repeats)
                t.add(f"b. API POST forwarded to the relay, upstream.client=aiohttp (default){label} (req/s)", ">= 0.60",
                      e, c, note=f"non-2xx {e['non_2xx']}")
                found["b"] = (e, c)
            if "b" in only:
                # An image beacon: a GET whose event is all in the query, forwarded as a GET.
                beacon = "/api/v1/m/media.gif?kind=pageview&hostname=www.shop.example&path=%2Fcart&ts=1700000000000"
                e, c = alternate(lambda: wrk(ceiling_port, beacon, seconds),
                                 lambda: wrk(port, beacon, seconds), repeats)
                t.add(f"b2. GET beacon forwarded to the relay{label} (req/s)", "(next to b)",
                      e, c, note=f"non-2xx {e['non_2xx']}")
                found["b2"] = (e, c)
            if "c" in only:
                e, c = alternate(lambda: handshakes(ceiling_port, 1, seconds),
                                 lambda: handshakes(port, 1, seconds), repeats)
                t.add("c1. new TLS handshakes/s, 1 name", "(ceiling)", e, c, key="rate",
                      note=f"wrong cert {e['wrong_cert']}/{e['checked']}, errors {e['errors']}")
                found["c1"] = (e, c)
            if "b" in only and candidates:
                # The candidates for the forwarding transport, each in its own edge,
                # each against the same ceiling (measured side by side).
                edge.stop()
                for client_kind, pool in (("httpx", 64), ("httpx", 16)):
                    vstate = work / f"edge-{client_kind}-{pool}"
                    fixtures.install_db(1, vstate)
                    vconfig = edge_config(vstate, origin, relay_port,
                                          {"upstream": {"client": client_kind, "pool_size": pool,
                                                        "rewrite": {"https://relay.vendor.invalid": "https://{host}{api_path}"}}})
                    with EdgeProcess(vconfig, workers=workers):
                        first_https_200(vconfig.https_port, HOST0, time.monotonic() + 20)
                        e, c = alternate(lambda: wrk(ceiling_port, api, seconds, body=post),
                                         lambda: wrk(vconfig.https_port, api, seconds, body=post), repeats)
                    t.add(f"b'. same, upstream.client={client_kind}, pool_size={pool} (req/s)", "(candidate)",
                          e, c, note=f"non-2xx {e['non_2xx']}")
    return found


class CaddyTable:
    """Edge against Caddy, same run, same cores: throughput, latency and server CPU per request."""

    HEADER = ("| scenario | edge req/s | edge p50 ms | edge p99 ms | edge CPU ms/req | Caddy req/s | Caddy p50 ms | "
              "Caddy p99 ms | Caddy CPU ms/req | edge/Caddy req/s | edge/Caddy CPU per req | target |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def add(self, scenario: str, target: str, edge: dict[str, Any], caddy: dict[str, Any], key: str = "rps") -> None:
        ratio = edge[key] / caddy[key] if edge.get(key) and caddy.get(key) else None
        cpu = edge["cpu_ms"] / caddy["cpu_ms"] if edge.get("cpu_ms") and caddy.get("cpu_ms") else None
        row = {"scenario": scenario, "target": target, "edge": edge, "caddy": caddy, "key": key,
               "ratio": ratio, "cpu_ratio": cpu}
        self.rows.append(row)
        f = Table._fmt
        print(f"| {scenario} | {f(edge.get(key))} | {f(edge.get('p50_ms'), 2)} | {f(edge.get('p99_ms'), 2)} | "
              f"{f(edge.get('cpu_ms'), 3)} | {f(caddy.get(key))} | {f(caddy.get('p50_ms'), 2)} | "
              f"{f(caddy.get('p99_ms'), 2)} | {f(caddy.get('cpu_ms'), 3)} | {f(ratio, 2)} | {f(cpu, 2)} | {target} |",
              flush=True)


def default_workers() -> int:
    """What ``edgeproxy serve`` starts without ``--workers``: the CPUs this process may use."""
    return len(os.sched_getaffinity(0))


def scenario_caddy(rows: list[dict[str, Any]], work: Path, origin: ScriptOrigin, relay_port: int, seconds: float,
                   repeats: int, workers: int, proxy: dict[str, Any] | None = None, label: str = "",
                   scenarios: frozenset[str] = frozenset({"get", "file", "post", "beacon", "handshakes"})) -> None:
    """The edge at its default worker count against Caddy (all cores, its default), runs alternated.

    ``proxy``: extra ``[proxy]`` settings of the edge (a candidate measured against the same Caddy)."""
    if not caddy_available():
        raise SystemExit("caddy is not installed: `make caddy` (Debian's package, its service kept stopped)")
    state = work / f"edge-caddy{len(rows)}"
    fixtures.install_db(1, state)
    chain, key = fixtures.chain_and_key(0, work / "caddy")
    config = edge_config(state, origin, relay_port, {"proxy": proxy} if proxy else None)
    post = b'{"type":"pageview","url":"https://shop.example/","ts":1700000000000}'
    api = "/api/v1/m/collect"
    beacon = "/api/v1/m/media.gif?kind=pageview&hostname=www.shop.example&path=%2Fcart&ts=1700000000000"
    with EdgeProcess(config, workers=workers) as edge:
        assert edge.proc is not None
        first_https_200(config.https_port, HOST0, time.monotonic() + 20)
        url = f"https://127.0.0.1:{config.https_port}/js/app.js"
        with httpx.Client(verify=False, trust_env=False) as client, client.stream(
                "GET", url, headers={"Host": HOST0, "Accept-Encoding": "gzip"},
                extensions={"sni_hostname": HOST0}) as r:
            assert r.status_code == 200 and r.headers.get("content-encoding") == "gzip"
            keep = [(k, v) for k, v in r.headers.raw if k.lower() not in (b"date", b"server", b"content-length")]
            body = b"".join(r.iter_raw())
        import gzip as _gzip
        (work / "caddy" / "origin-body").write_bytes(body)
        (work / "caddy" / "origin-headers").write_bytes(b"\r\n".join(k + b": " + v for k, v in keep))
        origin_port, caddy_port = free_port(), free_port()
        site = CaddySite(work / "caddy", HOST0, caddy_port, free_port(), chain, key, origin_port, relay_port)
        caddyfile = site.write(_gzip.decompress(body))
        with process([PY, str(HERE / "relay.py"), str(origin_port), "--script", str(work / "caddy" / "origin-body"),
                      str(work / "caddy" / "origin-headers")], work / "origin.log"), \
                process(site.argv(caddyfile), work / "caddy.log", env=site.env()) as caddy:
            wait_port(origin_port)
            wait_port(caddy_port)
            with httpx.Client(verify=False, trust_env=False) as client:
                for path in ("/js/app.js", "/static/js/app.js"):
                    r = client.get(f"https://127.0.0.1:{caddy_port}{path}", extensions={"sni_hostname": HOST0},
                                   headers={"Host": HOST0, "Accept-Encoding": "gzip"})
                    assert r.status_code == 200 and r.headers.get("content-encoding") == "gzip", (path, r.headers)
                r = client.post(f"https://127.0.0.1:{caddy_port}{api}", content=post, extensions={"sni_hostname": HOST0},
                                headers={"Host": HOST0})
                assert r.status_code == 202, r.status_code
            settle(edge.proc.pid)
            e_pid, c_pid, port = edge.proc.pid, caddy.pid, config.https_port
            t = CaddyTable(rows)
            label = label or f"edge {workers} workers (default), Caddy GOMAXPROCS={os.cpu_count()}"
            if "get" in scenarios:
                e, c = alternate(lambda: wrk(caddy_port, "/js/app.js", seconds, pid=c_pid),
                                 lambda: wrk(port, "/js/app.js", seconds, pid=e_pid), repeats)
                t.add(f"script GET ({len(body)} B gzip), Caddy reverse_proxy to the origin; {label}", ">= 1.0", e, c)
            if "file" in scenarios:
                e, c = alternate(lambda: wrk(caddy_port, "/static/js/app.js", seconds, pid=c_pid),
                                 lambda: wrk(port, "/js/app.js", seconds, pid=e_pid), repeats)
                t.add(f"script GET, Caddy file_server precompressed gzip; {label}", "(perspective)", e, c)
            if "post" in scenarios:
                e, c = alternate(lambda: wrk(caddy_port, api, seconds, body=post, pid=c_pid),
                                 lambda: wrk(port, api, seconds, body=post, pid=e_pid), repeats)
                t.add(f"API POST forwarded to the same relay; {label}", ">= 0.75; CPU <= 1.5x", e, c)
            if "beacon" in scenarios:
                e, c = alternate(lambda: wrk(caddy_port, beacon, seconds, pid=c_pid),
                                 lambda: wrk(port, beacon, seconds, pid=e_pid), repeats)
                t.add(f"GET beacon forwarded to the same relay; {label}", ">= 0.75; CPU <= 1.5x", e, c)
            if "handshakes" in scenarios:
                e, c = alternate(lambda: handshakes(caddy_port, 1, seconds, pid=c_pid),
                                 lambda: handshakes(port, 1, seconds, pid=e_pid), repeats)
                t.add(f"new TLS handshakes/s, 1 name (client-bound); {label}", "(perspective)", e, c, key="rate")
            mem_e, mem_c = memory_kb(e_pid), memory_kb(c_pid)
            print(f"memory after the runs: edge tree {mem_e['processes']} processes RSS {mem_e['rss'] / 1024:.0f} MB "
                  f"PSS {mem_e['pss'] / 1024:.0f} MB; Caddy RSS {mem_c['rss'] / 1024:.0f} MB "
                  f"PSS {mem_c['pss'] / 1024:.0f} MB", flush=True)
            rows.append({"scenario": "memory after the Caddy runs", "edge": mem_e, "caddy": mem_c})


def start_timed(config: EdgeConfig, name: str, workers: int) -> tuple[EdgeProcess, float, int]:
    """Start an edge; seconds from exec to the first served HTTPS 200, and RSS then."""
    edge = EdgeProcess(config, workers=workers)
    path = config.write()
    t0 = time.monotonic()
    with open(edge.log_path, "ab") as log:
        edge.proc = subprocess.Popen(
            [PY, "-m", "edgeproxy", "--config", str(path), "serve", "--workers", str(workers)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t1 = first_https_200(config.https_port, name, t0 + 120)
    time.sleep(0.5)
    return edge, t1 - t0, rss_kb(edge.proc.pid)


def scenario_memory(t: Table, work: Path, origin: ScriptOrigin, relay_port: int, workers: int) -> None:
    """d'. The whole process tree at the default worker count, 100,000 certificates: RSS and PSS
    once every worker serves (PSS charges each shared page once across the tree)."""
    n = 100_000
    state = work / f"edge-{n}-w{workers}"
    fixtures.install_db(n, state)
    config = edge_config(state, origin, relay_port)
    edge, startup, _ = start_timed(config, fixtures.host(random.randrange(n)), workers)
    try:
        assert edge.proc is not None
        # Every worker has loaded its map once the tree is idle again (settle), and a
        # request on a fresh connection has reached at least one of them.
        settle(edge.proc.pid)
        mem = memory_kb(edge.proc.pid)
        t.add(f"d'. start-up to first HTTPS 200, {n:,} certs, {workers} workers (default) (s)", "", {"s": startup},
              None, key="s")
        t.add(f"d'. process tree RSS, {n:,} certs, {workers} workers, {mem['processes']} processes (MB)", "",
              {"mb": mem["rss"] / 1024}, None, key="mb")
        t.add(f"d'. process tree PSS, {n:,} certs, {workers} workers (MB)", "<= 400 MB",
              {"mb": mem["pss"] / 1024}, None, key="mb")
    finally:
        edge.stop()


def scenario_cd(t: Table, work: Path, origin: ScriptOrigin, relay_port: int, seconds: float, workers: int,
                only: set[str], repeats: int) -> None:
    for n in (10_000, 100_000):
        state = work / f"edge-{n}"
        fixtures.install_db(n, state)
        config = edge_config(state, origin, relay_port)
        name = fixtures.host(random.randrange(n))
        edge, startup, rss = start_timed(config, name, workers)
        try:
            if "d" in only:
                t.add(f"d. start-up to first HTTPS 200, {n:,} certs (s)", "<= 2 s" if n == 100_000 else "",
                      {"s": startup}, None, key="s")
                t.add(f"d. RSS after start-up, {n:,} certs (MB)", "<= 300 MB" if n == 100_000 else "",
                      {"mb": rss / 1024}, None, key="mb")
            if n == 100_000 and "c" in only:
                # The 1-name rate again, from an edge with one registered name, in
                # alternation with the 100,000-name edge: on a shared machine only
                # runs taken side by side make an honest ratio.
                one_state = work / "edge-1-c2"
                fixtures.install_db(1, one_state)
                one = edge_config(one_state, origin, relay_port)
                with EdgeProcess(one, workers=workers) as one_edge:
                    first_https_200(one.https_port, HOST0, time.monotonic() + 20)
                    assert one_edge.proc is not None and edge.proc is not None  # both started
                    settle(one_edge.proc.pid)
                    settle(edge.proc.pid)
                    e, ref = alternate(lambda: handshakes(one.https_port, 1, seconds),
                                       lambda: handshakes(config.https_port, n, seconds), repeats)
                t.add("c2. new TLS handshakes/s, 100,000 names at random", ">= 0.90 of 1 name", e, ref, key="rate",
                      note=f"wrong cert {e['wrong_cert']}/{e['checked']}, errors {e['errors']}; "
                           "ref = the same edge with 1 name, runs alternated")
                z = handshakes(config.https_port, n, seconds, zipf=True)
                t.add("c3. same, names drawn by Zipf (p ~ 1/rank), for perspective", "(not a target)", z, ref,
                      key="rate", note=f"wrong cert {z['wrong_cert']}/{z['checked']}, errors {z['errors']}; ref = c2's")
                t.add(f"d. RSS after c2+c3 (certificate cache full), {n:,} certs (MB)", "<= 300 MB",
                      {"mb": rss_kb(edge.proc.pid) / 1024}, None, key="mb")
        finally:
            edge.stop()


def scenario_e(t: Table, work: Path, origin: ScriptOrigin, relay_port: int, rounds: int) -> None:
    from edgeproxy.devtools.pebble import ChallTestSrv, Pebble
    state = work / "edge-pebble"
    config = edge_config(state, origin, relay_port)
    with ChallTestSrv(default_ipv4="127.0.0.1", default_ipv6="") as dns, \
            Pebble(http_port=config.http_port, dns_server=dns.dns_address, nonce_reject=0, authz_reuse=0) as ca:
        config.acme_directory = ca.directory_url
        config.acme_ca_bundle = str(ca.ca_bundle_path)
        roots = [ca.root_pem()]
        with EdgeProcess(config) as edge, edge.admin() as admin:
            times = []
            for i in range(rounds):
                name = f"reg{i}-{random.randrange(10**6)}.example.test"
                t0 = time.monotonic()
                assert admin.post("/v1/domains", json={"hostname": name}).status_code == 201
                while time.monotonic() - t0 < 60:
                    try:
                        # A new connection per attempt, as a new visitor's browser: a pooled
                        # connection would carry the previous name's SNI (and get 421).
                        with verified_client(roots, timeout=2) as client:
                            r = client.get(f"https://127.0.0.1:{config.https_port}/js/app.js",
                                           headers={"Host": name}, extensions={"sni_hostname": name})
                        if r.status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.02)
                else:
                    raise RuntimeError(f"{name}: no verified 200 in 60 s\n{edge.log_text()[-3000:]}")
                times.append(time.monotonic() - t0)
            (fixtures.CACHE / "e-edge.log").write_text(edge.log_text())
    t.add(f"e. POST /v1/domains to verified HTTPS 200, median of {rounds} (s)", "<= 1.5 s",
          {"s": statistics.median(times), "p50_ms": statistics.median(times) * 1000,
           "p99_ms": max(times) * 1000}, None, key="s", note="p99 column = worst")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", default="caddy,a,b,c,d,e",
                        help="caddy: the edge at its default worker count against Caddy; a..e: against the ceiling")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--also-workers", type=int, default=2,
                        help="repeat a and b with this many edge workers (0: skip), against the 1-worker ceiling "
                             "and against a ceiling with as many workers")
    parser.add_argument("--repeats", type=int, default=2, help="alternating ceiling/edge runs per scenario")
    parser.add_argument("--caddy-candidates", type=int, default=1,
                        help="also measure the edge without its HTTP/1.1 fast path against Caddy (0: skip)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    for n in (1, 10_000, 100_000):
        fixtures.cached_db(n)
    t = Table()
    print(f"# edgeproxy bench: {os.cpu_count()} cores, {args.seconds:g} s per run x {args.repeats} alternating, "
          f"edge workers={args.workers}, ceiling = bare hypercorn 1 worker, same certificate; "
          f"load average before: {os.getloadavg()[0]:.2f}\n")
    print(Table.HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="edgeproxy-bench-") as tmp, ScriptOrigin(bench_script()) as origin:
        work = Path(tmp)
        relay_port = free_port()
        with process([PY, str(HERE / "relay.py"), str(relay_port)], work / "relay.log"):
            wait_port(relay_port)
            if "caddy" in only:
                print(f"\n## against Caddy (load average {os.getloadavg()[0]:.2f})\n\n{CaddyTable.HEADER}", flush=True)
                scenario_caddy(t.rows, work, origin, relay_port, args.seconds, args.repeats, default_workers())
                if args.caddy_candidates:
                    # What the lean HTTP/1.1 path buys: the same edge with hypercorn for everything.
                    scenario_caddy(t.rows, work, origin, relay_port, args.seconds, args.repeats, default_workers(),
                                   proxy={"http1_fast_path": False}, label="candidate: proxy.http1_fast_path = false",
                                   scenarios=frozenset({"get", "post", "beacon"}))
                print(f"\n## against the bare hypercorn ceiling\n\n{Table.HEADER}", flush=True)
            if only & {"a", "b", "c"}:
                scenario_ab(t, work, origin, relay_port, args.seconds, args.workers, only, args.repeats)
            if args.also_workers and only & {"a", "b"}:
                # Several edge workers are fair game against the ceiling as
                # defined (1 worker); the same against a ceiling with as many workers
                # shows what the extra process buys each side on these 2 cores.
                for ceiling_workers in (1, args.also_workers):
                    scenario_ab(t, work, origin, relay_port, args.seconds, args.also_workers, only & {"a", "b"},
                                args.repeats, candidates=False, ceiling_workers=ceiling_workers,
                                label=f", edge {args.also_workers} workers, ceiling {ceiling_workers}")
            if "d" in only:
                scenario_memory(t, work, origin, relay_port, default_workers())
            if only & {"c", "d"}:
                scenario_cd(t, work, origin, relay_port, args.seconds, args.workers, only, args.repeats)
            if "e" in only:
                scenario_e(t, work, origin, relay_port, args.rounds)
    (HERE / "results.json").write_text(json.dumps(t.rows, indent=1, default=str))


if __name__ == "__main__":
    main()
