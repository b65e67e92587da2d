"""Weight decay in its three published forms.

- coupled L2 (``g += wd * p``; torch Adam/SGD),
- decoupled, applied to the parameters before the update (``p *= 1 - lr * wd``; AdamW),
- proximal, applied after the update (``p /= 1 + lr * wd``; Adan).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import StepContext, Transform


class CoupledWeightDecay(Transform):
    """L2 regularisation folded into the gradient: ``u = g + wd * p``."""

    def __init__(self, key: str = "weight_decay") -> None:
        self.key = key

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        wd = ctx.hp(self.key)
        if wd == 0:
            return updates
        return torch._foreach_add(updates, ctx.params, alpha=wd)


class DecoupledWeightDecay(Transform):
    """Shrink the parameters: ``p *= 1 - lr * wd`` (or ``1 - wd`` with ``lr_scaled=False``).

    Placed before the update in AdamW-style recipes and after it where a reference does so.
    """

    def __init__(self, key: str = "weight_decay", lr_scaled: bool = True) -> None:
        self.key = key
        self.lr_scaled = lr_scaled

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        wd = ctx.hp(self.key)
        if wd != 0:
            factor = 1.0 - (float(ctx.hp("lr")) * wd if self.lr_scaled else wd)
            torch._foreach_mul_(ctx.params, factor)
        return updates


class ProximalWeightDecay(Transform):
    """Proximal decay after the update: ``p /= 1 + lr * wd`` (Adan's default form)."""

    def __init__(self, key: str = "weight_decay") -> None:
        self.key = key

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        wd = ctx.hp(self.key)
        if wd != 0:
            torch._foreach_div_(ctx.params, 1.0 + float(ctx.hp("lr")) * wd)
        return updates
