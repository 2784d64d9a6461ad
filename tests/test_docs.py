"""The docs stay true to the code: docs/configuration.md is what tools/configdoc.py makes of the
configuration's field descriptions today, and every key has a description."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config.settings import Settings
from tools import configdoc

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_generated_from_the_current_descriptions() -> None:
    """docs/configuration.md equals a fresh rendering; if not, run tools/configdoc.py."""
    written = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert written == configdoc.render(), (
        "docs/configuration.md is stale: run .venv/bin/python tools/configdoc.py")


def test_every_configuration_key_has_a_description_and_a_row() -> None:
    """Each key of each section is described in the code and has its row in the reference."""
    text = configdoc.render()
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
