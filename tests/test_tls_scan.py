"""Sslyze's Mozilla "intermediate" check passes against a running edge
that serves a real Pebble certificate (issued over HTTP-01 by the ``stack``).

sslyze runs from ``.venv-scan`` (``make deps``; see tests/sslyze_scan.py for why
it has its own environment) and trusts only Pebble's root. The one finding we
tolerate is Pebble's own certificate lifespan (5 years, over Mozilla's 366 days):
that is the test CA's choice, not ours; every Let's Encrypt certificate is 90 days
or less.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import HOSTS, Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SCAN_PYTHON = ROOT / ".venv-scan" / "bin" / "python"
TOLERATED = {"maximum_certificate_lifespan"}


def _scan(stack: Stack, tmp_path: Path, host: str, profile: str = "intermediate") -> dict[str, object]:
    if not SCAN_PYTHON.exists():
        pytest.fail(f"{SCAN_PYTHON} not found: run `make deps` (installs sslyze in its own venv)", pytrace=False)
    ca = tmp_path / "pebble-root.pem"
    ca.write_bytes(b"".join(stack.roots))
    proc = subprocess.run(
        [str(SCAN_PYTHON), str(ROOT / "tests" / "sslyze_scan.py"), host, str(stack.edge.config.https_port),
         str(ca), profile],
        capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_sslyze_mozilla_intermediate(stack: Stack, tmp_path: Path) -> None:
    result = _scan(stack, tmp_path, HOSTS[0])
    issues = result["issues"]
    assert isinstance(issues, dict)
    # Only Pebble's lifespan, by name; the certificate verified against Pebble's
    # root (no certificate_path_validation issue) and nothing else was found.
    assert set(issues) == TOLERATED, issues
    assert "Certificate life span is" in issues["maximum_certificate_lifespan"]
    assert result["versions"] == ["tls_1_2", "tls_1_3"]
    assert result["curves"] == ["X25519", "secp256r1", "secp384r1"]
    tls12 = result["tls_1_2"]
    assert isinstance(tls12, list) and tls12
    assert all(s.startswith("TLS_ECDHE_ECDSA_WITH_") and ("_GCM_" in s or "CHACHA20_POLY1305" in s)
               for s in tls12), tls12
