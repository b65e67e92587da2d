"""The registry: every published optimizer by name.

It joins behaviour (each recipe module's ``SPECS``, :mod:`llmvalley.optim.recipes`) with the
catalogue (:mod:`llmvalley.optim.catalogue`). Recipes never import the registry, so the two
have no import cycle; :func:`register` adds a user's spec.
"""

from __future__ import annotations

from dataclasses import replace

from llmvalley.optim.catalogue import CATALOGUE, Paper
from llmvalley.optim.spec import SHELL_DEFAULTS, Decay, OptimizerSpec

_REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add a spec to the registry (names are unique); its catalogue entry is attached when
    the catalogue has one and the spec has none."""
    _load_recipes()
    return _add(spec)


def _add(spec: OptimizerSpec) -> OptimizerSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    if spec.about is None and spec.name in CATALOGUE:
        spec = replace(spec, about=CATALOGUE[spec.name], _chains={}, _full_chains={})
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str | OptimizerSpec) -> OptimizerSpec:
    """The spec registered under ``name``; a clear error listing the names otherwise."""
    if isinstance(name, OptimizerSpec):
        return name
    _load_recipes()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown optimizer {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_optimizers(family: str | None = None) -> list[OptimizerSpec]:
    """All registered specs (optionally one family), sorted by family then name."""
    _load_recipes()
    specs = [s for s in _REGISTRY.values() if family is None or s.family == family]
    return sorted(specs, key=lambda s: (s.family, s.name))


_LOADED = False


def _load_recipes() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from llmvalley.optim.recipes import ALL_SPECS

    for spec in ALL_SPECS:
        _add(spec)


__all__ = ["SHELL_DEFAULTS", "Decay", "OptimizerSpec", "Paper", "get_spec", "list_optimizers",
           "register"]
