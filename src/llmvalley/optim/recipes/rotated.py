"""Adaptive methods in a rotated basis of each weight matrix: Conda and COSMOS.

Both apply to hidden weight matrices (``applies_to="matrix"``); ``create_optimizer(name,
model)`` routes embeddings, the output head, norms and biases to AdamW with the settings in
each spec's ``fallback_hparams``. The references route by module name (Conda: Linear layers
whose name contains "attn" or "mlp") or by row count (COSMOS: 2-D with at most 10000 rows);
here routing is explicit (:mod:`llmvalley.optim.routing`).
"""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import require_betas, require_positive_int
from llmvalley.optim.recipes.matrix import ORTHO_DEFAULTS, check_matrix_group
from llmvalley.optim.registry import OptimizerSpec, Paper, register
from llmvalley.optim.transforms import ApplyLR, DecoupledWeightDecay
from llmvalley.optim.transforms.rotated import COSMOSUpdate, ScaleByConda

CONDA_PROJ_TYPES = ("std",)


def _check_conda(group: dict[str, Any]) -> None:
    require_betas("conda", 2)(group)
    require_positive_int("conda", group, "update_proj_gap")
    if group.get("proj_type", "std") not in CONDA_PROJ_TYPES:
        raise ValueError(
            f"conda: invalid proj_type={group['proj_type']!r}: only 'std' is supported (the "
            "reference's other projection types fail on non-square matrices)")
    if not float(group.get("scale", 1.0)) > 0:
        raise ValueError(f"conda: invalid scale={group['scale']!r}: must be > 0")


register(
    OptimizerSpec(
        name="conda",
        family="matrix",
        paper=Paper("Conda: Column-Normalized Adam for Training Large Language Models Faster "
                    "(Wang et al.)", "2509.24218", 2025),
        reference="jie040109/Conda (conda_torch/conda.py + projector.py, proj_type 'std'); "
        "tested against an independent reference from the equations",
        defaults=dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, scale=0.25,
                      update_proj_gap=2000, proj_type="std"),
        build=lambda g: [ScaleByConda(), ApplyLR(), DecoupledWeightDecay()],
        applies_to="matrix",
        weight_decay="decoupled (p -= lr*wd*p), after the update as the reference",
        check=_check_conda,
        fallback_hparams=dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0),
        notes="Defaults are the LLaMA scripts' (lr 0.01, betas (0.9, 0.99), scale 0.25, "
        "update_proj_gap 2000, wd 0, eps 1e-8). The SVD of the momentum is refreshed at steps "
        "1, 1 + gap, ... (the reference's pre-increment step % gap == 0); the second moment is "
        "kept in the rotated basis and not rotated when the basis changes, as the reference. "
        "The SVD runs in float32 for low-precision states and in float64 for float64 ones "
        "(the reference casts everything that is not float32, float64 included, to float32). "
        "Only proj_type 'std' is offered. The reference trains all other parameters with the "
        "same optimizer as Hugging Face-style Adam (eps outside the bias correction, wd after) "
        "at the same lr; here they go to the AdamW fallback at lr 0.01 and betas (0.9, 0.99).",
    )
)


def _check_cosmos(group: dict[str, Any]) -> None:
    require_betas("cosmos", 2)(group)
    check_matrix_group("cosmos", group)
    require_positive_int("cosmos", group, "rank")
    for key in ("lr_ratio", "gamma"):
        if key in group and not float(group[key]) >= 0:
            raise ValueError(f"cosmos: invalid {key}={group[key]!r}: must be >= 0")


register(
    OptimizerSpec(
        name="cosmos",
        family="matrix",
        paper=Paper("COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training of "
                    "LLMs (Liu et al.)", "2502.17410", 2025),
        reference="lliu606/COSMOS (COSMOS_optim.py, Nesterov on); tested against an "
        "independent reference from the equations",
        defaults=dict(lr=2e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.1, lr_ratio=0.2,
                      rank=64, gamma=0.2, **dict(ORTHO_DEFAULTS, ns_eps_form="add")),
        build=lambda g: [COSMOSUpdate()],
        applies_to="matrix",
        weight_decay="decoupled (p *= 1 - lr*wd, unadjusted lr), before the update",
        check=_check_cosmos,
        fallback_hparams=dict(lr=2e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.1),
        notes="Defaults: the README's usage (lr 2e-3, betas (0.95, 0.95), wd 0.1, lr_ratio "
        "0.2) and the code's (rank 64, gamma 0.2, Nesterov, NS5 normalised by ||X|| + 1e-7). "
        "The hidden-matrix step has RMS lr * lr_ratio. rank is capped at the input dimension "
        "(the reference fails when n < rank); at rank = n the Newton-Schulz residual term is "
        "dropped as exactly zero. NS runs in bf16 on CUDA and in the parameter's precision "
        "elsewhere (the reference always uses bf16; pass ns_dtype to choose). The reference's "
        "nestrov=False branch (which uses G / bc1, not the momentum) is not offered. Its "
        "Adam branch for other tensors hard-codes m = beta1 m + 0.1 g and bias correction "
        "1 - 0.9^t; here those tensors go to a standard AdamW fallback with the same lr, "
        "betas and wd.",
    )
)
