"""Coupled weight decay (L2 in the gradient): the one decay form that is a transform.

The other published forms (decoupled before or after the step, proximal) change the
parameters, so the shell applies them, as each spec's :class:`~llmvalley.optim.spec.Decay`
declares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import StepContext, Transform


class CoupledWeightDecay(Transform):
    """L2 regularisation folded into the gradient: ``u = g + wd * p`` (torch Adam/SGD)."""

    elementwise = True

    def __init__(self, key: str = "weight_decay") -> None:
        self.key = key

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        wd = ctx.hp(self.key)
        if wd == 0:
            return updates
        return torch._foreach_add(updates, ctx.params, alpha=wd)
