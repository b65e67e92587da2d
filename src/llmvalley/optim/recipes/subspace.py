"""Subspace and compressed-state methods: Subset-Norm / Subspace-Momentum (and their
combination), DCT-AdamW and SMMF.

- ``subset_norm``, ``subspace_momentum`` and ``snsm`` (Nguyen et al., ICML'25): Adam's
  numerator and denominator compressed separately (:class:`SubspaceEMA` in a
  :class:`MomentumSubspace`, :class:`ScaleBySubsetNorm`); the paper's headline method is the
  combination, ``snsm``. Weight matrices only; ``create_optimizer`` routes the rest to AdamW.
- ``dct_adamw`` (Modoranu et al., arXiv 2505.17967): :class:`~.adaptive.ScaleByAdam` inside
  the columns of a fixed DCT basis chosen by alignment with the gradient, its moments rotated
  on a change of subspace (:class:`RotatingBasis`). Weight matrices only.
- ``smmf`` (Park et al., AAAI'25): :class:`ScaleBySMMF`, for any tensor.
- ``microadam`` (Modoranu et al., NeurIPS'24): :class:`ScaleByMicroAdam`, for any tensor.
"""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import require_betas, require_positive_int
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms.adaptive import ScaleByAdam
from llmvalley.optim.transforms.microadam import MAX_TOPK_BLOCK, ScaleByMicroAdam
from llmvalley.optim.transforms.momentum import EMA
from llmvalley.optim.transforms.subspace import (
    DCT_SIM_TYPES,
    SM_PROJ_TYPES,
    BiasCorrection,
    CheckedBasis,
    DCTColumns,
    MomentumSubspace,
    PassThrough,
    RotatingBasis,
    ScaleBySMMF,
    ScaleBySubsetNorm,
    SubspaceEMA,
)

#: the sn-sm reference's AdamW for everything that is not a weight matrix (eps 1e-6)
SNSM_FALLBACK = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)


def _check_subset_size(name: str, group: dict[str, Any]) -> None:
    size = group.get("subset_size", "heuristics")
    if size == "heuristics":
        return
    if not isinstance(size, int) or isinstance(size, bool) or size == 0:
        raise ValueError(f"{name}: invalid subset_size={size!r}: 'heuristics' or a non-zero "
                         "integer (k > 0: subsets of at most k elements; k < 0: of "
                         "sqrt(numel) / |k|)")


def _check_subspace(name: str, group: dict[str, Any]) -> None:
    require_positive_int(name, group, "rank")
    require_positive_int(name, group, "update_proj_gap")
    if group.get("proj_type", "svd") not in SM_PROJ_TYPES:
        raise ValueError(f"{name}: invalid proj_type={group['proj_type']!r}: one of "
                         f"{SM_PROJ_TYPES}")
    seed = group.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{name}: invalid seed={seed!r}: an integer")


def _checker(name: str, subset: bool, subspace: bool):
    def check(group: dict[str, Any]) -> None:
        require_betas(name, 2)(group)
        if subset:
            _check_subset_size(name, group)
        if subspace:
            _check_subspace(name, group)

    return check


def _check_dct(group: dict[str, Any]) -> None:
    require_betas("dct_adamw", 2)(group)
    require_positive_int("dct_adamw", group, "rank")
    require_positive_int("dct_adamw", group, "update_proj_gap")
    if group["sim_type"] not in DCT_SIM_TYPES:
        raise ValueError(f"dct_adamw: invalid sim_type={group['sim_type']!r}: one of "
                         f"{DCT_SIM_TYPES}")
    if not isinstance(group["rotate_subspace"], bool):
        raise ValueError(f"dct_adamw: invalid rotate_subspace={group['rotate_subspace']!r}: "
                         "True or False")
    ell = group["ell_norm"]
    if isinstance(ell, bool) or not isinstance(ell, (int, float)) or not ell > 0:
        raise ValueError(f"dct_adamw: invalid ell_norm={ell!r}: a number > 0 (the norm that "
                         "ranks the columns)")


SMMF_DECAY_MODES = ("adamw", "adam")


