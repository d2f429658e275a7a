"""The command line as a newcomer meets it, with no ACME server and no running edge.

Help everywhere (a bare ``edgeproxy`` included), ``--config`` before or after the
subcommand, and no side effects from a refused or read-only command: no storage
directory, no empty database.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.cli import _parser


def clean_env() -> dict[str, str]:
    """The caller's environment without EDGEPROXY_* (a developer's own settings must not leak in)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}


def edgeproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeproxy", *args], capture_output=True, text=True,
                          timeout=60, env=env if env is not None else clean_env())


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config whose store lives in ``tmp_path/state`` (not created here) and that admits ``.test`` names."""
    path = tmp_path / "edgeproxy.toml"
    path.write_text(
        f'[storage]\nurl = "sqlite://{tmp_path / "state" / "edgeproxy.db"}"\n'
        '[domains]\nextra_suffixes = ["test"]\n'
        f'[admin]\ntoken_file = "{tmp_path / "admin-token"}"\ntokens_file = "{tmp_path / "tokens.json"}"\n'
    )
    return path


def test_bare_command_prints_the_help_not_an_argparse_error() -> None:
    result = edgeproxy()
    assert result.returncode == 2
    assert result.stdout.startswith("usage: edgeproxy")
    for command in ("serve", "domains", "doctor", "demo"):
        assert f"\n    {command} " in result.stdout, command
    assert "error:" not in result.stderr
    # The same for a command group without its action.
    group = edgeproxy("domains")
    assert group.returncode == 2
    assert group.stdout.startswith("usage: edgeproxy domains")
    assert "add" in group.stdout and "error:" not in group.stderr


def test_every_argument_has_help_text() -> None:
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, [*path, name])
            elif not action.help:
                missing.append(" ".join([*path, action.option_strings[0] if action.option_strings else action.dest]))

    walk(_parser(), ["edgeproxy"])
    assert missing == []
    add_help = edgeproxy("domains", "add", "--help").stdout
    assert "the customer's hostname" in add_help
    assert "full record as JSON" in edgeproxy("domains", "list", "--help").stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_accepted_before_and_after_the_subcommand(config: Path, where: str) -> None:
    def run(*command: str) -> subprocess.CompletedProcess[str]:
        option = ("--config", str(config))
        return edgeproxy(*option, *command) if where == "before" else edgeproxy(*command, *option)

    # `.test` is admitted only by this config's extra_suffixes: success proves it was read.
    added = run("domains", "add", "shop.example.test")
    assert added.returncode == 0, added.stderr
    assert "registered shop.example.test" in added.stdout
    listed = run("domains", "list", "--json")
    assert [d["hostname"] for d in json.loads(listed.stdout)["domains"]] == ["shop.example.test"]
    doctor = run("doctor", "--offline")
    assert "unrecognized arguments" not in doctor.stderr
    assert doctor.returncode in (0, 1), doctor.stderr  # findings depend on the machine; parsing must not fail

    # serve reads the named file (a missing one is the error, not the option's position).
    missing = edgeproxy("serve", "--config", str(config.parent / "absent.toml")) if where == "after" else \
        edgeproxy("--config", str(config.parent / "absent.toml"), "serve")
    assert missing.returncode == 1
    assert "config file not found" in missing.stderr and "absent.toml" in missing.stderr


def test_config_after_the_subcommand_wins_and_absent_keeps_the_first() -> None:
    assert _parser().parse_args(["--config", "a", "serve"]).config == "a"
    assert _parser().parse_args(["serve", "--config", "b"]).config == "b"
    assert _parser().parse_args(["--config", "a", "serve", "-c", "b"]).config == "b"
    assert _parser().parse_args(["serve"]).config is None
    assert _parser().parse_args(["domains", "list", "-v"]).verbose is True


def test_refused_and_read_only_commands_create_nothing(config: Path) -> None:
    state = config.parent / "state"
    refused = edgeproxy("--config", str(config), "domains", "add", "bad..name.test")
    assert refused.returncode == 1
    assert "empty_label" in refused.stderr
    assert not state.exists(), "a refused name created the storage directory"

    outside = edgeproxy("--config", str(config), "domains", "add", "cdn.shop.example")  # not on the PSL
    assert outside.returncode == 1 and "unknown_tld" in outside.stderr
    assert not state.exists()

    listed = edgeproxy("--config", str(config), "domains", "list")
    assert listed.returncode == 0 and "no domains registered" in listed.stdout
    as_json = edgeproxy("--config", str(config), "domains", "list", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == {"domains": []}
    for action in ("show", "remove"):
        absent = edgeproxy("--config", str(config), "domains", action, "shop.example.test")
        assert absent.returncode == 1
        assert "is not registered" in absent.stderr
    assert not state.exists(), "a read-only command created the storage directory"

    # The one command here that should write, does.
    assert edgeproxy("--config", str(config), "domains", "add", "shop.example.test").returncode == 0
    assert (state / "edgeproxy.db").is_file()


def test_refusals_without_a_config_file_create_nothing(tmp_path: Path) -> None:
    # Only the storage URL is overridden (by environment, as on a real host), so the
    # defaults decide everything else: e.g. `.test` is refused.
    env = {**clean_env(), "EDGEPROXY_STORAGE_URL": f"sqlite://{tmp_path / 'var' / 'edgeproxy.db'}"}
    for args in (("domains", "add", "bad..name"), ("domains", "add", "shop.test"), ("domains", "list")):
        result = edgeproxy(*args, env=env)
        assert result.returncode == (0 if args[1] == "list" else 1), result.stderr
    assert not (tmp_path / "var").exists()


def test_a_url_is_answered_with_a_name_that_would_be_accepted(config: Path) -> None:
    # With the defaults '.example' is no TLD: no "send 'cdn.x.example' instead".
    refused = edgeproxy("domains", "add", "https://cdn.x.example/",
                        env={**clean_env(), "EDGEPROXY_STORAGE_URL": f"sqlite://{config.parent / 'db' / 'x.db'}"})
    assert refused.returncode == 1 and "[url]" in refused.stderr
    assert "'cdn.x.example'" not in refused.stderr
    # Under a config that admits the name, the suggestion is made and works as sent.
    suggested = edgeproxy("--config", str(config), "domains", "add", "https://cdn.x.example.test/")
    assert "send 'cdn.x.example.test' instead" in suggested.stderr
    assert edgeproxy("--config", str(config), "domains", "add", "cdn.x.example.test").returncode == 0
