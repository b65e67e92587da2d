"""Matrix (orthogonalized) optimizers: Muon, AdaMuon, NAMO, NAMO-D, AuON, Hybrid-AuON, Dion,
PolarGrad.

All apply to hidden weight matrices (``applies_to="matrix"``); ``create_optimizer(name,
model)`` routes embeddings, the output head, norms and biases to AdamW with the reference's
auxiliary settings (each spec's ``fallback_hparams``). Conv kernels (with
``matrix_ndim=">=2"``) are viewed as ``(out, -1)`` matrices.

Orthogonalization options shared by the Muon family (see
:mod:`llmvalley.optim.transforms.orthogonalize`): ``orthogonalizer`` (``"newton_schulz"``,
``"polar_express"``, ``"svd"``), ``ns_steps``, ``ns_coefficients``, ``ns_eps`` (the Frobenius
normalisation guard, torch.optim.Muon's ``eps``), ``ns_dtype`` (None: bf16 on CUDA and on CPUs
whose bf16 matrix products are faster, the update's dtype elsewhere), ``ns_form`` (how the
Newton-Schulz products are evaluated: ``"standard"``, the default, is torch.optim.Muon's,
bit for bit in bf16; ``"auto"`` is the fastest on CPU, the Gram form for matrices at least 1.5
times as wide as tall and blocked symmetric products otherwise, the same iteration up to
rounding: ``muon`` 0.76x torch.optim.Muon's step time in ``benchmarks/results/
matrix_step_time_cpu.md``) and, except for ``muon`` (always ``"clamp"``), ``ns_eps_form``:
``"clamp"`` divides by ``max(||X||_F, ns_eps)`` as torch.optim.Muon (PolarGrad's default),
``"add"`` by ``||X||_F + ns_eps`` as Keller's original NS5 and the AdaMuon, NAMO / NAMO-D,
Hybrid-AuON and COSMOS reference code (those methods' default). ``shape_scale`` picks the
update-scale convention: ``"keller"`` ``sqrt(max(1, m/n))``, ``"moonlight"``
``0.2 sqrt(max(m, n))``, ``"dion"`` ``sqrt(m/n)``, ``"none"``, or ``"rms"`` (rescale to RMS
``rms_target``); torch's ``"original"`` and ``"match_rms_adamw"`` are accepted as aliases.
"""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import require_positive_int
from llmvalley.optim.spec import OptimizerSpec
from llmvalley.optim.transforms import Sign
from llmvalley.optim.transforms.orthogonalize import (
    NS_COEFFICIENTS,
    NS_EPS_FORMS,
    NS_FORMS,
    ORTHOGONALIZERS,
    CoshBrake,
    DionUpdate,
    MuonMomentum,
    NAMOUpdate,
    Orthogonalize,
    RMSRescale,
    ScaleByOrthoSecondMoment,
    ShapeScale,
    check_shape_scale,
)
from llmvalley.optim.transforms.qdwh import POLAR_METHODS, PolarGradUpdate

#: Keller Jordan's MuonWithAuxAdam settings for the non-matrix parameters
MUON_AUX_ADAMW: dict[str, Any] = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)

ORTHO_DEFAULTS: dict[str, Any] = dict(
    orthogonalizer="newton_schulz", ns_steps=5, ns_coefficients=NS_COEFFICIENTS, ns_eps=1e-7,
    ns_dtype=None, ns_form="standard",
)

#: the same, normalising the NS input by ``||X||_F + ns_eps`` as the reference code of AdaMuon,
#: NAMO / NAMO-D and Hybrid-AuON does (``max(||X||_F, ns_eps)`` is torch.optim.Muon's form)
ORTHO_DEFAULTS_ADD: dict[str, Any] = dict(ORTHO_DEFAULTS, ns_eps_form="add")


def check_matrix_group(name: str, group: dict[str, Any]) -> None:
    """Validate the orthogonalization / momentum / scale options shared by these recipes."""
    if "orthogonalizer" in group and group["orthogonalizer"] not in ORTHOGONALIZERS:
        raise ValueError(f"{name}: invalid orthogonalizer={group['orthogonalizer']!r}: "
                         f"one of {ORTHOGONALIZERS}")
    require_positive_int(name, group, "ns_steps")
    if "ns_form" in group and group["ns_form"] not in NS_FORMS:
        raise ValueError(f"{name}: invalid ns_form={group['ns_form']!r}: one of {NS_FORMS}")
    if "ns_eps_form" in group and group["ns_eps_form"] not in NS_EPS_FORMS:
        raise ValueError(f"{name}: invalid ns_eps_form={group['ns_eps_form']!r}: "
                         f"one of {NS_EPS_FORMS}")
    if "ns_coefficients" in group and len(group["ns_coefficients"]) != 3:
        raise ValueError(f"{name}: invalid ns_coefficients={group['ns_coefficients']!r}: "
                         "expected (a, b, c)")
    if "momentum" in group and not 0.0 <= float(group["momentum"]) < 1.0:
        raise ValueError(f"{name}: invalid momentum={group['momentum']!r}: must lie in [0, 1)")
    if "mu2" in group and not 0.0 <= float(group["mu2"]) < 1.0:
        raise ValueError(f"{name}: invalid mu2={group['mu2']!r}: must lie in [0, 1)")
    if "shape_scale" in group:
        check_shape_scale(name, group["shape_scale"])