def _check_smmf(group: dict[str, Any]) -> None:
    require_betas("smmf", 1)(group)
    for key, low, high in (("decay_rate", -1.0, 0.0), ("growth_rate", 0.0, 1.0)):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not low <= value <= high:
            raise ValueError(f"smmf: invalid {key}={value!r}: a number in [{low}, {high}]")
    if not isinstance(group["vector_reshape"], bool):
        raise ValueError(f"smmf: invalid vector_reshape={group['vector_reshape']!r}: "
                         "True or False")
    if group["weight_decay_mode"] not in SMMF_DECAY_MODES:
        raise ValueError(f"smmf: invalid weight_decay_mode={group['weight_decay_mode']!r}: "
                         f"one of {SMMF_DECAY_MODES}")


def _check_microadam(group: dict[str, Any]) -> None:
    require_betas("microadam", 2)(group)
    require_positive_int("microadam", group, "m")
    density = group["k_init"]
    if isinstance(density, bool) or not isinstance(density, (int, float)) \
            or not 0 < density <= 1:
        raise ValueError(f"microadam: invalid k_init={density!r}: a number in (0, 1] (the "
                         "Top-K density: 0.01 keeps 1% of each block)")
    block = group["topk_block_size"]
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= MAX_TOPK_BLOCK:
        raise ValueError(f"microadam: invalid topk_block_size={block!r}: an integer in "
                         f"[1, {MAX_TOPK_BLOCK}] (block-local indices are int16)")
    size = group["quant_block_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size % 2:
        raise ValueError(f"microadam: invalid quant_block_size={size!r}: an even integer >= 2 "
                         "(two 4-bit codes a byte)")


def _subspace_momentum() -> list:
    """SM's numerator ``P m + (g - P P^T g)``, debiased by ``1 - beta1**t``."""
    return [CheckedBasis(MomentumSubspace(), [SubspaceEMA()], residual=[PassThrough()]),
            BiasCorrection()]


SM_DEFAULTS = dict(rank=128, update_proj_gap=200, proj_type="svd", seed=0)

SPECS = [
    OptimizerSpec(
        name="subset_norm",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                      subset_size="heuristics"),
        build=lambda g: [EMA("exp_avg", debias=True), ScaleBySubsetNorm()],
        decay=Decay("decoupled_after"),
        applies_to="matrix",
        check=_checker("subset_norm", subset=True, subspace=False),
        fallback_hparams=SNSM_FALLBACK,
    ),
    OptimizerSpec(
        name="subspace_momentum",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, **SM_DEFAULTS),
        build=lambda g: [*_subspace_momentum(),
                         ScaleByAdam(eps_form="hf", first_moment="input")],
        decay=Decay("decoupled_after"),
        applies_to="matrix",
        check=_checker("subspace_momentum", subset=False, subspace=True),
        fallback_hparams=SNSM_FALLBACK,
    ),
    OptimizerSpec(
        name="snsm",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                      subset_size="heuristics", **SM_DEFAULTS),
        build=lambda g: [*_subspace_momentum(), ScaleBySubsetNorm()],
        decay=Decay("decoupled_after"),
        applies_to="matrix",
        check=_checker("snsm", subset=True, subspace=True),
        fallback_hparams=SNSM_FALLBACK,
    ),
    OptimizerSpec(
        name="dct_adamw",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=256,
                      update_proj_gap=200, rotate_subspace=True, sim_type="matmul",
                      ell_norm=1),
        build=lambda g: [RotatingBasis(DCTColumns(), [ScaleByAdam()])],
        applies_to="matrix",
        check=_check_dct,
        fallback_hparams=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    ),
    OptimizerSpec(
        name="smmf",
        defaults=dict(lr=1e-3, betas=(0.9,), eps=1e-8, weight_decay=0.0, decay_rate=-0.8,
                      growth_rate=0.999, vector_reshape=True, weight_decay_mode="adamw"),
        build=lambda g: [ScaleBySMMF()],
        decay=lambda g: Decay("coupled" if g["weight_decay_mode"] == "adam" else "decoupled"),
        check=_check_smmf,
    ),
    OptimizerSpec(
        name="microadam",
        defaults=dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, m=10,
                      k_init=0.01, topk_block_size=20864, quant_block_size=100_000),
        build=lambda g: [ScaleByMicroAdam()],
        check=_check_microadam,
    ),
]
