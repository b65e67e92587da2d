"""The final transform of a chain: write the update into the parameters."""

from __future__ import annotations

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import StepContext, Transform


class ApplyLR(Transform):
    """``p -= lr * u``; with ``use_lr=False`` the update is already a step (``p -= u``)."""

    def __init__(self, use_lr: bool = True) -> None:
        self.use_lr = use_lr

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        alpha = -float(ctx.hp("lr")) if self.use_lr else -1.0
        torch._foreach_add_(ctx.params, updates, alpha=alpha)
        return updates
