"""The README's optimizer table and the catalogue cover every registered optimizer."""

from __future__ import annotations

import re
from pathlib import Path

import llmvalley

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_lists_every_registered_optimizer():
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| family | names |"):]
    table = table[:table.index("\n\n")]
    listed = set(re.findall(r"`([a-z0-9_]+)`", table))
    registered = {s.name for s in llmvalley.list_optimizers()}
    assert registered - listed == set(), "registered but not in the README's table"
    assert listed - registered <= set(), "in the README's table but not registered"


def test_every_registered_optimizer_has_a_catalogue_entry():
    for spec in llmvalley.list_optimizers():
        assert spec.about is not None, spec.name
        assert spec.about.paper.arxiv and spec.about.reference, spec.name
