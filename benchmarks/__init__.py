"""Benchmarks (``python -m benchmarks``): speed goals and ratios against anchors measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path | None, result: Any) -> None:
    """Write a benchmark's ``result`` as indented JSON to ``path`` (its folder created); nothing when ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
