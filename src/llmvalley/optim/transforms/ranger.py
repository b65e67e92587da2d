"""The pieces Ranger21 (Wright & Demeure, arXiv 2106.13731) adds to AdamW, one transform each.

- :class:`UnitwiseGradClip`: adaptive gradient clipping (AGC, Brock et al., arXiv 2102.06171),
  unit-wise against the parameter's norm.
- :class:`CentralizeGradient`: gradient centralization (Yong et al., arXiv 2004.01461).
- :class:`StandardizeGradient`: the gradient divided by its standard deviation (Ranger21's
  "gradient normalization").
- :class:`ScaleByPNMAdam`: Adam with positive-negative momentum (PNM, Xie et al., arXiv
  2103.17182) and, optionally, the softplus denominator (Tong et al., arXiv 1908.00700).
- :class:`StableWeightDecay`: decoupled weight decay divided by the root of the mean second
  moment over every parameter group (Xie et al., arXiv 2011.11152), through the plan.
- :class:`NormLoss`: the norm loss of Georgiou et al. (arXiv 2103.06583), pulling each unit's
  norm towards 1.
- :class:`LinearWarmupWarmdown`: Ranger21's built-in learning-rate schedule as a step scale.

Conventions (unit-wise norms, constants, the order of operations) are those of the official
code (lessw2020/Ranger21); ``recipes/ranger.py`` composes them, with
:class:`~llmvalley.optim.transforms.wrappers.Lookahead`, into ``ranger21``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform

Group = Mapping[str, Any]

#: the ``ctx.stash`` key under which :class:`ScaleByPNMAdam` leaves this group's sum of
#: bias-corrected second moments and their element count, for :class:`StableWeightDecay`
SECOND_MOMENT = "second_moment_sum"


def unit_norm(x: Tensor) -> Tensor:
    """Ranger21's unit-wise 2-norm: the whole tensor for 0-D and 1-D tensors (a 0-d result),
    dimension 1 for 2-D and 3-D tensors (rows of a linear weight), every dimension but the
    first for 4-D and larger (output channels of a convolution), kept for broadcasting."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    dims = 1 if x.ndim in (2, 3) else tuple(range(1, x.ndim))
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True)


class UnitwiseGradClip(Transform):
    """Adaptive gradient clipping (AGC), unit-wise, as Ranger21's code.

    With ``n_p = max(unit_norm(p), agc_eps)`` and ``n_g = unit_norm(g)``, each unit whose
    ``n_g`` exceeds ``agc_clip * n_p`` is rescaled to that norm
    (``g * agc_clip * n_p / max(n_g, 1e-6)``). ``agc_clip=None`` turns it off. Stateless.
    """

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        clip = ctx.hp("agc_clip")
        if clip is None:
            return updates
        clip, floor = float(clip), float(ctx.hp("agc_eps"))
        out = []
        for p, g in zip(ctx.params, updates):
            max_norm = unit_norm(p).clamp(min=floor) * clip
            g_norm = unit_norm(g)
            clipped = g * (max_norm / g_norm.clamp(min=1e-6))
            out.append(torch.where(g_norm > max_norm, clipped, g))
        return out


class CentralizeGradient(Transform):
    """Gradient centralization: tensors of two or more dimensions lose their mean over every
    dimension but the first (``g - mean(g, dims 1..)``); others pass unchanged. Stateless."""

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        return [g - g.mean(dim=tuple(range(1, g.ndim)), keepdim=True) if g.ndim > 1 else g
                for g in updates]


class StandardizeGradient(Transform):
    """Ranger21's gradient normalization: ``g / (std(g) + eps)`` over the whole tensor (the
    unbiased standard deviation, as ``Tensor.std``) for tensors of more than two elements;
    smaller ones pass unchanged. ``eps`` is the code's fixed 1e-8. Stateless."""

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        return [g / (g.std() + self.eps) if g.numel() > 2 else g for g in updates]


