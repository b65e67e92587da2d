"""Kronecker-factored and whitening preconditioners: Shampoo, SOAP, PSGD Kron, ASGO.

- ``soap``: :class:`~llmvalley.optim.transforms.adaptive.ScaleByAdam` (HF epsilon) inside
  :class:`~llmvalley.optim.transforms.kronecker.InKroneckerBasis` (nikhilvyas/SOAP).
- ``shampoo``: a debiased gradient EMA, then
  :class:`~llmvalley.optim.transforms.kronecker.ScaleByShampoo` (Distributed Shampoo).
- ``psgd_kron``: a debiased momentum, then
  :class:`~llmvalley.optim.transforms.kronecker.ScaleByKron` (kron-torch ``Kron``).
- ``asgo``: an EMA momentum, then :class:`~llmvalley.optim.transforms.kronecker.ScaleByASGO`
  (infinity-stars/ASGO); hidden matrices only, the rest to Adam as the reference's training
  script does.

SOAP, Shampoo and PSGD Kron precondition tensors of any shape in their references, so they
apply to every parameter (``applies_to="any"``).
"""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import require_betas, require_positive_int
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms.adaptive import ScaleByAdam
from llmvalley.optim.transforms.kronecker import (
    InKroneckerBasis,
    KroneckerEigenbasis,
    ScaleByASGO,
    ScaleByKron,
    ScaleByShampoo,
)
from llmvalley.optim.transforms.momentum import EMA
from llmvalley.optim.transforms.splus import EvalWeightAverage, ScaleBySPlus
from llmvalley.optim.validation import is_number


