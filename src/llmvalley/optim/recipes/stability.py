"""Stability methods: SPAM, Stable-SPAM, AdaGC."""

from __future__ import annotations

from typing import Any

from llmvalley.optim.fused import fused_adam, fused_spam, fused_stable_spam
from llmvalley.optim.recipes.common import require_betas, require_count, require_number
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms.adaptive import ScaleByAdam
from llmvalley.optim.transforms.stability import ScaleBySpikeAwareAdam, ScaleByStableSPAM


def _check_spam(group: dict[str, Any]) -> None:
    require_betas("spam", 2)(group)
    require_number("spam", group, "threshold", "a number >= 0 (0 turns clipping off)",
                  lambda v: v >= 0)
    for key in ("reset_interval", "warmup_steps", "clip_delay"):
        require_count("spam", group, key)


def _check_stable_spam(group: dict[str, Any]) -> None:
    require_betas("stable_spam", 2)(group)
    for key in ("gamma1", "gamma2", "gamma3"):
        require_number("stable_spam", group, key, "a number in [0, 1)", lambda v: 0 <= v < 1)
    require_number("stable_spam", group, "eta_min", "a number in [0, 1]", lambda v: 0 <= v <= 1)
    require_count("stable_spam", group, "reset_interval")
    if group["total_steps"] is not None:
        require_count("stable_spam", group, "total_steps", 1)


def _check_adagc(group: dict[str, Any]) -> None:
    require_betas("adagc", 2)(group)
    if group["adagc"] is not True:
        raise ValueError(f"adagc: invalid adagc={group['adagc']!r}: the adagc optimizer is AdamW "
                         "with AdaGC clipping; use 'adamw' for AdamW without it")


SPECS = [
    OptimizerSpec(
        name="spam",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, threshold=5000,
                      reset_interval=500, warmup_steps=150, clip_delay=20),
        build=lambda g: [ScaleBySpikeAwareAdam()],
        decay=Decay("decoupled_after"),
        fused=fused_spam,
        fused_until_compiled=True,  # inductor's step is faster once compiled
        check=_check_spam,
    ),
    OptimizerSpec(
        name="stable_spam",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, gamma1=0.7,
                      gamma2=0.9, gamma3=0.999, reset_interval=1000, total_steps=None,
                      eta_min=0.5),
        build=lambda g: [ScaleByStableSPAM(cosine=g["total_steps"] is not None)],
        fused=fused_stable_spam,
        structural=("total_steps",),
        check=_check_stable_spam,
    ),
    OptimizerSpec(  # AdamW; the clipping is the shell option, on by default here
        name="adagc",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, adagc=True),
        build=lambda g: [ScaleByAdam()],
        fused=fused_adam(decoupled=True),  # the Adam kernel, scaling each gradient as it reads
        fused_options=("adagc",),
        check=_check_adagc,
    ),
]
