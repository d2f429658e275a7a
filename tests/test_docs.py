"""The generated references match the code, and the operator documents are where the README says."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import get_type_hints

import pytest

from edgeproxy.config import Settings, load_settings
from edgeproxy.devtools.refdocs import EXTRA_DOCS, field_docs, generated_files, main, openapi_document

ROOT = Path(__file__).resolve().parent.parent


def test_committed_references_match_the_generator() -> None:
    for path, text in generated_files(ROOT).items():
        assert path.exists(), f"{path} is missing: run `make docs`"
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `make docs` and commit it"


def test_check_mode_reports_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "configuration.md").write_text("# old\n")
    assert main(["--root", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "configuration.md" in err and "admin-api.md" in err
    assert (tmp_path / "docs" / "configuration.md").read_text() == "# old\n"  # --check writes nothing
    assert main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "docs" / "configuration.md").read_text() == (ROOT / "docs" / "configuration.md").read_text()
    assert main(["--root", str(tmp_path), "--check"]) == 0


def test_every_setting_is_described() -> None:
    docs = field_docs()
    fields = {f"{section}.{f.name}" for section, cls in get_type_hints(Settings).items()
              for f in dataclasses.fields(cls)}
    undocumented = sorted(name for name in fields if not docs[name.split(".")[0]][name.split(".")[1]])
    assert undocumented == [], "add a comment next to the field in config.py (or an EXTRA_DOCS entry)"
    assert set(EXTRA_DOCS) <= fields, "EXTRA_DOCS names a setting that no longer exists"


def test_the_defaults_file_in_the_reference_loads_as_the_defaults(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    (tmp_path / "defaults.toml").write_text(block)
    assert load_settings(tmp_path / "defaults.toml", env={}) == Settings()


def test_admin_reference_covers_every_route() -> None:
    text = (ROOT / "docs" / "admin-api.md").read_text()
    for path, item in openapi_document()["paths"].items():
        for method in item:
            assert f"## {method.upper()} `{path}`" in text


def test_readme_links_the_operator_documents() -> None:
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/configuration.md", "docs/admin-api.md", "docs/runbook.md", "CHANGELOG.md"):
        assert f"]({doc})" in readme, f"README does not link {doc}"
        assert (ROOT / doc).is_file()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^make \w+", quick_start, re.M)
    assert commands == ["make demo", "make test"]
