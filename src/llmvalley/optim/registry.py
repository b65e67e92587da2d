"""The optimizer registry: one :class:`OptimizerSpec` per published method.

A spec is the method's metadata (paper, family, official reference, defaults, which
parameters it applies to) plus a function that builds its transform chain from a parameter
group. Memory formulas come from the transforms themselves, so they cannot drift from the
state the chain actually creates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmvalley.optim.transforms.base import Shape, StepContext, Transform, numel

#: options every optimizer accepts, handled by the shell rather than by a recipe
SHELL_DEFAULTS: dict[str, Any] = {
    "maximize": False,
    "nonfinite": "raise",
    "state_dtype": None,
}

NONFINITE_POLICIES = ("raise", "skip", "ignore")


@dataclass(frozen=True)
class Paper:
    """The publication that defines a method."""

    title: str
    arxiv: str
    year: int

    def __str__(self) -> str:
        return f"{self.title} (arXiv {self.arxiv})"


@dataclass
class OptimizerSpec:
    """Everything llmvalley knows about one optimizer.

    Attributes:
        name: registry name (API).
        family: taxonomy bucket (``classical``, ``adaptive``, ``sign``, ``factored`` ...).
        paper: the defining publication.
        reference: the official implementation (repository and/or package) it matches.
        defaults: hyperparameter defaults (the reference's).
        build: returns the transform chain for a parameter group.
        applies_to: ``"any"`` or ``"matrix"`` (hidden 2-D weights only).
        weight_decay: how ``weight_decay`` is applied, in words.
        structural: group keys whose value changes the chain (cache key).
        decay_keys: hyperparameters zeroed for parameters that take no weight decay.
        fused: optional fast path ``(ctx) -> bool`` returning True when it did the step.
        check: optional extra validation of a group (raise ``ValueError``).
        notes: deviations from the reference, documented.
        rules: default routing rules (as ``create_optimizer``'s ``rules``), applied after the
            user's when ``create_optimizer`` is given a model (e.g. SCALE's output layer).
        fallback_hparams: hyperparameters of the ``adamw`` fallback when the user gives none
            (the reference's auxiliary AdamW, e.g. Muon's lr 3e-4, betas (0.9, 0.95)).
    """

    name: str
    family: str
    paper: Paper
    reference: str
    defaults: dict[str, Any]
    build: Callable[[dict[str, Any]], list[Transform]]
    applies_to: str = "any"
    weight_decay: str = "decoupled (p *= 1 - lr*wd), before the update"
    structural: tuple[str, ...] = ()
    decay_keys: tuple[str, ...] = ("weight_decay",)
    fused: Callable[[StepContext], bool] | None = None
    check: Callable[[dict[str, Any]], None] | None = None
    notes: str = ""
    rules: tuple = ()
    fallback_hparams: dict[str, Any] | None = None
    _chains: dict[tuple, list[Transform]] = field(default_factory=dict, repr=False)

    def chain(self, group: dict[str, Any]) -> list[Transform]:
        """The (cached) transform chain for a group."""
        key = tuple(group.get(k) for k in self.structural)
        if key not in self._chains:
            self._chains[key] = self.build(group)
        return self._chains[key]

    def resolve(self, hparams: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
        """Defaults overlaid with ``hparams``, validated. Unknown keys raise when ``strict``."""
        allowed = {**SHELL_DEFAULTS, **self.defaults}
        if strict:
            unknown = sorted(set(hparams) - set(allowed))
            if unknown:
                raise ValueError(
                    f"{self.name}: unknown hyperparameter(s) {', '.join(unknown)}; "
                    f"accepted: {', '.join(sorted(allowed))}"
                )
        out = {**allowed, **hparams}
        self.validate(out)
        return out

    def validate(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first invalid hyperparameter of ``group``."""
        validate_common(self.name, group)
        if self.check is not None:
            self.check(group)

    def state_numel(self, shape: Shape, **hparams: Any) -> int:
        """State elements kept for a parameter of ``shape`` (with these hyperparameters)."""
        shape = tuple(int(s) for s in shape)
        if numel(shape) == 0:
            return 0
        group = {**SHELL_DEFAULTS, **self.defaults, **hparams}
        return sum(t.state_numel(shape, group) for t in self.chain(group))

    @property
    def hyperparameter_count(self) -> int:
        return len(self.defaults)


def _bad(name: str, key: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{name}: invalid {key}={value!r}: {rule}")


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def validate_common(name: str, group: dict[str, Any]) -> None:
    """Checks shared by every optimizer, keyed by the conventional hyperparameter names."""
    nonneg = ("lr", "weight_decay", "momentum", "dampening", "momentum_decay", "gamma",
              "alpha", "lr_1d", "weight_decay_1d", "clip_threshold", "d")
    for key in nonneg:
        if key in group:
            v = _number(group[key])
            if v is None or math.isnan(v) or v < 0:
                raise _bad(name, key, group[key], "must be a number >= 0")
    if "eps" in group:
        eps = group["eps"]
        items = eps if isinstance(eps, (tuple, list)) else (eps,)
        for e in items:
            if e is None:
                continue
            v = _number(e)
            if v is None or math.isnan(v) or v < 0:
                raise _bad(name, "eps", eps, "must be >= 0 (a number, or a tuple of them)")
    for key in ("betas", "betas_1d"):
        if key in group:
            betas = group[key]
            if not isinstance(betas, (tuple, list)):
                raise _bad(name, key, betas, "must be a tuple of floats in [0, 1)")
            for b in betas:
                v = _number(b)
                if v is None or not 0.0 <= v < 1.0:
                    raise _bad(name, key, betas, "each beta must lie in [0, 1)")
    if group.get("nonfinite", "raise") not in NONFINITE_POLICIES:
        raise _bad(name, "nonfinite", group["nonfinite"], f"must be one of {NONFINITE_POLICIES}")
    for key in ("warmup", "alpha_warmup", "beta3_warmup"):
        if group.get(key) is not None:
            v = _number(group[key])
            if v is None or v < 1 or v != int(v):
                raise _bad(name, key, group[key], "must be None or an integer >= 1")


_REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add a spec to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str | OptimizerSpec) -> OptimizerSpec:
    """The spec registered under ``name``; a clear error listing the names otherwise."""
    if isinstance(name, OptimizerSpec):
        return name
    _load_recipes()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_optimizers(family: str | None = None) -> list[OptimizerSpec]:
    """All registered specs (optionally one family), sorted by family then name."""
    _load_recipes()
    specs = [s for s in _REGISTRY.values() if family is None or s.family == family]
    return sorted(specs, key=lambda s: (s.family, s.name))


def _load_recipes() -> None:
    import llmvalley.optim.recipes  # noqa: F401  (registers on import)
