"""The README's configuration table and deploy/env.example cover every setting of the services."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from services.settings_doc import BEGIN, END, markdown_table, rows, update_readme

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_table_is_the_generated_one():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert section == markdown_table(), "run: python -m services.settings_doc"


def test_every_setting_has_a_meaning_and_is_in_env_example():
    example = (REPO_ROOT / "deploy" / "env.example").read_text()
    listed = set(re.findall(r"^#? ?(GENQ_[A-Z0-9_]+)=", example, re.MULTILINE))
    for variable, owner, _, meaning in rows():
        assert meaning, f"{variable} has no description"
        assert owner in ("both", "API", "workers")
        assert variable in listed, f"deploy/env.example does not list {variable}"


def test_update_rewrites_only_the_marked_section(tmp_path: Path):
    readme = tmp_path / "README.md"
    shutil.copy(REPO_ROOT / "README.md", readme)
    text = readme.read_text()
    readme.write_text(text.replace(BEGIN, f"{BEGIN}\nstale row"))

    assert update_readme(readme) is True
    assert readme.read_text() == text
    assert update_readme(readme) is False
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="settings:begin"):
        update_readme(readme)
