"""Adam variants (DiffGrad, AdamP/SGDP, EXAdam, FAdam, AdaMomentum, TAM, Ano) and the classical
adaptive methods (Adagrad, RMSprop), each a short chain over shared transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmvalley.optim.fused import fused_adagrad, fused_adamp, fused_fadam, fused_sgdp
from llmvalley.optim.recipes.common import require_betas, require_flag, require_number
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms.adaptive import ScaleByAdam
from llmvalley.optim.transforms.momentum import EMA
from llmvalley.optim.transforms.variants import (
    AlignRows,
    BiasCorrect,
    DampedMomentum,
    Friction,
    ProjectScaleInvariant,
    ScaleByAdagrad,
    ScaleByAdaMomentum,
    ScaleByAno,
    ScaleByEXAdam,
    ScaleByFAdam,
    ScaleByRMSprop,
    TorqueAwareMomentum,
)

Check = Callable[[dict[str, Any]], None]


def _number(name: str, key: str, ok: Callable[[float], bool], rule: str) -> Check:
    """A check that ``group[key]`` is a real number for which ``ok`` holds."""
    return lambda group: require_number(name, group, key, rule, ok)


def _flag(name: str, key: str) -> Check:
    return lambda group: require_flag(name, group, key)


def _all(*checks: Check) -> Check:
    def check(group: dict[str, Any]) -> None:
        for c in checks:
            c(group)

    return check


def _projection_checks(name: str) -> list[Check]:
    return [_number(name, "delta", lambda v: v >= 0, "a finite number >= 0"),
            _number(name, "wd_ratio", lambda v: v >= 0, "a finite number >= 0"),
            _flag(name, "nesterov")]


def _check_exadam(group: dict[str, Any]) -> None:
    require_betas("exadam", 2)(group)
    if group["version"] not in (1, 2) or isinstance(group["version"], bool):
        raise ValueError(f"exadam: invalid version={group['version']!r}: must be 1 (the first "
                         "paper version, step size lr*ln(sqrt(2(t+1)))) or 2 (the current one)")


def _check_ano(group: dict[str, Any]) -> None:
    require_betas("ano", 2)(group)
    if group["betas"][1] < 0.5:
        raise ValueError(f"ano: invalid betas={tuple(group['betas'])!r}: beta2 must be >= 0.5 "
                         "(below it the sign-driven second moment can turn negative)")
    _flag("ano", "logarithmic_schedule")(group)


def _check_sgdp(group: dict[str, Any]) -> None:
    for c in _projection_checks("sgdp"):
        c(group)
    if group["nesterov"] and group["momentum"] <= 0:
        raise ValueError("sgdp: invalid nesterov=True: requires momentum > 0")


def _adamp_chain(group: Any) -> list:
    # AlignRows: a compiled CPU step updates the moments in the projection's pass of row sums
    if group["nesterov"]:  # (beta1 m + (1 - beta1) g) / bc1 over Adam's denominator
        return [AlignRows(), EMA("exp_avg", nesterov=True), BiasCorrect(),
                ScaleByAdam(first_moment="input"), ProjectScaleInvariant()]
    return [AlignRows(), ScaleByAdam(), ProjectScaleInvariant()]


def _adamomentum_decay(group: dict[str, Any]) -> Decay:
    if not group["weight_decouple"]:
        return Decay("coupled")
    return Decay("decoupled", lr_scaled=not group["fixed_decay"])


SPECS = [
    OptimizerSpec(
        name="diffgrad",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        build=lambda g: [Friction([ScaleByAdam(eps_form="hf")])],
        decay=Decay("coupled"),
        check=require_betas("diffgrad", 2),
    ),
    OptimizerSpec(
        name="adamp",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1,
                      wd_ratio=0.1, nesterov=False),
        build=_adamp_chain,
        structural=("nesterov",),
        fused=fused_adamp,
        check=_all(require_betas("adamp", 2), *_projection_checks("adamp")),
    ),
    OptimizerSpec(
        name="sgdp",
        defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                      eps=1e-8, delta=0.1, wd_ratio=0.1),
        build=lambda g: [DampedMomentum(), ProjectScaleInvariant(decay_over_momentum=True)],
        check=_check_sgdp,
        fused=fused_sgdp,
    ),
    OptimizerSpec(
        name="exadam",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, version=2),
        build=lambda g: [ScaleByEXAdam()],
        check=_check_exadam,
    ),
    OptimizerSpec(
        name="fadam",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, clip=1.0,
                      p=0.5),
        build=lambda g: [ScaleByFAdam()],
        decay=Decay("none"),  # the weight decay is part of the direction (natural gradient)
        fused=fused_fadam,
        check=_all(require_betas("fadam", 2),
                   _number("fadam", "clip", lambda v: v > 0, "a finite number > 0"),
                   _number("fadam", "p", lambda v: v > 0, "a finite number > 0")),
    ),
    OptimizerSpec(
        name="adamomentum",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False,
                      weight_decouple=True, fixed_decay=False),
        build=lambda g: [ScaleByAdaMomentum()],
        decay=_adamomentum_decay,
        check=_all(require_betas("adamomentum", 2), _flag("adamomentum", "amsgrad"),
                   _flag("adamomentum", "weight_decouple"), _flag("adamomentum", "fixed_decay")),
    ),
    OptimizerSpec(
        name="tam",
        defaults=dict(lr=1e-3, momentum=0.9, decay_rate=0.9, eps=1e-8, weight_decay=0.0),
        build=lambda g: [TorqueAwareMomentum()],
        decay=Decay("coupled"),
        check=_number("tam", "decay_rate", lambda v: 0 <= v < 1, "a finite number in [0, 1)"),
    ),
    OptimizerSpec(
        name="ano",
        defaults=dict(lr=1e-4, betas=(0.92, 0.99), eps=1e-8, weight_decay=0.0,
                      logarithmic_schedule=False),
        build=lambda g: [ScaleByAno()],
        check=_check_ano,
    ),
    OptimizerSpec(
        name="adagrad",
        defaults=dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                      eps=1e-10),
        build=lambda g: [ScaleByAdagrad()],
        decay=Decay("coupled"),
        fused=fused_adagrad,
        check=_all(_number("adagrad", "lr_decay", lambda v: v >= 0, "a finite number >= 0"),
                   _number("adagrad", "initial_accumulator_value", lambda v: v >= 0,
                           "a finite number >= 0")),
    ),
    OptimizerSpec(
        name="rmsprop",
        defaults=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                      centered=False),
        build=lambda g: [ScaleByRMSprop()],
        decay=Decay("coupled"),
        check=_all(_number("rmsprop", "alpha", lambda v: 0 <= v <= 1,
                           "a finite number in [0, 1]"),
                   _flag("rmsprop", "centered")),
    ),
]
