"""Helpers for the conformance tests: copies of stored cases that the tests may damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bridges.conformance.cases import CASES_DIR


def copy_case(name: str, directory: Path) -> Path:
    """Copy ``<name>.json`` and ``<name>.npz`` into ``directory``; return the JSON path."""
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".npz"):
        shutil.copy(CASES_DIR / f"{name}{suffix}", directory / f"{name}{suffix}")
    return directory / f"{name}.json"


def edit_json(path: Path, edit) -> None:
    """Apply ``edit(doc)`` to the JSON document at ``path``."""
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.fixture
def case_dir(tmp_path: Path) -> Path:
    return tmp_path / "cases"
