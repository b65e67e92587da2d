"""Stability transforms: spike-aware Adam (SPAM), Stable-SPAM and adaptive gradient clipping.

- :class:`ScaleBySpikeAwareAdam`: SPAM (Huang et al., arXiv 2501.06842), Adam with the HF eps
  form plus spike clipping against the second moment, a momentum reset every
  ``reset_interval`` steps and a cosine warm-up of the step after each reset.
- :class:`ScaleByStableSPAM`: Stable-SPAM (Huang et al., arXiv 2502.17055), Adam (torch eps
  form) fed a gradient that is first clipped against a running maximum (AdaClip) and then
  rescaled to a running norm (AdaGN), with SPAM's momentum reset.
- :class:`AdaptiveGradClip`: AdaGC (Wang et al., arXiv 2502.11034), per-tensor clipping against
  an EMA of the tensor's own clipped gradient norms, after a warm-up of global-norm clipping.
  It runs in front of any recipe as the shell option ``adagc=True``.

The first two subclass :class:`~llmvalley.optim.transforms.adaptive.ScaleByAdam`: they change
what Adam sees (its input, its moments at a reset, its step count) and reuse its update.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.adaptive import ScaleByAdam
from llmvalley.optim.transforms.base import (
    Shape,
    SlotSpec,
    StepContext,
    Transform,
    scalars,
    shifted_power_table,
    shifted_powers,
)

Group = Mapping[str, Any]


def _zero_moments(ctx: StepContext, reset: list[bool]) -> None:
    """Zero Adam's moments of the tensors flagged in ``reset``.

    The zeros are written back at once (``ctx.flush``), so the Adam update that follows, which
    loads its slots again, sees them even when the state is stored quantized.
    """
    if not any(reset):
        return
    for name in ("exp_avg", "exp_avg_sq"):
        for value, r in zip(ctx.slot(name), reset):
            if r:
                value.zero_()
    ctx.flush()


def is_reset(step: int, reset_interval: int) -> bool:
    """Whether SPAM's and Stable-SPAM's Adam moments are zeroed at ``step``: every
    ``reset_interval``-th step, never with ``reset_interval == 0``."""
    return reset_interval > 0 and step % reset_interval == 0


def spam_warmup_scale(step: int, reset_interval: int, warmup_steps: int) -> float:
    """SPAM's step multiplier at ``step`` (from 1): a cosine ramp from 0.01 after each reset.

    As the official code: ``c`` steps after the latest reset (the reset step itself is
    ``c = 0``) the multiplier is ``1 - 0.99 * (1 + cos(pi * c / (warmup_steps + 1))) / 2``
    while ``c < warmup_steps``, else 1. There is no ramp before the first reset.
    """
    if reset_interval == 0 or step < reset_interval:
        return 1.0
    since = step % reset_interval
    if since >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * since / (warmup_steps + 1))) / 2.0


class ScaleBySpikeAwareAdam(ScaleByAdam):
    """SPAM (Huang et al., arXiv 2501.06842), as TianjinYellow/SPAM-Optimizer.

    At step ``t`` (from 1), with ``T = reset_interval``, ``theta = threshold``:

    - when ``t % T == 0``, Adam's moments are reset to zero (the step count, and with it the
      bias correction, continues);
    - spike clipping: coordinates with ``g**2 > theta * v`` (``v`` the second moment before
      this step's update) become ``sign(g) * sqrt(theta * v)``; it is off for the first
      ``clip_delay`` steps of training and of every reset interval (``v`` is still near zero
      there), and entirely when ``threshold == 0``;
    - Adam with the HF eps form on the clipped gradient, times the cosine warm-up
      :func:`spam_warmup_scale`.

    ``reset_interval == 0`` turns reset and warm-up off. State: ``exp_avg``, ``exp_avg_sq``.
    """

    elementwise = True

    def __init__(self) -> None:
        super().__init__(eps_form="hf")

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """Each tensor's flags of this step (moments reset, spike clipping on) and its warm-up
        multiplier: computed from the step count before a compiled kernel, so that the graph
        holds no function of the symbolic step (the flags specialise it on at most a few
        patterns; the multiplier comes in as a 0-d tensor)."""
        interval, delay = int(ctx.hp("reset_interval")), int(ctx.hp("clip_delay"))
        warmup = int(ctx.hp("warmup_steps"))
        return {
            "reset": [is_reset(t, interval) for t in ctx.steps],
            "clip": [t >= delay and (interval == 0 or t % interval >= delay)
                     for t in ctx.steps],
            "ramp": [spam_warmup_scale(t, interval, warmup) for t in ctx.steps],
        }

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        theta = float(ctx.hp("threshold"))
        numbers = ctx.prelude()
        _zero_moments(ctx, numbers["reset"])
        v = ctx.slot("exp_avg_sq")  # before this step's update
        clipped = []
        for g, vi, clip in zip(updates, v, numbers["clip"]):
            if theta != 0 and clip:
                limit = vi * theta
                g = torch.where(g * g > limit, g.sign() * limit.sqrt(), g)
            clipped.append(g)
        out = super().__call__(ctx, clipped)
        ramp = numbers["ramp"]  # 0-d tensors in a compiled segment: always applied there
        if any(isinstance(r, Tensor) or r != 1.0 for r in ramp):
            torch._foreach_mul_(out, scalars(ramp))
        return out


def stable_spam_steps(step: int, reset_interval: int) -> tuple[int, int]:
    """The official code's restarted step counts at global step ``step``: the one its
    norm/maximum statistics are bias-corrected with, and Adam's.

    The counter restarts at 1 on every reset step (after the statistics used it), so the
    statistics see ``t`` up to the first reset, then ``2, 3, ..., T + 1`` in each interval;
    Adam sees 1 at a reset step (its moments restart there) and the same count otherwise.
    """
    if reset_interval == 0 or step <= reset_interval:
        stats = step
    else:
        stats = (step - 1) % reset_interval + 2
    adam = 1 if is_reset(step, reset_interval) else stats
    return stats, adam


def stable_spam_scale(step: int, total_steps: int | None, eta_min: float) -> float:
    """Stable-SPAM's cosine factor on ``gamma1`` and ``beta1``: from 1 at step 0 down to
    ``eta_min`` at ``total_steps + 1`` (held there afterwards); 1 when ``total_steps`` is None."""
    if total_steps is None:
        return 1.0
    t = min(step, total_steps + 1)
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * t / (total_steps + 1))) / 2.0


class ScaleByStableSPAM(ScaleByAdam):
    """Stable-SPAM (Huang et al., arXiv 2502.17055), as TianjinYellow/StableSPAM.

    Per tensor, at step ``t``, with ``s`` the cosine factor :func:`stable_spam_scale` and the
    step counts of :func:`stable_spam_steps` (``k`` for the statistics, ``k'`` for Adam):

    1. AdaClip: ``m_max = g3 * m_max + (1 - g3) * max|g|``; coordinates with
       ``|g| > M = m_max / (1 - g3**k)`` become ``g / max|g| * M``;
    2. AdaGN: with ``n = ||g||``, ``m_norm = g1 s * m_norm + (1 - g1 s) * n``,
       ``v_norm = g2 * v_norm + (1 - g2) * n**2`` and their bias corrections by
       ``1 - (g1 s)**k`` and ``1 - g2**k``, ``g <- g / n * m_norm_hat / (sqrt(v_norm_hat) + eps)``
       (unchanged when ``n == 0``);
    3. momentum reset every ``reset_interval`` steps: Adam's moments are zeroed before the
       update and its step count restarts at 1;
    4. Adam (torch eps form) with ``beta1 * s`` and step count ``k'``.

    State: ``exp_avg``, ``exp_avg_sq`` and three per-tensor scalars (0-d tensors, no host sync)
    ``m_max``, ``m_norm``, ``v_norm``.
    """

    per_tensor = True

    elementwise = False  # max-clip and norm scaling reduce over the tensor

    STATS = ("m_max", "m_norm", "v_norm")

    def __init__(self, cosine: bool = False) -> None:
        super().__init__(eps_form="torch")
        self.slot_names = (*self.slot_names, *self.STATS)
        # With the cosine factor (``total_steps`` given) Adam's beta1 changes every step, a
        # Python number a compiled kernel would be specialised on (a recompile per step):
        # the transform then runs eagerly in the compiled tier. Without it every number of
        # the step comes from the prelude, and the transform compiles.
        self.compiled = not cosine

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [*super().slots(shape, group, name),
                *(SlotSpec(s, (), "exact") for s in self.STATS)]

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """Each tensor's numbers of this step, from its restarted step counts: the bias
        corrections ``1 - g3**k``, ``1 - (g1 s)**k``, ``1 - g2**k`` of the statistics, the
        reset flags, and Adam's step powers at its own count (:func:`~.base.shifted_powers`)
        (0-d tensors and flags in a compiled segment: the graph holds no function of the
        step)."""
        g1, g2, g3 = (float(ctx.hp(k)) for k in ("gamma1", "gamma2", "gamma3"))
        interval = int(ctx.hp("reset_interval"))
        total, eta_min = ctx.hp("total_steps"), float(ctx.hp("eta_min"))
        counts = [stable_spam_steps(t, interval) for t in ctx.steps]
        g1s = [g1 * stable_spam_scale(t, total, eta_min) for t in ctx.steps]
        return {
            "c_max": [1 - g3**k for k, _ in counts],
            "c_norm": [1 - g**k for g, (k, _) in zip(g1s, counts)],
            "c_sq": [1 - g2**k for k, _ in counts],
            "reset": [is_reset(t, interval) for t in ctx.steps],
            **shifted_powers(ctx, [k for _, k in counts]),
        }

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        g1, g2, g3 = (float(ctx.hp(k)) for k in ("gamma1", "gamma2", "gamma3"))
        eps, interval = float(ctx.hp("eps")), int(ctx.hp("reset_interval"))
        total, eta_min = ctx.hp("total_steps"), float(ctx.hp("eta_min"))
        beta1, beta2 = ctx.hp("betas")[:2]
        m_max, m_norm, v_norm = (ctx.slot(s) for s in self.STATS)
        numbers = ctx.prelude()
        # the cosine factor (1 without total_steps, the only case that runs compiled)
        scale = [stable_spam_scale(t, total, eta_min) for t in ctx.steps] \
            if total is not None else [1.0] * len(updates)
        inputs = []
        for i, g in enumerate(updates):
            peak = g.abs().max()
            m_max[i].mul_(g3).add_(peak, alpha=1 - g3)
            limit = m_max[i] / numbers["c_max"][i]
            g = torch.where(g.abs() > limit, g / peak * limit, g)
            n = torch.linalg.vector_norm(g)
            g1s = g1 * scale[i]
            m_norm[i].mul_(g1s).add_(n, alpha=1 - g1s)
            v_norm[i].mul_(g2).add_(n * n, alpha=1 - g2)
            ratio = (m_norm[i] / numbers["c_norm"][i]) / (
                torch.sqrt(v_norm[i] / numbers["c_sq"][i]) + eps)
            inputs.append(torch.where(n > 0, g / n * ratio, g))
        _zero_moments(ctx, numbers["reset"])
        if torch.compiler.is_compiling():  # Adam's powers come from the prelude's table
            steps = list(ctx.steps)
            return self._adam(ctx, inputs, steps, beta1, beta2,
                              shifted_power_table(ctx, steps))
        counts = [stable_spam_steps(t, interval)[1] for t in ctx.steps]
        if len(set(scale)) == 1 and len(set(counts)) == 1:
            return self._adam(ctx, inputs, counts, beta1 * scale[0], beta2)
        out: list[Tensor] = []  # tensors at different steps: one Adam call each
        for i, u in enumerate(inputs):
            sub = ctx.subset([i])
            sub.keys, sub.transform, sub._loaded = ctx.keys, ctx.transform, ctx._loaded
            out += self._adam(sub, [u], [counts[i]], beta1 * scale[i], beta2)
        return out

    def _adam(self, ctx: StepContext, updates: list[Tensor], steps: list[Any], beta1: float,
              beta2: float, table: Mapping[str, Any] | None = None) -> list[Tensor]:
        """Adam's update with the (scaled) ``beta1`` and the restarted step counts (in a
        compiled segment: ``table``, their powers from the prelude)."""
        inner = copy.copy(ctx)  # shares the slot keys and the list of slots to write back
        inner.steps = steps
        inner.group = {**ctx.group, "betas": (beta1, beta2)}
        for key, value in (table or {}).items():
            setattr(inner, key, value)
        return ScaleByAdam.__call__(self, inner, updates)


class AdaptiveGradClip(Transform):
    """AdaGC (Wang et al., arXiv 2502.11034), as the official PyTorch code (lishuai-97/AdaGC).

    Per tensor ``i`` at its step ``t`` (from 1), with ``gamma_i`` an EMA of its clipped
    gradient norms:

    - warm-up, ``t <= adagc_warmup``: global-norm clipping,
      ``g <- g * min(1, adagc_lambda_abs / (||G|| + eps))`` with ``||G||`` the norm of all
      the step's gradients (every parameter group: ``ctx.global_grad_norm``; the calling
      tensors' own when a caller gives none), and ``gamma_i = min`` of the clipped norms seen
      so far;
    - afterwards, when ``||g_i|| > lambda_rel * gamma_i``:
      ``g_i <- g_i * lambda_rel * gamma_i / (||g_i|| + eps)``, and
      ``gamma_i <- beta * gamma_i + (1 - beta) * min(||g_i||, lambda_rel * gamma_i)``.

    The keys are the shell options ``adagc_lambda_rel``, ``adagc_beta``, ``adagc_lambda_abs``
    and ``adagc_warmup``; ``eps`` is the code's 1e-6. The clipped gradients also replace
    ``ctx.grads`` for the rest of the chain, as the reference clips ``.grad`` in place (the
    tensors themselves are never written). State: ``adagc_norm`` (a 0-d tensor; no host sync).
    """

    per_tensor = True

    slot_names = ("adagc_norm",)

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("adagc_norm", (), "exact")]

    def factors(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        """Each tensor's clipping factor of this step (a 0-d tensor in its dtype: 1 where it
        is not clipped), with the norm averages advanced. The clipped gradient is
        ``updates[i] * factors[i]``; fused kernels take the factor as their gradient scale
        instead of a clipped copy (:mod:`llmvalley.optim.fused`)."""
        lam_rel, beta = float(ctx.hp("adagc_lambda_rel")), float(ctx.hp("adagc_beta"))
        lam_abs, warmup = float(ctx.hp("adagc_lambda_abs")), int(ctx.hp("adagc_warmup"))
        gammas = ctx.slot("adagc_norm")
        early = [i for i, t in enumerate(ctx.steps) if t <= warmup]
        # in the warm-up, the global norm's per-gradient norms where these are the gradients
        # (eager steps: a compiled graph computes its norms in its own loops)
        known = ctx.global_grad_norm.find(updates) if early and ctx.global_grad_norm \
            is not None and not torch.compiler.is_compiling() else None
        norms = torch._foreach_norm(updates) if known is None else known
        out: list[Tensor] = list(norms)
        if early:
            if ctx.global_grad_norm is not None:
                total = ctx.global_grad_norm()
            else:
                dtype = functools.reduce(torch.promote_types, (norms[i].dtype for i in early))
                device = norms[early[0]].device
                total = torch.linalg.vector_norm(
                    torch.stack([norms[i].to(device=device, dtype=dtype) for i in early]))
            coef = (lam_abs / (total + self.eps)).clamp(max=1.0)
            for i in early:
                out[i] = coef.to(norms[i])
                clipped = norms[i] * out[i]  # the norm of the clipped gradient
                if ctx.steps[i] == 1:
                    gammas[i].copy_(clipped)
                else:
                    torch.minimum(gammas[i], clipped, out=gammas[i])
        for i, t in enumerate(ctx.steps):
            if t <= warmup:
                continue
            n, gamma = norms[i], gammas[i]
            if t == 1:  # no warm-up: the first norm starts the average, as in the reference
                gamma.copy_(n)
            limit = gamma * lam_rel
            over = n > limit
            out[i] = torch.where(over, limit / (n + self.eps), 1.0)
            gamma.mul_(beta).add_(torch.where(over, limit, n), alpha=1 - beta)
        return out

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        out = [u * f for u, f in zip(updates, self.factors(ctx, updates))]
        ctx.grads[:] = out
        return out
