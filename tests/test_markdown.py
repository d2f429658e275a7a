"""README.md, docs/*.md and the other Markdown files render as written.

A stray line outside a code fence once turned the README's next fence into an
opener, and from there every "code" block was prose and every section below was
code; a paragraph written straight under a table swallowed the table's last rows.
Neither shows up anywhere but in the rendered page, so this parses each file
with markdown-it-py (CommonMark, plus GFM tables as GitHub renders them) and
fails on:

- a fenced code block that never closes (it runs to the end of the file);
- a fence-like line or a "## heading" inside a code block: the symptoms of a
  flipped fence (a closing ``` taken as an opener, so the next opener's line and
  the next section become content); a block that must show a fence uses a
  longer or a ~~~ fence;
- a paragraph line that looks like a table row (``| a | b |``): a row cut off
  from its table by prose, or a table with no blank line before it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
# Every Markdown file of the project's own (not .venv's, not tests' fixtures).
DOCUMENTS = [*sorted(ROOT.glob("*.md")), *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench").glob("*.md"))]

_FENCE_LINE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_HEADING = re.compile(r"^#{2,6} \w")  # "## Monitoring"; shell and TOML comments use one "#"


def markdown_problems(text: str) -> list[str]:
    """Every rendering problem in ``text`` as "line N: what" (1-based line numbers)."""
    md = MarkdownIt("commonmark").enable("table")
    lines = text.splitlines()
    problems: list[str] = []
    for token in md.parse(text):
        if token.map is None:
            continue
        first, end = token.map
        if token.type == "fence":
            opener = token.markup
            closing = lines[end - 1].strip() if end - 1 > first else ""
            closed = closing.startswith(opener[0] * len(opener)) and set(closing) == {opener[0]}
            if not closed:
                problems.append(f"line {first + 1}: code fence {opener}{token.info} is never closed")
            for offset, line in enumerate(token.content.splitlines(), start=first + 2):
                match = _FENCE_LINE.match(line)
                # Same character and at least as long: only an opener with an info string
                # (```sh) can sit inside without closing the block, and that is a flip.
                if match and match.group(1)[0] == opener[0] and len(match.group(1)) >= len(opener):
                    problems.append(f"line {offset}: a fence line inside the code block opened on line "
                                    f"{first + 1} (a stray line before it flips every later fence)")
                    break
                if _HEADING.match(line):
                    problems.append(f"line {offset}: a Markdown heading inside the code block opened on "
                                    f"line {first + 1} (a stray fence line before it?)")
                    break
        elif token.type == "paragraph_open":
            for offset, line in enumerate(lines[first:end], start=first + 1):
                if _TABLE_ROW.match(line):
                    problems.append(f"line {offset}: table row rendered as text (prose between it and its "
                                    "table, or no blank line before the table)")
                    break
    return problems


# -- the checker itself, on documents with known faults ------------------------------------------


def test_checker_accepts_well_formed_markdown() -> None:
    text = (
        "# Title\n\nProse.\n\n```sh\nedgeproxy --help\n```\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n"
        "After the table.\n\n````md\nA block that shows a fence:\n```sh\nls\n```\n````\n\n~~~\n```\n~~~\n"
    )
    assert markdown_problems(text) == []


def test_checker_finds_a_stray_line_that_flips_the_fences() -> None:
    # The README's old fault: CLI lines and a closing ``` after prose, then more blocks.
    text = (
        "Intro.\n\n```\nedgeproxy serve\n```\n\nProse.\nedgeproxy check\n```\n\n## Monitoring\n\n"
        "```sh\nedgeproxy check\n```\n\nMore prose.\n"
    )
    problems = markdown_problems(text)
    assert any("inside the code block opened on line 9" in p for p in problems), problems


def test_checker_finds_an_unclosed_fence() -> None:
    problems = markdown_problems("Intro.\n\n```toml\n[acme]\n")
    assert problems == ["line 3: code fence ```toml is never closed"]


def test_checker_finds_table_rows_cut_off_by_prose() -> None:
    text = (
        "| method | answer |\n| --- | --- |\n| `GET /a` | a |\n\nA paragraph.\n| `GET /b` | b |\n"
        "| `GET /c` | c |\n"
    )
    assert markdown_problems(text) == [
        "line 6: table row rendered as text (prose between it and its table, or no blank line before the table)"
    ]


# -- the project's documents ------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_document_renders_as_written(path: Path) -> None:
    assert markdown_problems(path.read_text()) == []


def test_every_document_is_checked() -> None:
    names = {str(p.relative_to(ROOT)) for p in DOCUMENTS}
    assert {"README.md", "CHANGELOG.md", "bench/README.md", "docs/runbook.md", "docs/configuration.md",
            "docs/admin-api.md"} <= names
