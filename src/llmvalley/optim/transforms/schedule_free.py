"""Schedule-free iterates (Defazio et al., "The Road Less Scheduled", arXiv 2405.15682).

The parameters hold the gradient point ``y`` while training and the averaged point ``x`` while
evaluating; the state holds the base-optimizer sequence ``z``. With ``c_t = w_t / sum w`` and
``w_t = t**r * lr_max**weight_lr_power`` (schedulefree 1.4.1):

    x_{t+1} = (1 - c) x_t + c z_{t+1},  z_{t+1} = z_t - lr * d_t,  y = (1 - beta) z + beta x

where ``d_t`` is the transform's input (the gradient for SGD, the RMS-normalised gradient for
AdamW, each with its weight decay taken at ``y``). The new ``y`` is returned as an *absolute*
step (``u = y - y_new``, applied with no learning rate); :meth:`ScheduleFree.set_mode` maps
``y`` to ``x`` and back when the optimizer switches between ``train()`` and ``eval()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import (
    Shape,
    SlotSpec,
    StepContext,
    Transform,
    add_scaled_,
)


class ScheduleFree(Transform):
    """The y/z/x iterates of schedule-free learning, as ``schedulefree``'s optimizers.

    ``beta`` is ``group[beta_key]`` (``betas[0]`` for AdamW, ``momentum`` for SGD); the group
    also gives ``lr``, ``warmup_steps`` (linear warmup of the rate), ``r`` (polynomial weight
    of the average) and ``weight_lr_power``. State: ``z`` (an iterate: ``"exact"``, never
    quantised), and the floats ``lr_max`` and ``weight_sum`` (the reference keeps them in the
    group; here each tensor keeps its copy, equal for tensors that step together).
    """

    elementwise = True

    slot_names = ("z", "lr_max", "weight_sum")
    has_modes = True

    def __init__(self, beta_key: str = "betas") -> None:
        self.beta_key = beta_key

    def beta(self, group: Mapping[str, Any]) -> float:
        value = group[self.beta_key]
        return float(value[0] if isinstance(value, (tuple, list)) else value)

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        return [SlotSpec("z", shape, "exact"), SlotSpec("lr_max", None, init=-1.0),
                SlotSpec("weight_sum", None)]

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """Each tensor's warmed-up rate ``lr``, averaging weight ``c`` and the gradient
        coefficient ``lr (1 - beta (1 - c))``; advances ``lr_max`` and ``weight_sum``."""
        beta = self.beta(ctx.group)
        base_lr, warmup = float(ctx.hp("lr")), ctx.hp("warmup_steps")
        r, power = ctx.hp("r"), ctx.hp("weight_lr_power")
        rates, weights, coefs = [], [], []
        for i, t in enumerate(ctx.steps):
            lr = base_lr * (t / warmup if t - 1 < warmup else 1.0)
            lr_max = max(lr, ctx.scalar("lr_max", i))
            weight = t**r * lr_max**power
            weight_sum = ctx.scalar("weight_sum", i) + weight
            ctx.set_scalar("lr_max", i, lr_max)
            ctx.set_scalar("weight_sum", i, weight_sum)
            c = weight / weight_sum if weight_sum != 0 else 0.0
            rates.append(lr)
            weights.append(c)
            coefs.append(lr * (1.0 - beta * (1.0 - c)))
        return {"lr": rates, "c": weights, "coef": coefs}

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        zs = ctx.slot("z")
        numbers = ctx.prelude()
        keys = list(zip(numbers["lr"], numbers["c"], numbers["coef"]))
        if not any(ctx.fresh("z")) and all(type(v) is float for k in keys for v in k) \
                and len(set(keys)) == 1:
            # the usual eager step (every tensor at the same numbers): the same operations
            # as below, one foreach call each instead of a Python loop over the tensors
            lr, c, coef = keys[0]
            u = torch._foreach_sub(ctx.params, zs)
            torch._foreach_mul_(u, c)
            torch._foreach_add_(u, updates, alpha=coef)
            torch._foreach_add_(zs, updates, alpha=-lr)
            ctx.plan.absolute[:] = [True] * len(u)
            return u
        out = []
        for i, (y, z, d, fresh, lr, c, coef) in enumerate(
                zip(ctx.params, zs, updates, ctx.fresh("z"), numbers["lr"], numbers["c"],
                    numbers["coef"])):
            if fresh:  # z starts at the initial point
                z.copy_(y)
            # y_new = (1 - c) y + c z + lr (beta (1 - c) - 1) d, as u = y - y_new
            u = add_scaled_((y - z).mul_(c), d, coef)
            add_scaled_(z, d, -lr)
            ctx.plan.absolute[i] = True
            out.append(u)
        return out

    def set_mode(self, ctx: StepContext, train: bool) -> list[Tensor]:
        beta = self.beta(ctx.group)
        weight = 1.0 - beta if train else 1.0 - 1.0 / beta  # x -> y, or y -> x
        return [torch.lerp(p, z, weight) for p, z in zip(ctx.params, ctx.slot("z"))]
