"""First-moment transforms: heavy-ball momentum, exponential moving averages, and MARS's
variance-reduced gradient.

Transforms never modify their input updates in place (the first input is ``p.grad``); they
return either fresh tensors or their own state buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform, scalars


class HeavyBall(Transform):
    """Momentum exactly as ``torch.optim.SGD``.

    ``b = u`` at the first step, else ``b = momentum * b + (1 - dampening) * u``; the output is
    ``u + momentum * b`` with ``nesterov`` and ``b`` otherwise. No state when momentum is 0.
    """

    elementwise = True

    slot_names = ("momentum_buffer",)

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        return [SlotSpec("momentum_buffer", shape)] if group["momentum"] != 0 else []

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        momentum = ctx.hp("momentum")
        if momentum == 0:
            return updates
        dampening = ctx.hp("dampening")
        bufs = ctx.slot("momentum_buffer")
        old_b, old_u = [], []
        for buf, u, fresh in zip(bufs, updates, ctx.fresh("momentum_buffer")):
            if fresh:  # first step: the buffer starts as the update itself
                buf.copy_(u)
            else:
                old_b.append(buf)
                old_u.append(u)
        if old_b:
            torch._foreach_mul_(old_b, momentum)
            torch._foreach_add_(old_b, old_u, alpha=1 - dampening)
        if ctx.hp("nesterov"):
            return torch._foreach_add(updates, bufs, alpha=momentum)
        return bufs


class EMA(Transform):
    """Exponential moving average ``m = beta * m + (1 - beta) * u`` in slot ``key``.

    ``beta`` is ``group["betas"][beta_index]`` (or ``group[beta_key]``). With ``nesterov``
    the output is ``beta * m + (1 - beta) * u`` (the look-ahead used by Muon and NAdam-style
    methods); with ``debias`` it is ``m / (1 - beta^t)``; otherwise ``m`` itself.
    """

    elementwise = True

    def __init__(self, key: str = "exp_avg", beta_index: int = 0, beta_key: str = "betas",
                 nesterov: bool = False, debias: bool = False) -> None:
        self.key = key
        self.slot_names = (key,)
        self.beta_index = beta_index
        self.beta_key = beta_key
        self.nesterov = nesterov
        self.debias = debias

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        return [SlotSpec(self.key, shape)]

    def beta(self, group: Mapping[str, Any]) -> float:
        value = group[self.beta_key]
        return value[self.beta_index] if isinstance(value, (tuple, list)) else value

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta = self.beta(ctx.group)
        bufs = ctx.slot(self.key)
        torch._foreach_lerp_(bufs, updates, 1 - beta)
        if self.nesterov:
            out = torch._foreach_mul(updates, 1 - beta)
            torch._foreach_add_(out, bufs, alpha=beta)
            return out
        if self.debias:
            return torch._foreach_div(bufs, scalars([1 - p for p in ctx.powers(beta)]))
        return bufs


class NesterovSum(Transform):
    """COSMOS's normalised Nesterov momentum (lliu606/COSMOS).

    ``M = beta M + u`` (an undamped sum, ``beta = betas[0]``); output
    ``(u + beta M) / (1 + beta (1 - beta^t) / (1 - beta))``, the look-ahead divided by the
    total weight it carries. State ``exp_avg``.
    """

    elementwise = True

    slot_names = ("exp_avg",)

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        return [SlotSpec("exp_avg", shape)]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta = ctx.hp("betas")[0]
        bufs = ctx.slot("exp_avg")
        torch._foreach_mul_(bufs, beta)
        torch._foreach_add_(bufs, updates)
        out = []
        for u, m, p in zip(updates, bufs, ctx.powers(beta)):
            bc1 = (1 - p) / (1 - beta)
            out.append((u + beta * m) / (1 + beta * bc1))
        return out


class MARSCorrection(Transform):
    """MARS's variance-reduced gradient (Yuan et al., arXiv 2411.10438), approximate form as
    AGI-Arena/MARS (``is_approx=True``).

    ``c = u + gamma * beta / (1 - beta) * (u - u_prev)``, rescaled to unit norm when its norm
    exceeds 1; ``u_prev`` starts at zero, as in the reference, and is a copy (the reference
    keeps a reference to ``p.grad``, which breaks when gradients are zeroed in place).
    ``beta`` is ``betas[0]`` (else ``momentum``); ``gamma`` is ``group[gamma_key]``.
    State ``last_grad``.
    """

    per_tensor = True

    slot_names = ("last_grad",)

    def __init__(self, gamma_key: str = "gamma") -> None:
        self.gamma_key = gamma_key

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        return [SlotSpec("last_grad", shape)]

    @staticmethod
    def beta(group: Mapping[str, Any]) -> float:
        if "betas" in group:
            return float(group["betas"][0])
        return float(group["momentum"])

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta, gamma = self.beta(ctx.group), float(ctx.hp(self.gamma_key))
        lasts = ctx.slot("last_grad")
        out = []
        for u, last in zip(updates, lasts):
            c = (u - last).mul_(gamma * beta / (1 - beta)).add_(u)
            norm = torch.linalg.vector_norm(c)
            out.append(torch.where(norm > 1, c / norm, c))
            last.copy_(u)
        return out
