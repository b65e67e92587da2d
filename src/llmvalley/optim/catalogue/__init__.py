"""The catalogue: what llmvalley knows *about* each optimizer, apart from how it runs.

One :class:`Entry` per registered name: taxonomy family, defining paper, the official
implementation it matches (and what it is tested against), how its weight decay is applied, in
words, and notes on every place it differs from its reference. Behaviour (defaults, transform
chain, checks) lives in :mod:`llmvalley.optim.recipes`; the registry joins the two.

Entries live in one module per family of methods, each listing ``ENTRIES``; this module
merges them into :data:`CATALOGUE` (a name may appear in only one module).
"""

from __future__ import annotations

from llmvalley.optim.catalogue import (
    adaptive_variants,
    established,
    fisher,
    hessian,
    kronecker,
    lowrank,
    ranger,
    schedule_free,
    stability,
    subspace,
    wrappers,
)
from llmvalley.optim.catalogue.entry import Entry, Paper

_MODULES = [established, adaptive_variants, stability, schedule_free, wrappers, lowrank,
            subspace, kronecker, hessian, ranger, fisher]


def _merge() -> dict[str, Entry]:
    merged: dict[str, Entry] = {}
    for module in _MODULES:
        for name, entry in module.ENTRIES.items():
            if name in merged:
                raise ValueError(f"catalogue entry {name!r} is defined twice")
            merged[name] = entry
    return merged


CATALOGUE: dict[str, Entry] = _merge()

__all__ = ["CATALOGUE", "Entry", "Paper"]
