"""The README's examples work as written on a fresh install.

Convention for shell examples in README.md (one rule, checked here):

- a fenced block with the info string ``sh`` is run by this test as written:
  ``bash -eu`` in an empty temporary working directory, with this checkout's
  ``edgeproxy`` first on ``PATH`` and no ``EDGEPROXY_*`` variables, so every
  command in it must succeed there (no root, no network, no running edge);
- ``sh deployment`` marks a block that needs a deployed edge or a machine to
  set up (root, apt, systemd, ``/etc/edgeproxy``, the admin API on port 8081);
  it is never run, and a block that mentions those things must carry the mark.

Other blocks (the CLI synopsis, TOML, unit files, sample output) are not
commands; the synopsis is checked against the parser instead. Hostnames in the
examples must be ones the default configuration accepts.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from edgeproxy.cli import _parser
from edgeproxy.config import Settings
from edgeproxy.control.registry import admit_hostname

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# What only a deployed edge or a root shell on a real machine has.
_NEEDS_DEPLOYMENT = re.compile(r"/etc/edgeproxy|/var/lib/edgeproxy|:8081\b|\bsystemctl\b|\bsudo\b|\bapt(-get)?\b|^make\b",
                               re.M)


def fences(text: str) -> list[tuple[int, list[str], str]]:
    """(1-based line of the opening fence, info string words, content) of every fenced block."""
    md = MarkdownIt("commonmark")
    return [(t.map[0] + 1, t.info.split(), t.content) for t in md.parse(text) if t.type == "fence" and t.map]


def shell_blocks(text: str) -> list[tuple[int, bool, str]]:
    """(line, needs a deployment, script) of every ``sh`` block."""
    return [(line, "deployment" in info[1:], content) for line, info, content in fences(text) if info[:1] == ["sh"]]


def run_block(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", HOME=str(cwd))
    return subprocess.run(["bash", "-eu", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_convention_recognizes_both_kinds() -> None:
    text = "```sh\nedgeproxy --help\n```\n\n```sh deployment\nsystemctl start edgeproxy\n```\n\n```toml\n[a]\n```\n"
    assert shell_blocks(text) == [(1, False, "edgeproxy --help\n"), (5, True, "systemctl start edgeproxy\n")]


def test_readme_shell_blocks_run_as_written(tmp_path: Path) -> None:
    assert (Path(sys.executable).parent / "edgeproxy").exists(), "the project is not installed in this venv"
    runnable = [(line, script) for line, deployment, script in shell_blocks(README) if not deployment]
    # The README shows a newcomer the CLI working locally; that example must stay.
    assert any("edgeproxy domains add" in script for _, script in runnable)
    for line, script in runnable:
        cwd = tmp_path / f"block-{line}"
        cwd.mkdir()
        result = run_block(script, cwd)
        assert result.returncode == 0, f"README.md line {line}:\n{script}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"


def test_the_runnable_example_registers_a_domain(tmp_path: Path) -> None:
    # Beyond "exit 0": what the example shows actually happens, in the working directory.
    (line, _, script), = [b for b in shell_blocks(README) if not b[1] and "domains add" in b[2]]
    result = run_block(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "registered cdn.shop.example.com (issuing)" in result.stdout
    assert re.search(r"^cdn\.shop\.example\.com\s+issuing", result.stdout, re.M), result.stdout
    assert (tmp_path / "state" / "edgeproxy.db").is_file()


def test_blocks_that_need_a_deployment_are_marked() -> None:
    unmarked = [(line, script) for line, deployment, script in shell_blocks(README)
                if not deployment and _NEEDS_DEPLOYMENT.search(script)]
    assert unmarked == [], "mark these ```sh deployment (or make them run locally)"
    # Every shell-looking block uses the convention (an unlabeled block of commands is neither run nor marked).
    for line, info, content in fences(README):
        if not info:
            assert not re.search(r"^(\$ |curl |make |TOKEN=)", content, re.M), f"README.md line {line}: label it ```sh"


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.add((*prefix, name))
                found |= _commands(child, (*prefix, name))
    return found


def test_cli_synopsis_lists_exactly_the_commands_that_exist() -> None:
    section = README.split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]
    (synopsis,) = [content for _, info, content in fences(section) if not info]
    listed: set[tuple[str, ...]] = set()
    for line in synopsis.splitlines():
        if not line.startswith("edgeproxy "):
            continue
        # Command words are lowercase; options, placeholders (HOSTNAME, N]) and "|" are not.
        # The first is the command (group); the others its actions, as alternatives:
        # "edgeproxy domains list [--json] | show HOSTNAME | remove HOSTNAME".
        words = [w for w in line.split("  ", 1)[0].split()[1:] if re.fullmatch(r"[a-z][a-z-]*", w)]
        if words:
            listed.add((words[0],))
            listed.update((words[0], action) for action in words[1:])
    commands = _commands(_parser())
    leaves = {c for c in commands if not any(o[: len(c)] == c and o != c for o in commands)}
    assert leaves - listed == set(), "commands missing from the README's CLI synopsis"
    assert listed - commands == set(), "the README's CLI synopsis names commands that do not exist"


def _example_hostnames(text: str) -> set[str]:
    names = set(re.findall(r'"hostname":\s*"([^"]+)"', text))
    names |= set(re.findall(r"edgeproxy domains (?:add|show|remove) ([a-z0-9.-]+\.[a-z]+)\b", text))
    names |= set(re.findall(r"customer DNS:\s+(\S+)\s+CNAME", text))
    return names


@pytest.mark.parametrize("path", ["README.md", "docs/runbook.md"])
def test_example_hostnames_are_accepted_by_the_defaults(path: str) -> None:
    names = _example_hostnames((ROOT / path).read_text())
    assert "cdn.shop.example.com" in names
    for name in names:
        assert admit_hostname(name, Settings()) == name
