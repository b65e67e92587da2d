"""Wrappers over any recipe: Lookahead.

``lookahead`` runs any registered recipe, chosen by its ``base`` hyperparameter, inside
Lookahead (Zhang et al., arXiv 1907.08610)::

    create_optimizer("lookahead", model, base="lion", lr=1e-4, k=5, alpha=0.5)

The wrapper accepts the base recipe's hyperparameters (with the base's defaults) plus ``base``,
``k`` and ``alpha``; the weight decay is the base's. A matrix-only base (Muon, ...) needs the
model routing of its own spec: :func:`lookahead_spec` builds a spec around a fixed base
(``create_optimizer(lookahead_spec("muon"), model)``), which also serves a user's unregistered
spec. Bases that keep train/eval iterates (schedule-free) or take a curvature estimate (Sophia,
AdaHessian) cannot be wrapped, nor can ``cautious=True`` be used (it would mask the
synchronisation step).

Ranger21 is :mod:`llmvalley.optim.recipes.ranger`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmvalley.optim.recipes.adaptive import ADAM_DEFAULTS
from llmvalley.optim.spec import SHELL_DEFAULTS, Decay, OptimizerSpec
from llmvalley.optim.transforms.base import Transform
from llmvalley.optim.transforms.combine import chain_paths
from llmvalley.optim.transforms.wrappers import Lookahead

Group = Mapping[str, Any]
OWN = dict(k=5, alpha=0.5)


def _base(value: Any) -> OptimizerSpec:
    from llmvalley.optim.shell import lookup_spec  # the registry, at run time only

    if not isinstance(value, str):
        raise ValueError(f"lookahead: invalid base={value!r}: the name of a registered "
                         "optimizer (wrap a spec object with lookahead_spec(spec))")
    return lookup_spec(value)


def _check(name: str, base: OptimizerSpec, group: dict[str, Any]) -> None:
    """Lookahead's own checks, and that ``base`` can be wrapped."""
    if isinstance(base, LookaheadSpec) or base.name.startswith("lookahead"):
        raise ValueError(f"{name}: invalid base={base.name!r}: Lookahead of Lookahead")
    for path in chain_paths(base.chain(group)):
        for t in path:
            if t.has_modes or t.curvature is not None:
                raise ValueError(
                    f"{name}: invalid base={base.name!r}: Lookahead cannot wrap a method "
                    "with train/eval iterates or a curvature estimate")
    k, alpha = group["k"], group["alpha"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name}: invalid k={k!r}: an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"{name}: invalid alpha={alpha!r}: must be in (0, 1]")
    if group.get("cautious"):
        raise ValueError(f"{name}: invalid cautious=True: the mask would cut the "
                         "synchronisation step; wrap a cautious recipe instead")


class LookaheadSpec(OptimizerSpec):
    """Lookahead around the registered recipe named by the group's ``base``.

    The base's hyperparameters, chain, decay and checks are looked up from ``group["base"]``;
    the structural keys of every base seen so far join the chain's cache key.
    """

    @property  # type: ignore[override]
    def structural(self) -> tuple[str, ...]:
        return getattr(self, "_structural", ("base",))

    @structural.setter
    def structural(self, value: tuple[str, ...]) -> None:
        self._structural = tuple(dict.fromkeys(("base", *getattr(self, "_structural", ()),
                                                *value)))

    def base_spec(self, group: Mapping[str, Any]) -> OptimizerSpec:
        base = _base(group.get("base", self.defaults["base"]))
        self.structural = base.structural  # cache key: the base's structure too
        return base

    def resolve(self, hparams: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
        base = self.base_spec(hparams)
        allowed = {**SHELL_DEFAULTS, **base.defaults, **OWN, "base": self.defaults["base"]}
        if strict:
            unknown = sorted(set(hparams) - set(allowed))
            if unknown:
                raise ValueError(f"{self.name}: unknown hyperparameter(s) {', '.join(unknown)} "
                                 f"for base {base.name!r}; accepted: {', '.join(sorted(allowed))}")
        out = {**allowed, **hparams}
        self.validate(out)
        return out

    def validate(self, group: dict[str, Any]) -> None:
        base = self.base_spec(group)
        if base.applies_to != "any":
            raise ValueError(f"{self.name}: invalid base={base.name!r}: a matrix-only method; "
                             f"use create_optimizer(lookahead_spec({base.name!r}), model) to "
                             "route the other parameters to its fallback")
        _check(self.name, base, group)
        base.validate(group)

    def decay_for(self, group: Mapping[str, Any]) -> Decay:
        return self.base_spec(group).decay_for(group)

    def state_numel(self, shape, **hparams: Any) -> int:
        base = self.base_spec(hparams)
        return super().state_numel(shape, **{**base.defaults, **OWN, **hparams})


def _dynamic_build(group: Mapping[str, Any]) -> list[Transform]:
    base = _base(group["base"])
    return [Lookahead(base.chain(group), base.decay_for)]


def lookahead_spec(base: str | OptimizerSpec, name: str | None = None) -> OptimizerSpec:
    """A Lookahead spec around a fixed ``base`` (a registry name or any spec, a user's own
    included): the base's defaults plus ``k`` and ``alpha``, its decay, checks, structural
    keys and routing (``applies_to``, rules, fallback)."""
    spec = _base(base) if isinstance(base, str) else base
    label = name or f"lookahead_{spec.name}"

    def check(group: dict[str, Any]) -> None:
        _check(label, spec, group)
        if spec.check is not None:
            spec.check(group)

    return OptimizerSpec(
        name=label, defaults={**spec.defaults, **OWN},
        build=lambda g: [Lookahead(spec.chain(g), spec.decay_for)],
        decay=spec.decay_for, applies_to=spec.applies_to, structural=spec.structural,
        decay_keys=spec.decay_keys, check=check, rules=spec.rules,
        fallback_hparams=spec.fallback_hparams,
    )


SPECS = [LookaheadSpec(
    name="lookahead",
    defaults={**ADAM_DEFAULTS, "weight_decay": 1e-2, **OWN, "base": "adamw"},
    build=_dynamic_build,
    decay=lambda g: _base(g["base"]).decay_for(g),
)]
