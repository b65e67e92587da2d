"""Schedule-free and parameter-free methods:
Schedule-Free AdamW/SGD, Prodigy, D-Adapt Adam, DoG/LDoG, MoMo/MoMo-Adam.

What a training loop must do for them:

- schedule-free: ``optimizer.train()`` before training steps and ``optimizer.eval()`` before
  evaluating or saving the model (the parameters then hold the averaged point ``x``); no LR
  schedule (``warmup_steps`` is built in);
- MoMo: pass the loss, ``optimizer.step(loss=loss)`` (or a closure);
- Prodigy, D-Adapt Adam, DoG: ``lr`` is a multiplier of the estimated step size (keep 1.0).
"""

from __future__ import annotations

import math
from typing import Any

from llmvalley.optim.fused import fused_schedule_free_adamw, fused_schedule_free_sgd
from llmvalley.optim.recipes.common import (
    require_betas,
    require_flag,
    require_number,
    require_positive_int,
)
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms.adaptive import ScaleByAdam
from llmvalley.optim.transforms.decay import CoupledWeightDecay
from llmvalley.optim.transforms.param_free import DAdaptAdam, DoGStep, MomoStep, ProdigyStep
from llmvalley.optim.transforms.schedule_free import ScheduleFree

Group = dict[str, Any]


def _check_schedule_free(name: str, beta_of):
    def check(group: Group) -> None:
        if name == "schedulefree_adamw":
            require_betas(name, 2)(group)
        beta = beta_of(group)
        key = "betas" if name == "schedulefree_adamw" else "momentum"
        if not 0 < beta < 1:
            raise ValueError(f"{name}: invalid {key}={group[key]!r}: the interpolation "
                             "coefficient must lie in (0, 1) (eval() divides by it)")
        warmup = group["warmup_steps"]
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"{name}: invalid warmup_steps={warmup!r}: an integer >= 0")
        require_number(name, group, "r", "a number >= 0", lambda v: v >= 0)
        require_number(name, group, "weight_lr_power", "a number >= 0", lambda v: v >= 0)

    return check


def _check_d_adapted(name: str):
    def check(group: Group) -> None:
        require_betas(name, 2)(group)
        require_number(name, group, "d0", "a number > 0", lambda v: v > 0)
        require_number(name, group, "growth_rate", "a number >= 1 (inf: unbounded)",
                lambda v: v >= 1)
        for key in ("decouple", "use_bias_correction"):
            require_flag(name, group, key)
        if not group["eps"] > 0:
            raise ValueError(f"{name}: invalid eps={group['eps']!r}: must be > 0")
        if name == "prodigy":
            require_flag(name, group, "safeguard_warmup")
            require_number(name, group, "d_coef", "a number > 0", lambda v: v > 0)
            require_positive_int(name, group, "slice_p")
            if group["beta3"] is not None:
                require_number(name, group, "beta3", "None or a number in [0, 1)",
                        lambda v: 0 <= v < 1)
        else:
            require_number(name, group, "layer_scale", "a number > 0", lambda v: v > 0)

    return check


def _check_dog(name: str):
    def check(group: Group) -> None:
        if group["init_eta"] is None:
            require_number(name, group, "reps_rel", "a number > 0", lambda v: v > 0)
        else:
            require_number(name, group, "init_eta", "None or a number > 0", lambda v: v > 0)

    return check


def _check_momo(name: str):
    def check(group: Group) -> None:
        if name == "momo_adam":
            require_betas(name, 2)(group)
            require_flag(name, group, "divide")
        else:
            require_flag(name, group, "bias_correction")
        require_number(name, group, "lb", "a finite number", math.isfinite)
        require_flag(name, group, "use_fstar")

    return check


SCHEDULE_FREE = dict(warmup_steps=0, r=0.0, weight_lr_power=2.0)

SPECS = [
    OptimizerSpec(
        name="schedulefree_adamw",
        defaults=dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                      **SCHEDULE_FREE),
        # RMS-normalised gradient (Adam's second moment, no first moment), decay at y, then the
        # schedule-free iterates
        build=lambda g: [ScaleByAdam(first_moment="input"), CoupledWeightDecay(),
                         ScheduleFree("betas")],
        decay=Decay("none"),
        fused=fused_schedule_free_adamw,
        check=_check_schedule_free("schedulefree_adamw", lambda g: g["betas"][0]),
    ),
    OptimizerSpec(
        name="schedulefree_sgd",
        defaults=dict(lr=1.0, momentum=0.9, weight_decay=0.0, **SCHEDULE_FREE),
        build=lambda g: [ScheduleFree("momentum")],
        decay=Decay("coupled"),  # g += wd * y, before the iterates
        fused=fused_schedule_free_sgd,
        check=_check_schedule_free("schedulefree_sgd", lambda g: g["momentum"]),
    ),
    OptimizerSpec(
        name="prodigy",
        defaults=dict(lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0,
                      decouple=True, use_bias_correction=False, safeguard_warmup=False,
                      d0=1e-6, d_coef=1.0, growth_rate=float("inf"), slice_p=1),
        build=lambda g: [ProdigyStep([ScaleByAdam(debias=False)])],
        decay=lambda g: Decay("decoupled" if g["decouple"] else "coupled"),
        check=_check_d_adapted("prodigy"),
    ),
    OptimizerSpec(
        name="dadapt_adam",
        defaults=dict(lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decouple=False,
                      use_bias_correction=False, d0=1e-6, growth_rate=float("inf"),
                      layer_scale=1.0),
        build=lambda g: [DAdaptAdam()],
        decay=lambda g: Decay("decoupled" if g["decouple"] else "coupled"),
        check=_check_d_adapted("dadapt_adam"),
    ),
    OptimizerSpec(
        name="dog",
        defaults=dict(lr=1.0, reps_rel=1e-6, eps=1e-8, weight_decay=0.0, init_eta=None),
        build=lambda g: [DoGStep(layerwise=False)],
        decay=Decay("coupled"),
        check=_check_dog("dog"),
    ),
    OptimizerSpec(
        name="ldog",
        defaults=dict(lr=1.0, reps_rel=1e-6, eps=1e-8, weight_decay=0.0, init_eta=None),
        build=lambda g: [DoGStep(layerwise=True)],
        decay=Decay("coupled"),
        check=_check_dog("ldog"),
    ),
    OptimizerSpec(
        name="momo",
        defaults=dict(lr=1.0, momentum=0.9, weight_decay=0.0, lb=0.0, bias_correction=False,
                      use_fstar=False),
        build=lambda g: [MomoStep("momentum")],
        decay=Decay("proximal"),
        check=_check_momo("momo"),
    ),
    OptimizerSpec(
        name="momo_adam",
        defaults=dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, lb=0.0,
                      divide=True, use_fstar=False),
        build=lambda g: [MomoStep("betas", [ScaleByAdam(first_moment="input")],
                                  zero_init=True)],
        decay=lambda g: Decay("proximal" if g["divide"] else "decoupled"),
        check=_check_momo("momo_adam"),
    ),
]
