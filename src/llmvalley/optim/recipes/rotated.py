"""Adam in a rotated basis of each weight matrix: Conda and COSMOS.

Both are :class:`~llmvalley.optim.transforms.ScaleByAdam` inside an
:class:`~llmvalley.optim.transforms.InBasis`: Conda's singular basis of the momentum, COSMOS's
tracked eigen-subspace of the gradient covariance (with an orthogonalized residual). Both apply
to hidden weight matrices (``applies_to="matrix"``); ``create_optimizer(name, model)`` routes
embeddings, the output head, norms and biases to AdamW with the settings in each spec's
``fallback_hparams``.
"""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import require_betas, require_positive_int
from llmvalley.optim.recipes.matrix import ORTHO_DEFAULTS, check_matrix_group
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms import (
    EMA,
    FrobeniusNormalize,
    InBasis,
    NesterovSum,
    Orthogonalize,
    ScaleByAdam,
    SingularBasis,
    StepScale,
    TrackedSubspace,
)

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


def _check_cosmos(group: dict[str, Any]) -> None:
    require_betas("cosmos", 2)(group)
    check_matrix_group("cosmos", group)
    require_positive_int("cosmos", group, "rank")
    for key in ("lr_ratio", "gamma"):
        if key in group and not float(group[key]) >= 0:
            raise ValueError(f"cosmos: invalid {key}={group[key]!r}: must be >= 0")


SPECS = [
    OptimizerSpec(
        name="conda",
        defaults=dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, scale=0.25,
                      update_proj_gap=2000, proj_type="std"),
        # momentum in the original space; Adam's second moment (HF eps) in its singular basis
        build=lambda g: [
            EMA("exp_avg", debias=True),
            InBasis(SingularBasis(), [ScaleByAdam(eps_form="hf", first_moment="input")]),
            StepScale("scale"),
        ],
        decay=Decay("decoupled_after"),
        applies_to="matrix",
        check=_check_conda,
        fallback_hparams=dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0),
    ),
    OptimizerSpec(
        name="cosmos",
        defaults=dict(lr=2e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.1, lr_ratio=0.2,
                      rank=64, gamma=0.2, **dict(ORTHO_DEFAULTS, ns_eps_form="add")),
        # Adam in the tracked subspace, Newton-Schulz on the residual, then normalized
        build=lambda g: [
            NesterovSum(),
            InBasis(TrackedSubspace(), [ScaleByAdam(first_moment="input")],
                    residual=[Orthogonalize(), FrobeniusNormalize("gamma")]),
            FrobeniusNormalize("lr_ratio"),
        ],
        applies_to="matrix",
        check=_check_cosmos,
        fallback_hparams=dict(lr=2e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.1),
    ),
]
