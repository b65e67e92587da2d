"""AdaFisher and AdaFisherW (Gomes et al., ICLR 2025): a bias-corrected momentum divided by
a diagonal block-Kronecker Fisher whose factors come from module hooks.

The statistics need the model: :func:`~llmvalley.optim.transforms.fisher.attach_fisher`
hooks its ``nn.Linear`` layers; ``create_optimizer(name, model)`` calls it (the spec's
``attach``).
Without hooks every tensor takes the official code's fallback for parameters of unsupported
modules, ``F = 1`` (a warning says so at the first step).
"""

from __future__ import annotations

import math
from typing import Any

from llmvalley.optim.recipes.common import require_betas, require_number, require_positive_int
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms.fisher import ScaleByAdaFisher, attach_fisher

#: the official code's defaults (AdaFisherBackBone: lr 1e-3, beta 0.9, Lambda 1e-3,
#: gamma 0.8, TCov 100, weight_decay 0)
DEFAULTS: dict[str, Any] = dict(lr=1e-3, betas=(0.9,), gamma=0.8, damping=1e-3,
                                fisher_interval=100, weight_decay=0.0)


def _check(name: str):
    betas = require_betas(name, 1)

    def check(group: dict[str, Any]) -> None:
        betas(group)
        require_number(name, group, "gamma", "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        require_number(name, group, "damping", "a finite number > 0",
                       lambda v: math.isfinite(v) and v > 0)
        require_positive_int(name, group, "fisher_interval")

    return check


adafisher = OptimizerSpec(
    name="adafisher",
    defaults=dict(DEFAULTS),
    build=lambda group: [ScaleByAdaFisher()],
    decay=Decay("coupled"),  # AdaFisher adds wd * p to the gradient before the momentum
    check=_check("adafisher"),
    attach=attach_fisher,
)

adafisherw = OptimizerSpec(
    name="adafisherw",
    defaults=dict(DEFAULTS),
    build=lambda group: [ScaleByAdaFisher()],
    decay=Decay("decoupled"),  # AdaFisherW: p -= lr * (m_hat / F + wd * p)
    check=_check("adafisherw"),
    attach=attach_fisher,  # create_optimizer(name, model) hooks the model's Linear layers
)

SPECS: list[OptimizerSpec] = [adafisher, adafisherw]
