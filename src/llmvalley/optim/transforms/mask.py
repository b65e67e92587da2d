"""Masks applied to an update direction."""

from __future__ import annotations

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import StepContext, Transform


class Cautious(Transform):
    """Cautious masking (Liang et al., arXiv 2411.16085).

    Zeroes the coordinates where the update direction disagrees in sign with the current
    gradient, then rescales by the fraction kept: ``mask = 1[u * g > 0]``,
    ``u = u * mask / max(mean(mask), 1e-3)``. The mask is built from the update itself (for
    Adam-type updates its sign is that of the first moment), not from ``exp_avg**2`` as one
    foreach variant of the reference code does by mistake.
    """

    per_tensor = True

    def __init__(self, min_fraction: float = 1e-3) -> None:
        self.min_fraction = min_fraction

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        products = torch._foreach_mul(updates, ctx.grads)
        out = []
        for u, prod in zip(updates, products):
            mask = (prod > 0).to(u.dtype)
            if mask.numel():
                mask.div_(mask.mean().clamp_(min=self.min_fraction))
            out.append(u * mask)
        return out
