"""The suite itself: every test has its own id, and running it leaves nothing in /tmp.

Both run pytest in a subprocess with ``TMPDIR`` pointed at an empty directory,
so whatever a test module creates with ``tempfile`` at import or in its
fixtures lands there to be seen.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pytest_run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp / "tmp")}
    (tmp / "tmp").mkdir()
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)


def leftovers(tmp: Path) -> list[str]:
    # pytest's own tmp_path root (pytest-of-<user>) is pytest's to keep and rotate.
    return sorted(p.name for p in (tmp / "tmp").iterdir() if not p.name.startswith("pytest-of-"))


def test_collection_gives_every_test_its_own_id_and_writes_nothing(tmp_path: Path) -> None:
    result = pytest_run(tmp_path, "--collect-only", "tests")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(ids) > 500, result.stdout[-2000:]
    duplicates = [test_id for test_id, count in collections.Counter(ids).items() if count > 1]
    assert duplicates == [], "several tests share these ids (a failure could not be told apart or re-run)"
    assert leftovers(tmp_path) == [], "collecting the tests created files outside pytest's tmp_path"


def test_the_admin_api_fuzzing_leaves_no_store_behind(tmp_path: Path) -> None:
    result = pytest_run(tmp_path, "tests/test_admin_fuzz.py::test_admin_api_without_token")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
    assert leftovers(tmp_path) == []