def _check(name: str):
    return lambda group: check_matrix_group(name, group)


NAMO_DEFAULTS: dict[str, Any] = dict(
    lr=1e-2, momentum=0.95, mu2=0.99, eps=1e-8, nesterov=True, weight_decay=0.1,
    scale_coeff=0.2, **ORTHO_DEFAULTS_ADD)


def _check_dion(group: dict[str, Any]) -> None:
    check_matrix_group("dion", group)
    frac = group.get("rank_fraction", 1.0)
    if not 0.0 < float(frac) <= 1.0:
        raise ValueError(f"dion: invalid rank_fraction={frac!r}: must lie in (0, 1]")


POLARGRAD_DEFAULTS: dict[str, Any] = dict(
    lr=0.02, momentum=0.95, weight_decay=0.0, polar_first=False, polar_method="qdwh",
    inner_steps=2, ns_steps=5, ns_coefficients=NS_COEFFICIENTS, ns_eps=1e-7,
    ns_eps_form="clamp", ns_dtype=None,
)


def _check_polargrad(group: dict[str, Any]) -> None:
    check_matrix_group("polargrad", group)
    method = group.get("polar_method", "qdwh")
    if method not in POLAR_METHODS:
        raise ValueError(f"polargrad: invalid polar_method={method!r}: one of {POLAR_METHODS}")
    require_positive_int("polargrad", group, "inner_steps")
    if not isinstance(group.get("polar_first", False), bool):
        raise ValueError(f"polargrad: invalid polar_first={group['polar_first']!r}: a bool")
    if method == "polar_express" and group.get("ns_steps", 5) > 5:
        raise ValueError(f"polargrad: invalid ns_steps={group['ns_steps']!r}: polar_express "
                         "has a 5-iteration schedule")


SPECS = [
    OptimizerSpec(
        name="muon",
        defaults=dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
                      shape_scale="keller", rms_target=0.2, **ORTHO_DEFAULTS),
        build=lambda g: [MuonMomentum(), Orthogonalize(), ShapeScale()],
        applies_to="matrix",
        check=_check("muon"),
        fallback_hparams=dict(MUON_AUX_ADAMW),
    ),
    OptimizerSpec(
        name="adamuon",
        defaults=dict(lr=6e-4, momentum=0.95, nesterov=True, weight_decay=0.1, eps=1e-8,
                      rms_target=0.2, **ORTHO_DEFAULTS_ADD),
        build=lambda g: [MuonMomentum(), Sign(), Orthogonalize(), ScaleByOrthoSecondMoment(),
                         RMSRescale()],
        applies_to="matrix",
        check=_check("adamuon"),
        fallback_hparams=dict(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1),
        legacy_defaults=dict(ns_eps_form="clamp"),  # 0.1 had no ns_eps_form
    ),
    OptimizerSpec(
        name="namo",
        defaults=dict(NAMO_DEFAULTS),
        build=lambda g: [NAMOUpdate(columnwise=False)],
        applies_to="matrix",
        check=_check("namo"),
        fallback_hparams=dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        legacy_defaults=dict(ns_eps_form="clamp"),  # 0.1 had no ns_eps_form
    ),
    OptimizerSpec(
        name="namo_d",
        defaults=dict(NAMO_DEFAULTS, col_clamp=0.75),
        build=lambda g: [NAMOUpdate(columnwise=True)],
        applies_to="matrix",
        check=_check("namo_d"),
        fallback_hparams=dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        legacy_defaults=dict(ns_eps_form="clamp"),  # 0.1 had no ns_eps_form
    ),
    OptimizerSpec(
        name="auon",
        defaults=dict(lr=0.24, momentum=0.95, nesterov=True, weight_decay=0.0, gamma=1.5),
        build=lambda g: [MuonMomentum(), CoshBrake()],
        applies_to="matrix",
        check=_check("auon"),
    ),
    OptimizerSpec(
        name="auon_hybrid",
        defaults=dict(lr=0.24, momentum=0.95, nesterov=True, weight_decay=0.0, gamma=1.5,
                      **dict(ORTHO_DEFAULTS_ADD, ns_steps=1)),
        build=lambda g: [MuonMomentum(), Orthogonalize(), CoshBrake()],
        applies_to="matrix",
        check=_check("auon_hybrid"),
    ),
    OptimizerSpec(
        name="dion",
        defaults=dict(lr=0.01, momentum=0.95, weight_decay=0.01, eps=1e-8, rank_fraction=1.0,
                      shape_scale="dion"),
        build=lambda g: [DionUpdate(), ShapeScale()],
        applies_to="matrix",
        check=_check_dion,
        fallback_hparams=dict(lr=0.01, betas=(0.9, 0.95), weight_decay=0.01),
    ),
    OptimizerSpec(
        name="polargrad",
        defaults=dict(POLARGRAD_DEFAULTS),
        build=lambda g: [PolarGradUpdate()],
        applies_to="matrix",
        check=_check_polargrad,
        fallback_hparams=dict(MUON_AUX_ADAMW),
    ),
]
