"""Low-rank projection methods: GaLore, Fira, APOLLO, APOLLO-Mini, FRUGAL, Online Subspace
Descent.

Each is a :class:`~llmvalley.optim.transforms.projection.Subspace` (a projector from
:mod:`llmvalley.optim.transforms.projection`) around the library's Adam
(:class:`~llmvalley.optim.transforms.ScaleByAdam`): HF-style (eps after the root, bias
correction in the step size) for the GaLore family, torch-style for FRUGAL. FRUGAL's
``proj_type="blockwise"`` instead runs Adam on whole tensors that take turns
(:class:`~llmvalley.optim.transforms.blockwise.BlockwiseTensors`). All apply to hidden weight
matrices (``applies_to="matrix"``); ``create_optimizer(name, model)`` routes embeddings, the
output head, norms and biases to AdamW with each spec's ``fallback_hparams``, as the reference
training scripts train those with plain Adam. A rank at or above a matrix's smaller side, and
tensors that are not 2-D (blockwise FRUGAL excepted), raise ``ValueError`` naming the
parameter.
"""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import require_betas, require_positive_int
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms.adaptive import ScaleByAdam
from llmvalley.optim.transforms.base import StepScale
from llmvalley.optim.transforms.blockwise import BLOCK_ORDERS, BlockwiseTensors, active_count
from llmvalley.optim.transforms.projection import (
    COORDINATE_CHOICES,
    ApolloSubspace,
    CoordinateProjector,
    FiraSubspace,
    NormGrowthLimiter,
    OnlineProjector,
    RandomProjector,
    ScaleBy,
    Subspace,
    SVDProjector,
    check_matrix_shape,
    check_rank,
    subspace_rank,
)
from llmvalley.optim.transforms.sign import Sign

PROJ_TYPES = ("std",)
APOLLO_PROJ = ("random", "svd")
SCALE_TYPES = ("channel", "tensor")
FRUGAL_PROJ_TYPES = ("svd", "random", "randperm", *COORDINATE_CHOICES, "blockwise")
INACTIVE_RULES = ("sign_sgd", "sgd", "no")

#: the GaLore-family C4 scripts' settings (lr 0.01, HF eps 1e-6, wd 0), for the AdamW fallback
GALORE_FALLBACK: dict[str, Any] = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)


# ---- checks --------------------------------------------------------------------------------
def _params(group: dict[str, Any]):
    """``(name, shape)`` of the group's non-empty tensors (present when a group is added)."""
    names = group.get("param_names") or []
    for j, p in enumerate(group.get("params", []) or []):
        if getattr(p, "numel", lambda: 0)() == 0:
            continue
        label = names[j] if j < len(names) else f"parameter {j}"
        yield f"{label} (shape {tuple(p.shape)})", tuple(p.shape)


def _require(name: str, group: dict[str, Any], key: str, allowed: tuple) -> None:
    if key in group and group[key] not in allowed:
        raise ValueError(f"{name}: invalid {key}={group[key]!r}: one of {allowed}")


def _require_positive(name: str, group: dict[str, Any], key: str) -> None:
    if key in group and not float(group[key]) > 0:
        raise ValueError(f"{name}: invalid {key}={group[key]!r}: must be > 0")


def _check_ranked(name: str, group: dict[str, Any]) -> None:
    """Betas, rank, gap, scale, proj_type and every parameter's shape against the rank."""
    require_betas(name, 2)(group)
    require_positive_int(name, group, "rank")
    require_positive_int(name, group, "update_proj_gap")
    _require_positive(name, group, "scale")
    _require(name, group, "proj_type", PROJ_TYPES)
    for label, shape in _params(group):
        check_matrix_shape(name, shape, label)
        check_rank(name, subspace_rank(shape, group), min(shape), label)


def _check_fira(group: dict[str, Any]) -> None:
    _check_ranked("fira", group)
    if "gamma" in group and not float(group["gamma"]) >= 1.0:
        raise ValueError(f"fira: invalid gamma={group['gamma']!r}: the norm-growth limit must "
                         "be >= 1")


