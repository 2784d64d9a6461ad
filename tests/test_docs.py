"""The docs stay true to the code: docs/configuration.md is what tools/configdoc.py makes of the
configuration's field descriptions today, every key has a description, the README stays short,
every link and every agent/ path the docs name exists, the renames they list happened, and every
metric and event name they cite is spelled out in agent/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config.settings import Settings
from tools import configdoc

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT_BYTES = 10_240


def agent_source() -> str:
    return "\n".join(path.read_text() for path in sorted((ROOT / "agent").rglob("*.py")))


def without_renames(text: str) -> str:
    """A doc's text less architecture.md's "Renames" section, whose old paths are gone."""
    return re.sub(r"\n## Renames\n.*?(?=\n## |\Z)", "\n", text, flags=re.DOTALL)


def test_configuration_reference_is_generated_from_the_current_descriptions() -> None:
    """docs/configuration.md equals a fresh rendering; if not, run tools/configdoc.py."""
    written = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert written == configdoc.render(), (
        "docs/configuration.md is stale: run .venv/bin/python tools/configdoc.py")


def test_every_configuration_key_has_a_description_and_a_row() -> None:
    """Each key of each section is described in the code and has its row in the reference."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for section, field in Settings.model_fields.items():
        assert field.description, f"section {section} has no description"
        heading = f"## `[[{section}]]`" if section == "routes" else f"## `[{section}]`"
        table = text[text.index(heading):]
        table = table[: table.find("\n## ") if "\n## " in table else None]
        for key, info in configdoc._section_model(field).model_fields.items():
            assert info.description, f"{section}.{key} has no description"
            assert f"\n| `{key}` |" in table, f"{section}.{key} has no row"


def test_check_fails_naming_the_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`configdoc.py --check` exits 1 and names the file when it differs; writing fixes it."""
    target = tmp_path / "docs" / "configuration.md"
    target.parent.mkdir()
    target.write_text(configdoc.render().replace("Broker TCP port.", "Broker port."))
    monkeypatch.setattr(configdoc, "ROOT", tmp_path)
    monkeypatch.setattr(configdoc, "TARGET", target)
    assert configdoc.main(["--check"]) == 1
    assert "docs/configuration.md is stale" in capsys.readouterr().err
    assert configdoc.main([]) == 0
    assert configdoc.main(["--check"]) == 0
    assert target.read_text() == configdoc.render()


def test_readme_stays_under_ten_kilobytes() -> None:
    """The README is the front page; reference material belongs in docs/."""
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT_BYTES, f"README.md is {size} bytes; move reference to docs/"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_points_at_an_existing_file_and_heading(doc: Path) -> None:
    """`[text](target)` with a relative target names a file that exists, and `#anchor` a
    heading in it."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        name, _, anchor = target.partition("#")
        path = (doc.parent / name).resolve() if name else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert broken == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_agent_path_the_docs_name_exists(doc: Path) -> None:
    """`agent/....py` in a doc is a file of today's tree (the renames table aside)."""
    text = without_renames(doc.read_text(encoding="utf-8"))
    named = set(re.findall(r"\bagent/[\w/]+\.py\b", text))
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []


def test_the_renames_listed_happened() -> None:
    """Each row of architecture.md's module renames: the old path is gone, the new one is there."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Renames\n"):]
    rows = re.findall(r"^\| `((?:agent|tools)/[\w/]+\.py)`[^|]*\| (.+) \|$", section,
                      flags=re.MULTILINE)
    assert len(rows) > 40, rows
    for old, new in rows:
        assert not (ROOT / old).exists(), f"{old} still exists"
        for path in re.findall(r"`((?:agent|tests)/[\w/]+\.py)`", new):
            assert (ROOT / path).is_file(), f"{old} -> {path}: no such file"


def test_every_metric_the_docs_cite_is_spelled_out_in_the_agent() -> None:
    """A series name in the docs is found by grep in agent/ (metrics.py names them literally)."""
    source = agent_source()
    cited = {name for doc in DOCS
             for name in re.findall(r"\bedge_agent_[a-z_]+[a-z]", doc.read_text(encoding="utf-8"))}
    assert len(cited) > 15, sorted(cited)
    assert sorted(name for name in cited if f'"{name}"' not in source) == []


def test_every_event_in_the_operations_table_is_logged_by_the_agent() -> None:
    """The event names docs/operations.md lists are literals in agent/, as the logs show them."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Logs and events\n"):]
    events: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `") or line.startswith("Debug level adds"):
            events.update(re.findall(r"`([a-z][a-z0-9_]+)`", line.split(" | ")[0]))
    assert len(events) > 60, sorted(events)
    source = agent_source()
    assert sorted(event for event in events if f'"{event}"' not in source) == []