def _bad(name: str, key: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{name}: invalid {key}={value!r}: {rule}")


def _require_bool(name: str, group: dict[str, Any], key: str) -> None:
    if key in group and not isinstance(group[key], bool):
        raise _bad(name, key, group[key], "must be True or False")


def _require_range(name: str, group: dict[str, Any], key: str, lo: float, hi: float,
                   open_low: bool = False, open_high: bool = False) -> None:
    """``group[key]`` a finite number in [lo, hi] (ends open as asked)."""
    if key not in group:
        return
    value = group[key]
    ok = is_number(value) and lo <= float(value) <= hi
    if ok and open_low:
        ok = float(value) > lo
    if ok and open_high:
        ok = float(value) < hi
    if not ok:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        raise _bad(name, key, value, f"must be a number in {left}{lo}, {hi}{right}")


# ---- SOAP ----------------------------------------------------------------------------------
def _check_soap(group: dict[str, Any]) -> None:
    require_betas("soap", 2)(group)
    for key in ("precondition_frequency", "max_precond_dim"):
        require_positive_int("soap", group, key)
    for key in ("merge_dims", "precondition_1d"):
        _require_bool("soap", group, key)
    beta = group.get("shampoo_beta", -1)
    if not is_number(beta) or not (float(beta) < 0 or 0 <= float(beta) < 1):
        raise _bad("soap", "shampoo_beta", beta,
                   "must be in [0, 1), or negative to use betas[1]")


SOAP = OptimizerSpec(
    name="soap",
    defaults=dict(lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1.0, eps=1e-8, weight_decay=0.01,
                  precondition_frequency=10, max_precond_dim=10000, merge_dims=False,
                  precondition_1d=False),
    build=lambda g: [InKroneckerBasis(KroneckerEigenbasis(), [ScaleByAdam(eps_form="hf")])],
    decay=Decay("decoupled_after"),
    check=_check_soap,
)


# ---- Shampoo -------------------------------------------------------------------------------
GRAFTINGS = ("adam", "sgd", "none")


def _check_shampoo(group: dict[str, Any]) -> None:
    name = "shampoo"
    if group.get("grafting", "none") not in GRAFTINGS:
        raise _bad(name, "grafting", group["grafting"], f"must be one of {GRAFTINGS}")
    _require_range(name, group, "shampoo_beta", 0.0, 1.0, open_low=True)
    _require_range(name, group, "grafting_beta2", 0.0, 1.0, open_low=True)
    _require_range(name, group, "eps", 0.0, float("inf"), open_low=True)
    _require_range(name, group, "grafting_eps", 0.0, float("inf"), open_low=True)
    for key in ("max_preconditioner_dim", "precondition_frequency"):
        require_positive_int(name, group, key)
    start = group.get("start_preconditioning_step", -1)
    if not isinstance(start, int) or isinstance(start, bool) or start < -1 or start == 0:
        raise _bad(name, "start_preconditioning_step", start,
                   "an integer >= 1, or -1 for precondition_frequency")
    _require_bool(name, group, "use_bias_correction")
    exponent = group.get("inverse_exponent")
    if exponent is not None and not (is_number(exponent) and float(exponent) > 0):
        raise _bad(name, "inverse_exponent", exponent, "None or a number > 0")


def _shampoo_chain(g):
    ema = [EMA("filtered_grad", beta_key="momentum", debias=bool(g["use_bias_correction"]))]
    return (ema if float(g["momentum"]) > 0 else []) + [ScaleByShampoo(g["grafting"])]


SHAMPOO = OptimizerSpec(
    name="shampoo",
    defaults=dict(lr=1e-2, momentum=0.9, shampoo_beta=1.0, eps=1e-12, weight_decay=0.0,
                  max_preconditioner_dim=1024, precondition_frequency=1,
                  start_preconditioning_step=-1, use_bias_correction=True,
                  inverse_exponent=None, grafting="adam", grafting_beta2=0.999,
                  grafting_eps=1e-10),
    build=_shampoo_chain,
    structural=("grafting", "momentum", "use_bias_correction"),
    check=_check_shampoo,
)


# ---- PSGD Kron -----------------------------------------------------------------------------
MEMORY_SAVE_MODES = (None, "smart_one_diag", "one_diag", "all_diag")


def _check_kron(group: dict[str, Any]) -> None:
    name = "psgd_kron"
    require_betas(name, 1)(group)
    prob = group.get("preconditioner_update_probability")
    if prob is not None and not (is_number(prob) and 0 < float(prob) <= 1):
        raise _bad(name, "preconditioner_update_probability", prob,
                   "None (the annealing schedule) or a number in (0, 1]")
    _require_range(name, group, "max_prob", 0.0, 1.0, open_low=True)
    _require_range(name, group, "min_prob", 0.0, 1.0, open_low=True)
    if float(group.get("min_prob", 0.03)) > float(group.get("max_prob", 1.0)):
        raise _bad(name, "min_prob", group["min_prob"], "must be <= max_prob")
    _require_range(name, group, "prob_decay", 0.0, float("inf"))
    _require_range(name, group, "flat_start", 0.0, float("inf"))
    for key in ("max_size_triangular", "min_ndim_triangular"):
        if key in group and (not isinstance(group[key], int) or isinstance(group[key], bool)
                             or group[key] < 0):
            raise _bad(name, key, group[key], "an integer >= 0")
    if group.get("memory_save_mode") not in MEMORY_SAVE_MODES:
        raise _bad(name, "memory_save_mode", group["memory_save_mode"],
                   f"must be one of {MEMORY_SAVE_MODES}")
    for key in ("momentum_into_precond_update", "merge_dims"):
        _require_bool(name, group, key)
    _require_range(name, group, "precond_lr", 0.0, float("inf"))
    _require_range(name, group, "precond_init_scale", 0.0, float("inf"), open_low=True)
    seed = group.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise _bad(name, "seed", seed, "an integer >= 0")


PSGD_KRON = OptimizerSpec(
    name="psgd_kron",
    defaults=dict(lr=3e-4, betas=(0.9,), weight_decay=0.0,
                  preconditioner_update_probability=None, max_prob=1.0, min_prob=0.03,
                  prob_decay=0.001, flat_start=500, max_size_triangular=8192,
                  min_ndim_triangular=2, memory_save_mode=None,
                  momentum_into_precond_update=True, precond_lr=0.1, precond_init_scale=1.0,
                  merge_dims=True, seed=42),
    build=lambda g: [EMA("momentum_buffer", debias=True), ScaleByKron()],
    check=_check_kron,
)


# ---- ASGO ----------------------------------------------------------------------------------
def _check_asgo(group: dict[str, Any]) -> None:
    _require_range("asgo", group, "beta2", 0.0, 1.0, open_high=True)
    require_positive_int("asgo", group, "matalg_steps")


ASGO = OptimizerSpec(
    name="asgo",
    defaults=dict(lr=1e-2, momentum=0.9, beta2=0.8, eps=1e-10, weight_decay=0.1,
                  matalg_steps=10),
    build=lambda g: [EMA("momentum_buffer", beta_key="momentum"), ScaleByASGO()],
    applies_to="matrix",
    check=_check_asgo,
    # the reference's training script: Adam (0.9, 0.95), eps 1e-8, no decay, the same lr
    fallback_hparams=dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),
)

# ---- SPlus ---------------------------------------------------------------------------------
def _check_splus(group: dict[str, Any]) -> None:
    name = "splus"
    require_betas(name, 2)(group)
    _require_range(name, group, "ema_rate", 0.0, 1.0, open_high=True)
    for key in ("inverse_every", "max_dim"):
        require_positive_int(name, group, key)
    _require_range(name, group, "eps", 0.0, float("inf"))
    _require_range(name, group, "nonstandard_constant", 0.0, float("inf"))
    strings = group.get("nonstandard_strings", ())
    if not isinstance(strings, (tuple, list)) or not all(isinstance(s, str) for s in strings):
        raise _bad(name, "nonstandard_strings", strings, "must be a tuple of strings")


SPLUS = OptimizerSpec(
    name="splus",
    defaults=dict(lr=0.1, betas=(0.9, 0.999), ema_rate=0.999, eps=1e-30, weight_decay=1e-2,
                  inverse_every=100, max_dim=10000, nonstandard_constant=0.001,
                  nonstandard_strings=("embed", "layernorm")),
    build=lambda g: [EMA("momentum"), ScaleBySPlus(), EvalWeightAverage()],
    check=_check_splus,
)

SPECS: list[OptimizerSpec] = [SOAP, SHAMPOO, PSGD_KRON, ASGO, SPLUS]
