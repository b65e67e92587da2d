"""Sign-based transforms (signSGD/Signum, Lion, Grams)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform


class Sign(Transform):
    """``u = sign(u)``."""

    elementwise = True

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        return torch._foreach_sign(updates)


class LionDirection(Transform):
    """Lion's interpolated sign direction (Chen et al., arXiv 2302.06675).

    ``c = beta1 * m + (1 - beta1) * g``; output ``sign(c)``; then
    ``m = beta2 * m + (1 - beta2) * g`` with ``(beta1, beta2) = group["betas"]``.
    State: ``exp_avg``.
    """

    elementwise = True

    slot_names = ("exp_avg",)

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        return [SlotSpec("exp_avg", shape)]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2 = ctx.hp("betas")
        m = ctx.slot("exp_avg")
        c = torch._foreach_mul(m, beta1)
        torch._foreach_add_(c, updates, alpha=1 - beta1)
        torch._foreach_sign_(c)
        torch._foreach_lerp_(m, updates, 1 - beta2)
        return c


class GradSignTimesMagnitude(Transform):
    """Grams' decoupling of direction and magnitude: ``u = sign(g) * |u|``.

    Applied to an Adam update it gives Grams (Cao et al., arXiv 2412.17107).
    """

    elementwise = True

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        out = torch._foreach_abs(updates)
        torch._foreach_mul_(out, torch._foreach_sign(ctx.grads))
        return out