class ScaleByPNMAdam(Transform):
    """Adam with positive-negative momentum (PNM) and an optional softplus denominator.

    Two first moments take turns: at odd steps ``exp_avg`` is the current one, at even steps
    ``neg_exp_avg``; the current one is updated with ``beta1**2`` (it has skipped a step),
    ``m = beta1**2 m + (1 - beta1**2) g``, and the other, one step older, is subtracted::

        m_pn = ((1 + beta0) m_cur - beta0 m_other) / noise_norm
        v = beta2 v + (1 - beta2) g^2
        d = sqrt(v / bc2) + eps     (softplus(d, softplus_beta) when softplus_beta is not None)
        direction = m_pn / d / bc1  with bc1 = 1 - beta1^t, bc2 = 1 - beta2^t

    ``beta0`` is the group's ``pnm_momentum``. ``noise_norm`` is ``sqrt((1 + b)^2 + b^2)``
    with ``b = beta0`` (the PNM paper's AdaPNM) or, with ``noise="beta2"``, ``b = beta2``
    (Ranger21's official code). It cannot be :class:`~.adaptive.ScaleByAdam`: the first
    moment is two alternating buffers with ``beta1**2`` and the denominator is smoothed.

    It also leaves ``sum(v / bc2)`` over its tensors and their element count in
    ``ctx.stash[SECOND_MOMENT]`` for :class:`StableWeightDecay`. State: ``exp_avg``,
    ``neg_exp_avg``, ``exp_avg_sq``.
    """

    slot_names = ("exp_avg", "neg_exp_avg", "exp_avg_sq")

    def __init__(self, noise: str = "beta0") -> None:
        if noise not in ("beta0", "beta2"):
            raise ValueError(f"noise must be 'beta0' or 'beta2', got {noise!r}")
        self.noise = noise

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("exp_avg", shape), SlotSpec("neg_exp_avg", shape),
                SlotSpec("exp_avg_sq", shape, "unsigned")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2 = ctx.hp("betas")[:2]
        beta0, eps = float(ctx.hp("pnm_momentum")), float(ctx.hp("eps"))
        smooth = ctx.hp("softplus_beta")
        b = beta0 if self.noise == "beta0" else beta2
        noise_norm = math.sqrt((1 + b) ** 2 + b**2)
        sums: dict[torch.device, Tensor] = {}  # summed on each device, read once
        count, out = 0, []
        for g, m, n, v, t in zip(updates, ctx.slot("exp_avg"), ctx.slot("neg_exp_avg"),
                                 ctx.slot("exp_avg_sq"), ctx.steps):
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            part = v.sum() / bc2
            sums[v.device] = sums[v.device] + part if v.device in sums else part
            count += v.numel()
            current, other = (m, n) if t % 2 == 1 else (n, m)
            current.mul_(beta1**2).add_(g, alpha=1 - beta1**2)
            # m_pn / bc1 in two passes: noise_norm and bc1 folded into the coefficients
            scale = noise_norm * bc1
            pn = torch.add(current * ((1 + beta0) / scale), other, alpha=-beta0 / scale)
            denom = v.sqrt().div_(math.sqrt(bc2)).add_(eps)
            if smooth is not None:
                denom = F.softplus(denom, beta=float(smooth))
            out.append(pn.div_(denom))
        ctx.stash[SECOND_MOMENT] = (sum(float(x) for x in sums.values()), count)
        return out


class StableWeightDecay(Transform):
    """Stable weight decay (AdamS, Xie et al.): ``p *= 1 - wd * lr_t / sqrt(mean(v_hat))``.

    ``mean(v_hat)`` is the mean bias-corrected second moment over every parameter of every
    group that steps (what :class:`ScaleByPNMAdam`, earlier in the chain, left in the stash);
    the shell sums the groups' contributions first (:attr:`shared_stats`). ``lr_t`` is the
    learning rate times the tensor's multiplier and step scale (a schedule's factor, as
    :class:`LinearWarmupWarmdown`'s: the rate it stands for). The decay is set as the plan's
    ``decay_rate``, so the shell applies it before the step (``Decay("decoupled")``). While
    every second moment is zero there is no decay (the normaliser would be 0). Stateless.
    """

    shared_stats = True

    def gather(self, ctx: StepContext, updates: list[Tensor]) -> dict[str, Any]:
        found = ctx.stash.pop(SECOND_MOMENT, None)
        if found is None:
            raise RuntimeError("StableWeightDecay needs a second-moment transform that fills "
                               "ctx.stash[SECOND_MOMENT] (ScaleByPNMAdam) before it")
        total, count = found
        return {"v_hat_sum": total, "numel": count}

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        totals = ctx.totals if ctx.totals is not None else self.gather(ctx, updates)
        mean = totals["v_hat_sum"] / max(totals["numel"], 1)
        root = math.sqrt(mean) if mean > 0 else 0.0
        lr = float(ctx.hp("lr"))
        plan = ctx.plan
        for i in range(len(updates)):
            rate = lr * plan.lr_mult[i] * plan.scale[i] / root if root > 0 else 0.0
            plan.decay_rate[i] = rate
        return updates


