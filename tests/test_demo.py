"""``edgeproxy demo``: the state directory it advertises is there when it is needed.

The whole demo against Pebble takes half a minute (`make demo` runs it); here
the steps are replaced, and what is checked is what happens to the state
directory (database, certificates, ``edge.log``) after each outcome.
"""

from __future__ import annotations

import re
import signal
import tempfile
from pathlib import Path

import pytest

from edgeproxy import demo
from edgeproxy.devtools.pebble import HarnessError


def _advertised(output: str) -> Path:
    (path,) = set(re.findall(r"state directory (/\S+?)[ )]", output))
    return Path(path)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp lands under tmp_path
    monkeypatch.setattr(demo, "missing_binaries", lambda: [])


class _BrokenDns:
    """Stands in for pebble-challtestsrv failing to start."""

    def __enter__(self) -> None:
        raise HarnessError("pebble-challtestsrv exited at once")

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_failed_run_keeps_the_state_directory_and_says_where(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "ChallTestSrv", _BrokenDns)
    handler = signal.getsignal(signal.SIGTERM)
    assert demo.run_demo() == 1
    out, err = capsys.readouterr()
    assert "demo failed: pebble-challtestsrv exited at once" in err
    state = _advertised(out)
    assert state.parent == tmp_path and state.is_dir()
    assert "kept the state directory" in out and "edge.log" in out
    assert signal.getsignal(signal.SIGTERM) == handler  # the demo's SIGTERM handler is not left behind


@pytest.mark.parametrize(("keep", "code", "kept"), [(False, 0, False), (True, 130, True), (False, 130, True)])
def test_the_state_directory_is_removed_only_after_a_successful_run_without_keep(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], keep: bool, code: int, kept: bool
) -> None:
    # keep=True ends with Ctrl-C (130) after serving; 130 without keep: interrupted mid-run.
    def steps(state: Path, keep_: bool, _steps: object) -> int:
        (state / "edge.log").write_text("serving\n")
        return code

    monkeypatch.setattr(demo, "_run", steps)
    assert demo.run_demo(keep=keep) == code
    out = capsys.readouterr().out
    state = _advertised(out)
    assert state.is_dir() is kept
    if kept:
        assert (state / "edge.log").read_text() == "serving\n"
    else:
        assert "`edgeproxy demo --keep` keeps it" in out
