"""Ranger21 (Wright & Demeure, arXiv 2106.13731): AdamW with the components its paper adds.

Per step, in the official code's order (lessw2020/Ranger21)::

    g = AGC(g)  ->  centralize  ->  standardize            (the gradient)
    Adam with positive-negative momentum, softplus denominator
    p *= 1 - wd * lr_t / sqrt(mean v_hat over all groups)  (stable weight decay)
    p *= 1 - lr_t * 2 * norm_loss * (1 - 1 / unit_norm(p))  (norm loss)
    p -= lr_t * direction;  Lookahead every k steps

``lr_t`` is the group's ``lr`` under Ranger21's built-in linear warm-up and warm-down, which
needs the run's length: ``total_steps`` (the code's ``num_epochs * num_batches_per_epoch``)
has no default and must be given. Use a constant ``lr`` (no outer scheduler): the schedule is
part of the method.
"""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import (
    require_betas,
    require_count,
    require_flag,
    require_number,
)
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms.base import Transform
from llmvalley.optim.transforms.ranger import (
    CentralizeGradient,
    LinearWarmupWarmdown,
    NormLoss,
    ScaleByPNMAdam,
    StableWeightDecay,
    StandardizeGradient,
    UnitwiseGradClip,
)
from llmvalley.optim.transforms.wrappers import Lookahead

NAME = "ranger21"
DECAY = Decay("decoupled")

#: the official code's defaults (its lr has none: 1e-3, as its README's examples and
#: pytorch-optimizer); total_steps is required
RANGER21_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4,
    total_steps=None, warmup_steps=None, warmdown_start_pct=0.72, warmdown_min_lr=3e-5,
    agc_clip=1e-2, agc_eps=1e-3, centralize=True, normalize=True,
    pnm_momentum=1.0, softplus_beta=50.0, norm_loss=1e-4, k=5, alpha=0.5,
)


def _check(group: dict[str, Any]) -> None:
    require_betas(NAME, 2)(group)
    if group["total_steps"] is None:
        raise ValueError(f"{NAME}: invalid total_steps=None: Ranger21's warm-up and warm-down "
                         "need the run's length in optimizer steps (an integer >= 1)")
    require_count(NAME, group, "total_steps", 1)
    if group["warmup_steps"] is not None:
        require_count(NAME, group, "warmup_steps")
    require_number(NAME, group, "warmdown_start_pct", "a number in [0, 1]",
                   lambda v: 0 <= v <= 1)
    require_number(NAME, group, "warmdown_min_lr", "a number >= 0", lambda v: v >= 0)
    if group["agc_clip"] is not None:
        require_number(NAME, group, "agc_clip", "a number > 0 (None turns AGC off)",
                       lambda v: v > 0)
    require_number(NAME, group, "agc_eps", "a number >= 0", lambda v: v >= 0)
    require_flag(NAME, group, "centralize")
    require_flag(NAME, group, "normalize")
    require_number(NAME, group, "pnm_momentum", "a number >= 0", lambda v: v >= 0)
    if group["softplus_beta"] is not None:
        require_number(NAME, group, "softplus_beta", "a number > 0 (None: plain eps)",
                       lambda v: v > 0)
    require_number(NAME, group, "norm_loss", "a number >= 0 (0 turns it off)",
                   lambda v: v >= 0)
    require_count(NAME, group, "k", 1)
    require_number(NAME, group, "alpha", "a number in (0, 1]", lambda v: 0 < v <= 1)
    if group.get("cautious"):
        raise ValueError(f"{NAME}: invalid cautious=True: the mask would cut Lookahead's "
                         "synchronisation step")


def _build(group: dict[str, Any]) -> list[Transform]:
    return [
        LinearWarmupWarmdown(),
        UnitwiseGradClip(),
        *([CentralizeGradient()] if group["centralize"] else []),
        *([StandardizeGradient()] if group["normalize"] else []),
        ScaleByPNMAdam(noise="beta2"),  # the official code's noise norm
        StableWeightDecay(),
        NormLoss(),
        Lookahead([], lambda g: DECAY),  # synchronises on the direction built above
    ]


SPECS = [OptimizerSpec(
    name=NAME,
    defaults=dict(RANGER21_DEFAULTS),
    build=_build,
    decay=DECAY,
    structural=("centralize", "normalize"),
    check=_check,
)]