class NormLoss(Transform):
    """Norm loss (Georgiou et al.): each unit's norm is pulled towards 1.

    With ``q`` the parameter after the decoupled decay the plan sets through ``decay_rate``
    (``q = p * (1 - wd * decay_rate)``; place this after :class:`StableWeightDecay`) and
    ``c = 2 * norm_loss * (1 - 1 / (unit_norm(q) + eps))``, the step is
    ``q -> q * (1 - lr_t * c)``, which is the direction ``c * q`` added to the update (the
    shell multiplies it by ``lr_t``, as it does the rest). ``norm_loss=0`` turns it off.
    Stateless.
    """

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        factor = float(ctx.hp("norm_loss"))
        if factor == 0:
            return updates
        eps = float(ctx.hp("eps"))
        plan, out = ctx.plan, []
        for i, (p, u) in enumerate(zip(ctx.params, updates)):
            wd, rate = plan.weight_decay[i], plan.decay_rate[i]
            q = p * (1 - wd * rate) if rate is not None and wd != 0 else p
            c = 2 * factor * (1 - 1 / (unit_norm(q) + eps))
            out.append(u + c * q)
        return out


def warmup_length(total_steps: int, beta2: float, warmup_steps: int | None) -> int:
    """Ranger21's warm-up length: ``warmup_steps`` when given, else ``ceil(2 / (1 - beta2))``
    (Ma & Yarats' untuned rule), or ``int(0.22 * total_steps)`` when that rule would take more
    than 45% of the run."""
    if warmup_steps is not None:
        return int(warmup_steps)
    rule = math.ceil(2 / (1 - beta2))
    return int(0.22 * total_steps) if rule / total_steps > 0.45 else rule


def ranger21_lr(lr: float, step: int, total_steps: int, warmup: int, warmdown_start_pct: float,
                min_lr: float) -> float:
    """Ranger21's learning rate at ``step`` (from 1) for the base rate ``lr``.

    Linear warm-up ``lr * step / warmup`` while ``step <= warmup``; from
    ``start = int(warmdown_start_pct * total_steps)`` on, a linear warm-down to ``min_lr``:
    ``lr - (lr - min_lr) * min((step + 1 - start) / (total_steps - start + 1), 1)``, never
    below ``min_lr`` (the warm-down wins where the two overlap, as in the code).
    """
    rate = lr * step / warmup if step <= warmup else lr
    start = int(warmdown_start_pct * total_steps)
    if step >= start:
        done = min((step + 1 - start) / (total_steps - start + 1), 1.0)
        rate = max(lr - (lr - min_lr) * done, min_lr)
    return rate


class LinearWarmupWarmdown(Transform):
    """Ranger21's built-in schedule as a step scale (the plan's ``scale``).

    Hyperparameters: ``total_steps`` (the run's length: the code's ``num_epochs *
    num_batches_per_epoch``), ``warmup_steps`` (``None``: :func:`warmup_length`'s rule from
    ``betas[1]``), ``warmdown_start_pct`` and ``warmdown_min_lr``; the base rate is the
    group's ``lr`` at each step (see :func:`ranger21_lr`). A group with ``lr = 0`` stays
    frozen. Stateless: it follows each tensor's step count.
    """

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        lr = float(ctx.hp("lr"))
        total = int(ctx.hp("total_steps"))
        warmup = warmup_length(total, ctx.hp("betas")[1], ctx.hp("warmup_steps"))
        pct, min_lr = float(ctx.hp("warmdown_start_pct")), float(ctx.hp("warmdown_min_lr"))
        plan = ctx.plan
        for i, t in enumerate(ctx.steps):
            factor = ranger21_lr(lr, t, total, warmup, pct, min_lr) / lr if lr > 0 else 0.0
            plan.scale[i] = plan.scale[i] * factor
        return updates