def _apollo_check(name: str):
    def check(group: dict[str, Any]) -> None:
        _check_ranked(name, group)
        _require(name, group, "proj", APOLLO_PROJ)
        _require(name, group, "scale_type", SCALE_TYPES)
        for key in ("scale_front", "norm_growth_limiter"):
            if key in group and not isinstance(group[key], bool):
                raise ValueError(f"{name}: invalid {key}={group[key]!r}: True or False")
        if "gamma" in group and not float(group["gamma"]) >= 1.0:
            raise ValueError(f"{name}: invalid gamma={group['gamma']!r}: the norm-growth "
                             "limit must be >= 1")

    return check


def _check_osd(group: dict[str, Any]) -> None:
    _check_ranked("online_subspace_descent", group)
    betas = group.get("proj_betas", (0.9, 0.999))
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"online_subspace_descent: invalid proj_betas={betas!r}: two values "
                         "in [0, 1)")
    for key in ("proj_eps", "proj_weight_decay"):
        if key in group and not float(group[key]) >= 0:
            raise ValueError(f"online_subspace_descent: invalid {key}={group[key]!r}: "
                             "must be >= 0")


def _check_frugal(group: dict[str, Any]) -> None:
    require_betas("frugal", 2)(group)
    require_positive_int("frugal", group, "update_proj_gap")
    _require("frugal", group, "proj_type", FRUGAL_PROJ_TYPES)
    _require("frugal", group, "inactive_update_rule", INACTIVE_RULES)
    _require("frugal", group, "block_order", BLOCK_ORDERS)
    if not isinstance(group.get("reset_statistics", True), bool):
        raise ValueError(f"frugal: invalid reset_statistics={group['reset_statistics']!r}: "
                         "True or False")
    seed = group.get("block_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"frugal: invalid block_seed={seed!r}: an integer >= 0")
    for key in ("inactive_lr_scale", "proj_params_lr_scale"):
        if key in group and not float(group[key]) >= 0:
            raise ValueError(f"frugal: invalid {key}={group[key]!r}: must be >= 0")
    kind = group.get("proj_type", "svd")
    density = float(group.get("density", 0.25))
    if kind == "blockwise":
        _check_frugal_blockwise(group, density)
        return
    if not 0.0 < density < 1.0:
        raise ValueError(f"frugal: invalid density={group['density']!r}: must lie in (0, 1)")
    for label, shape in _params(group):
        check_matrix_shape("frugal", shape, label)
        if kind in COORDINATE_CHOICES:
            total = CoordinateProjector("frugal", kind).total(shape)
            check_rank("frugal", int(total * density), total, label,
                       what=f"number of {kind} int({total} * density)")
        else:
            check_rank("frugal", subspace_rank(shape, group, "density"), min(shape), label,
                       what="rank round(short side * density)")


def _check_frugal_blockwise(group: dict[str, Any], density: float) -> None:
    """The blockwise projector takes whole tensors of any shape; density 0 (every tensor
    state-free, the 7B script's setting) and 1 are allowed, as the reference allows them."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"frugal: invalid density={group['density']!r}: must lie in [0, 1] "
                         "for proj_type 'blockwise'")
    if group.get("reset_statistics", True) is not True:
        raise ValueError("frugal: invalid reset_statistics=False for proj_type 'blockwise': "
                         "the blockwise projector always frees the Adam state at a "
                         "re-selection (the reference ignores the flag)")
    n = len(list(_params(group)))
    k = active_count(n, density)
    if group.get("block_order") == "mirror" and n and k % 2:
        raise ValueError(f"frugal: invalid block_order='mirror' with density={density!r}: "
                         f"round({n} tensors * density) = {k} active tensors, and 'mirror' "
                         "activates them in pairs (an even count)")


# ---- chains --------------------------------------------------------------------------------
def _galore(group) -> list:
    return [Subspace(SVDProjector("galore"), [ScaleByAdam(eps_form="hf")], scale_key="scale")]


def _fira(group) -> list:
    return [FiraSubspace(SVDProjector("fira"), [ScaleByAdam(eps_form="hf")],
                         residual=[NormGrowthLimiter("scaling_grad")], scale_key="scale")]


def _apollo_builder(name: str):
    def build(group) -> list:
        proj = SVDProjector(name) if group["proj"] == "svd" else RandomProjector(name)
        return [ApolloSubspace(proj, [ScaleByAdam(eps_form="hf")],
                               residual=[NormGrowthLimiter("scaled_grad")], scale_key="scale")]

    return build


def _osd(group) -> list:
    return [Subspace(OnlineProjector("online_subspace_descent"), [ScaleByAdam(eps_form="hf")],
                     scale_key="scale")]


def _frugal(group) -> list:
    kind = group["proj_type"]
    rule = group["inactive_update_rule"]
    residual = {"sign_sgd": [Sign(), ScaleBy("inactive_lr_scale")],
                "sgd": [ScaleBy("inactive_lr_scale")], "no": None}[rule]
    if kind == "blockwise":
        return [BlockwiseTensors([ScaleByAdam(eps_form="torch")], residual),
                StepScale("proj_params_lr_scale")]
    if kind == "svd":
        proj = SVDProjector("frugal", rank_from="density")
    elif kind in COORDINATE_CHOICES:
        proj = CoordinateProjector("frugal", kind)
    else:
        proj = RandomProjector("frugal", "orthogonal" if kind == "random" else "permutation",
                               rank_from="density")
    return [Subspace(proj, [ScaleByAdam(eps_form="torch")], residual=residual,
                     reset_key="reset_statistics"),
            StepScale("proj_params_lr_scale")]


# ---- specs ---------------------------------------------------------------------------------
GALORE_DEFAULTS: dict[str, Any] = dict(
    lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=128, update_proj_gap=200,
    scale=0.25, proj_type="std")

SPECS = [
    OptimizerSpec(
        name="galore",
        defaults=dict(GALORE_DEFAULTS),
        build=_galore,
        decay=Decay("decoupled_after"),
        applies_to="matrix",
        check=lambda g: _check_ranked("galore", g),
        fallback_hparams=dict(GALORE_FALLBACK),
    ),
    OptimizerSpec(
        name="fira",
        defaults=dict(GALORE_DEFAULTS, gamma=1.01),
        build=_fira,
        decay=Decay("decoupled_after"),
        applies_to="matrix",
        check=_check_fira,
        fallback_hparams=dict(GALORE_FALLBACK),
    ),
    OptimizerSpec(
        name="apollo",
        defaults=dict(GALORE_DEFAULTS, scale=1.0, proj="random", scale_type="channel",
                      scale_front=False, norm_growth_limiter=True, gamma=1.01),
        build=_apollo_builder("apollo"),
        structural=("proj",),
        decay=Decay("decoupled_after"),
        applies_to="matrix",
        check=_apollo_check("apollo"),
        fallback_hparams=dict(GALORE_FALLBACK),
    ),
    OptimizerSpec(
        name="apollo_mini",
        defaults=dict(GALORE_DEFAULTS, rank=1, scale=128.0, proj="random", scale_type="tensor",
                      scale_front=False, norm_growth_limiter=True, gamma=1.01),
        build=_apollo_builder("apollo_mini"),
        structural=("proj",),
        decay=Decay("decoupled_after"),
        applies_to="matrix",
        check=_apollo_check("apollo_mini"),
        fallback_hparams=dict(GALORE_FALLBACK),
    ),
    OptimizerSpec(
        name="frugal",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, density=0.25,
                      update_proj_gap=200, proj_type="svd", reset_statistics=True,
                      inactive_update_rule="sign_sgd", inactive_lr_scale=1.0,
                      proj_params_lr_scale=1.0, block_order="descending", block_seed=0),
        build=_frugal,
        structural=("proj_type", "inactive_update_rule"),
        decay=Decay("decoupled"),
        applies_to="matrix",
        check=_check_frugal,
        fallback_hparams=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    ),
    OptimizerSpec(
        name="online_subspace_descent",
        defaults=dict(GALORE_DEFAULTS, proj_betas=(0.9, 0.999), proj_eps=1e-8,
                      proj_weight_decay=0.01),
        build=_osd,
        decay=Decay("decoupled_after"),
        applies_to="matrix",
        check=_check_osd,
        fallback_hparams=dict(GALORE_FALLBACK),
    ),
]
