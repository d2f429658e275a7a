"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and the checker bites.

They pin the seams a wrong import would quietly undo: the data path one way
(proxy -> spool -> relay client), acme behind acme_client, hypercorn behind its
adapter, no import circles, pure rules without I/O.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_import_contract_is_kept() -> None:
    run = lint()
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", run.stdout), run.stdout


def test_a_contract_the_code_breaks_is_reported(tmp_path: Path) -> None:
    """Guard against a checker that passes everything: the proxy does import the relay."""
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_package = edgeproxy\n\n"
                      "[importlinter:contract:proxy-without-relay]\nname = proxy without relay\n"
                      "type = forbidden\nsource_modules = edgeproxy.edge.proxy\nforbidden_modules = edgeproxy.edge.relay\n")
    run = lint("--config", str(config))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "edgeproxy.edge.proxy -> edgeproxy.edge.relay" in run.stdout
