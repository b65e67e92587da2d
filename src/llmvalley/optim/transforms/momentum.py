"""First-moment transforms: heavy-ball momentum and exponential moving averages.

Transforms never modify their input updates in place (the first input is ``p.grad``); they
return either fresh tensors or their own state buffers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, StepContext, Transform, numel


class HeavyBall(Transform):
    """Momentum exactly as ``torch.optim.SGD``.

    ``b = u`` at the first step, else ``b = momentum * b + (1 - dampening) * u``; the output is
    ``u + momentum * b`` with ``nesterov`` and ``b`` otherwise. No state when momentum is 0.
    """

    state_keys = ("momentum_buffer",)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        momentum = ctx.hp("momentum")
        if momentum == 0:
            return updates
        dampening = ctx.hp("dampening")
        old_b, old_u = [], []
        bufs: list[Tensor] = []
        for st, u in zip(ctx.states, updates):
            buf = st.get("momentum_buffer")
            if buf is None:  # first step: the buffer starts as the update itself
                buf = st["momentum_buffer"] = u.detach().clone()
            else:
                old_b.append(buf)
                old_u.append(u)
            bufs.append(buf)
        if old_b:
            torch._foreach_mul_(old_b, momentum)
            torch._foreach_add_(old_b, old_u, alpha=1 - dampening)
        if ctx.hp("nesterov"):
            return torch._foreach_add(updates, bufs, alpha=momentum)
        return bufs

    def state_numel(self, shape: Shape, group: dict[str, Any]) -> int:
        return numel(shape) if group["momentum"] != 0 else 0


class EMA(Transform):
    """Exponential moving average ``m = beta * m + (1 - beta) * u`` stored under ``key``.

    ``beta`` is ``group["betas"][beta_index]`` (or ``group[beta_key]``). With ``nesterov``
    the output is ``beta * m + (1 - beta) * u`` (the look-ahead used by Muon and NAdam-style
    methods); otherwise ``m`` itself.
    """

    def __init__(
        self,
        key: str = "exp_avg",
        beta_index: int = 0,
        beta_key: str = "betas",
        nesterov: bool = False,
    ) -> None:
        self.key = key
        self.state_keys = (key,)
        self.beta_index = beta_index
        self.beta_key = beta_key
        self.nesterov = nesterov

    def beta(self, group: dict[str, Any]) -> float:
        value = group[self.beta_key]
        return value[self.beta_index] if isinstance(value, (tuple, list)) else value

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta = self.beta(ctx.group)
        bufs = ctx.buffers(self.key)
        torch._foreach_lerp_(bufs, updates, 1 - beta)
        if self.nesterov:
            out = torch._foreach_mul(updates, 1 - beta)
            torch._foreach_add_(out, bufs, alpha=beta)
            return out
        return bufs

    def state_numel(self, shape: Shape, group: dict[str, Any]) -> int:
        return numel(shape)
