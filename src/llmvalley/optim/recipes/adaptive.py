"""Adaptive (second-moment) methods: Adam and its published relatives."""

from __future__ import annotations

from typing import Any

from llmvalley.optim.fused import (
    fused_adam,
    fused_adan,
    fused_grams,
    fused_lowbit_adam,
    fused_mars,
)
from llmvalley.optim.recipes.common import require_betas
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms import (
    Branch,
    GradSignTimesMagnitude,
    MARSCorrection,
    Partition,
    ScaleByAdaBelief,
    ScaleByAdam,
    ScaleByAdan,
    ScaleByAdEMAMix,
    ScaleByLaProp,
    ScaleByNAdam,
)

ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, fused=None)


def _adabelief_decay(group: dict[str, Any]) -> Decay:
    if not group["weight_decouple"]:
        return Decay("coupled")
    return Decay("decoupled", lr_scaled=not group["fixed_decay"])


def _mars_branch(shape: tuple, group: Any, name: str = "") -> str:
    return "matrix" if group["optimize_1d"] or len(shape) == 2 else "vector"


def _mars_vector_lr(group: dict[str, Any]) -> float:
    """The reference's rate for non-matrix tensors: ``lr_1d / lr_0`` of the group's rate
    (``lr_0``: its initial rate, as LR schedulers record it; 0 keeps a frozen group frozen)."""
    lr0 = float(group.setdefault("initial_lr", group["lr"]))
    return group["lr_1d"] / lr0 if lr0 > 0 else 0.0


def _check_mars(group: dict[str, Any]) -> None:
    require_betas("mars", 2)(group)
    if len(group["betas_1d"]) != 2:
        raise ValueError(f"mars: invalid betas_1d={group['betas_1d']!r}: expected 2 values")


def _low_bit_adamw(name: str, precision: str) -> OptimizerSpec:
    """AdamW (torch's defaults, as bitsandbytes' and torchao's) with quantized moments."""
    return OptimizerSpec(
        name=name,
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, weight_decay=1e-2,
                      state_precision=precision),
        build=lambda g: [ScaleByAdam()],
        fused=fused_lowbit_adam,
        fused_state=("int8", "int4", "bf16"),
        check=require_betas(name, 2),
    )


SPECS = [
    OptimizerSpec(
        name="adam",
        defaults=dict(ADAM_DEFAULTS, weight_decay=0.0),
        build=lambda g: [ScaleByAdam()],
        decay=Decay("coupled"),
        fused=fused_adam(decoupled=False),
        check=require_betas("adam", 2),
    ),
    OptimizerSpec(
        name="adamw",
        defaults=dict(ADAM_DEFAULTS, weight_decay=1e-2),
        build=lambda g: [ScaleByAdam()],
        fused=fused_adam(decoupled=True),
        fused_state=("bf16",),
        fused_options=("adagc",),
        check=require_betas("adamw", 2),
    ),
    _low_bit_adamw("adamw8bit", "int8"),
    _low_bit_adamw("adamw4bit", "int4"),
    OptimizerSpec(
        name="nadam",
        defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                      momentum_decay=4e-3, decoupled_weight_decay=False),
        build=lambda g: [ScaleByNAdam()],
        decay=lambda g: Decay("decoupled" if g["decoupled_weight_decay"] else "coupled"),
        check=require_betas("nadam", 2),
    ),
    OptimizerSpec(
        name="adabelief",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False,
                      weight_decouple=True, fixed_decay=False, rectify=True,
                      degenerated_to_sgd=True),
        build=lambda g: [ScaleByAdaBelief()],
        decay=_adabelief_decay,
        check=require_betas("adabelief", 2),
    ),
    OptimizerSpec(
        name="adan",
        defaults=dict(lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                      no_prox=False),
        build=lambda g: [ScaleByAdan()],
        decay=lambda g: Decay("decoupled" if g["no_prox"] else "proximal"),
        fused=fused_adan,
        fused_until_compiled=True,  # level with inductor's step once compiled (+-10%)
        check=require_betas("adan", 3),
    ),
    OptimizerSpec(
        name="laprop",
        defaults=dict(lr=4e-4, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0, amsgrad=False),
        build=lambda g: [ScaleByLaProp()],
        decay=Decay("decoupled_after", lr_scaled=False),
        check=require_betas("laprop", 2),
    ),
    OptimizerSpec(
        name="ademamix",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=8.0, beta3_warmup=None,
                      alpha_warmup=None, eps=1e-8, weight_decay=0.0),
        build=lambda g: [ScaleByAdEMAMix()],
        check=require_betas("ademamix", 3),
    ),
    OptimizerSpec(
        name="mars",
        defaults=dict(lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0, gamma=0.025,
                      optimize_1d=False, lr_1d=3e-3, betas_1d=(0.9, 0.95),
                      weight_decay_1d=0.1),
        # MARS-AdamW on matrices; the reference's AdamW branch (its own betas, decay and
        # rate) on the other tensors unless optimize_1d
        build=lambda g: [Partition(_mars_branch, {
            "matrix": [MARSCorrection(), ScaleByAdam()],
            "vector": Branch([ScaleByAdam()],
                             aliases={"betas": "betas_1d", "weight_decay": "weight_decay_1d"},
                             lr_mult=_mars_vector_lr),
        })],
        decay_keys=("weight_decay", "weight_decay_1d"),
        fused=fused_mars,
        check=_check_mars,
    ),
    OptimizerSpec(
        name="grams",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0),
        build=lambda g: [ScaleByAdam(eps_form="hf"), GradSignTimesMagnitude()],
        fused=fused_grams,
        fused_until_compiled=True,  # inductor's step is faster once compiled
        check=require_betas("grams", 2),
    ),
]
