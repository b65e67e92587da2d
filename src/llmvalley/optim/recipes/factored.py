"""Factored second-moment methods: Adafactor and CAME."""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import cautious, require_betas
from llmvalley.optim.registry import OptimizerSpec, Paper, register
from llmvalley.optim.transforms import (
    ApplyLR,
    DecoupledWeightDecay,
    ScaleByAdafactor,
    ScaleByCAME,
)


def _check_adafactor(group: dict[str, Any]) -> None:
    eps = group["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"adafactor: invalid eps={eps!r}: expected (eps1 or None, eps2)")
    if group["d"] < 1:
        raise ValueError(f"adafactor: invalid d={group['d']!r}: clipping threshold must be >= 1")
    if group["beta2_decay"] > 0:
        raise ValueError(
            f"adafactor: invalid beta2_decay={group['beta2_decay']!r}: must be <= 0"
        )


register(
    OptimizerSpec(
        name="adafactor",
        family="factored",
        paper=Paper("Adafactor: Adaptive Learning Rates with Sublinear Memory Cost "
                    "(Shazeer & Stern)", "1804.04235", 2018),
        reference="torch.optim.Adafactor",
        defaults=dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0),
        build=lambda g: [ScaleByAdafactor(), DecoupledWeightDecay(), ApplyLR(use_lr=False)],
        weight_decay="decoupled (p *= 1 - lr*wd), before the update, as torch",
        check=_check_adafactor,
        notes="lr caps the relative step size (rho_t = min(lr, 1/sqrt(t))), as torch. "
        "No first moment (beta1 = 0), as the paper's recommended setting and torch.",
    )
)


def _check_came(group: dict[str, Any]) -> None:
    require_betas("came", 3)(group)
    eps = group["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2 or None in eps:
        raise ValueError(f"came: invalid eps={eps!r}: expected (eps1, eps2)")


register(
    OptimizerSpec(
        name="came",
        family="factored",
        paper=Paper("CAME: Confidence-guided Adaptive Memory Efficient Optimization "
                    "(Luo et al., ACL 2023)", "2307.02047", 2023),
        reference="yangluo7/CAME; came-pytorch 0.1.3 (tested against)",
        defaults=dict(lr=2e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
                      clip_threshold=1.0, weight_decay=0.0, cautious=False),
        build=lambda g: [DecoupledWeightDecay(), ScaleByCAME(), *cautious(g), ApplyLR()],
        structural=("cautious",),
        check=_check_came,
        notes="The reference has no default lr; 2e-4 is its README's example.",
    )
)
