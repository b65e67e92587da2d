"""Factored second-moment methods: Adafactor and CAME."""

from __future__ import annotations

from typing import Any

from llmvalley.optim.fused import fused_adafactor, fused_came
from llmvalley.optim.recipes.common import require_betas
from llmvalley.optim.spec import OptimizerSpec
from llmvalley.optim.transforms import ScaleByAdafactor, ScaleByCAME


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


def _check_came(group: dict[str, Any]) -> None:
    require_betas("came", 3)(group)
    eps = group["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2 or None in eps:
        raise ValueError(f"came: invalid eps={eps!r}: expected (eps1, eps2)")


SPECS = [
    OptimizerSpec(
        name="adafactor",
        defaults=dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0),
        build=lambda g: [ScaleByAdafactor()],
        check=_check_adafactor,
        fused=fused_adafactor,
    ),
    OptimizerSpec(
        name="came",
        defaults=dict(lr=2e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
                      clip_threshold=1.0, weight_decay=0.0),
        build=lambda g: [ScaleByCAME()],
        check=_check_came,
        fused=fused_came,
    ),
]
