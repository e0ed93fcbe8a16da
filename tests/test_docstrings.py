"""Docstrings and comments cite documents in the repository only (the README, another module):
not the product brief, the style notes, the seeds or issue numbers, which a reader of the
repository does not have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = re.compile(r"PRODUCT\.md|STYLE\.md|\bseeds? \d{3}\b|\bissue \d+\b", re.IGNORECASE)


@pytest.mark.parametrize("path", sorted((ROOT / "relay").rglob("*.py")),
                         ids=lambda path: str(path.relative_to(ROOT)))
def test_cites_only_documents_in_the_repository(path: Path) -> None:
    found = [f"{number}: {line.strip()}" for number, line in
             enumerate(path.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert found == [], f"{path.relative_to(ROOT)} cites documents outside the repository"
