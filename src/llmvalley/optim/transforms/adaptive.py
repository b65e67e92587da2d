"""Second-moment (adaptive) transforms: Adam and its published relatives.

Each returns the *direction*; the shell multiplies it by the learning rate.
Two epsilon conventions exist in the field and are named explicitly:

- ``"torch"``: ``(m / bc1) / (sqrt(v / bc2) + eps)`` (torch.optim.Adam/AdamW),
- ``"hf"``: ``(sqrt(bc2) / bc1) * m / (sqrt(v) + eps)`` (HF AdamW, Grams, SOAP, C-AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import (
    Shape,
    SlotSpec,
    StepContext,
    Transform,
    add_each_,
    add_scaled_,
    root,
    scalars,
)

Group = Mapping[str, Any]


class ScaleByAdam(Transform):
    """Adam's bias-corrected first moment over the root of the second moment.

    ``first_moment="ema"`` (default): ``m = EMA_beta1(u)``, ``v = EMA_beta2(u^2)`` of the
    input. ``first_moment="input"``: the input already is the (debiased) first moment, kept
    elsewhere (Conda keeps it outside its basis, COSMOS sums it with Nesterov); then ``v`` is
    the EMA of the squared *gradient* (``ctx.grads``, projected when run inside a basis) and
    no ``bc1`` applies. State: ``exp_avg`` (``ema`` only), ``exp_avg_sq`` and, with
    ``group["amsgrad"]``, ``max_exp_avg_sq`` (the running maximum of the uncorrected second
    moment, as torch.optim.Adam). ``debias=False``: ``m / (sqrt(v) + eps)``, neither moment
    corrected (Prodigy, whose own rate carries the correction).
    """

    elementwise = True

    def __init__(self, eps_form: str = "torch", first_moment: str = "ema",
                 debias: bool = True) -> None:
        if eps_form not in ("torch", "hf"):
            raise ValueError(f"eps_form must be 'torch' or 'hf', got {eps_form!r}")
        if first_moment not in ("ema", "input"):
            raise ValueError(f"first_moment must be 'ema' or 'input', got {first_moment!r}")
        self.eps_form = eps_form
        self.first_moment = first_moment
        self.debias = debias
        own = ("exp_avg",) if first_moment == "ema" else ()
        self.slot_names = (*own, "exp_avg_sq", "max_exp_avg_sq")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        out = [SlotSpec("exp_avg", shape)] if self.first_moment == "ema" else []
        out.append(SlotSpec("exp_avg_sq", shape, "unsigned"))
        if group.get("amsgrad", False):
            out.append(SlotSpec("max_exp_avg_sq", shape, "unsigned"))
        return out

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2 = ctx.hp("betas")[:2]
        eps = ctx.hp("eps")
        v = ctx.slot("exp_avg_sq")
        if self.first_moment == "ema":
            m = ctx.slot("exp_avg")
            torch._foreach_lerp_(m, updates, 1 - beta1)
            source = updates
        else:
            m, source = updates, ctx.grads
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, source, source, 1 - beta2)
        second = v
        if ctx.group.get("amsgrad", False):
            second = ctx.slot("max_exp_avg_sq")
            torch._foreach_maximum_(second, v)
        denom = torch._foreach_sqrt(second)
        if not self.debias:  # m / (sqrt(v) + eps): the caller scales the step itself
            add_each_(denom, eps)
            return torch._foreach_div(m, denom)
        bc1 = [1 - p for p in ctx.powers(beta1)] if self.first_moment == "ema" \
            else [1.0] * len(updates)
        bc2 = [1 - p for p in ctx.powers(beta2)]
        if self.eps_form == "torch":
            # (m / bc1) / (sqrt(v / bc2) + eps) with bc1 folded into the denominator
            torch._foreach_mul_(denom, scalars([b1 / root(b2) for b1, b2 in zip(bc1, bc2)]))
            add_each_(denom, scalars([eps * b1 for b1 in bc1]))
            out = torch._foreach_div(m, denom)
        else:
            add_each_(denom, eps)
            out = torch._foreach_div(m, denom)
            torch._foreach_mul_(out, scalars([root(b2) / b1 for b1, b2 in zip(bc1, bc2)]))
        return out


class ScaleByNAdam(Transform):
    """NAdam with the momentum-decay schedule of torch.optim.NAdam (Dozat 2016).

    ``mu_t = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay))``; the direction is
    ``(1 - mu_t) / (1 - prod mu) * g / d + mu_{t+1} / (1 - prod mu * mu_{t+1}) * m / d`` with
    ``d = sqrt(v / bc2) + eps``. State: ``exp_avg``, ``exp_avg_sq`` and the running product
    ``mu_product`` (a Python float, so it adds no tensor memory).
    """

    elementwise = True

    slot_names = ("exp_avg", "exp_avg_sq", "mu_product")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("exp_avg", shape), SlotSpec("exp_avg_sq", shape, "unsigned"),
                SlotSpec("mu_product", None, init=1.0)]

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """The gradient and momentum coefficients and ``1 - beta2**t``; advances
        ``mu_product``."""
        beta1, beta2 = ctx.hp("betas")
        decay = ctx.hp("momentum_decay")
        grad_coef, mom_coef = [], []
        for i, t in enumerate(ctx.steps):
            mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * decay))
            mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * decay))
            product = ctx.scalar("mu_product", i) * mu
            ctx.set_scalar("mu_product", i, product)
            grad_coef.append((1.0 - mu) / (1.0 - product))
            mom_coef.append(mu_next / (1.0 - product * mu_next))
        return {"grad": grad_coef, "momentum": mom_coef,
                "bc2": [1 - beta2**t for t in ctx.steps]}

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2 = ctx.hp("betas")
        eps = ctx.hp("eps")
        m, v = ctx.slot("exp_avg"), ctx.slot("exp_avg_sq")
        coef = ctx.prelude()
        torch._foreach_lerp_(m, updates, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, updates, updates, 1 - beta2)
        denom = torch._foreach_div(v, scalars(coef["bc2"]))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        out = torch._foreach_mul(updates, scalars(coef["grad"]))
        torch._foreach_add_(out, torch._foreach_mul(m, scalars(coef["momentum"])))
        torch._foreach_div_(out, denom)
        return out


class ScaleByAdaBelief(Transform):
    """AdaBelief (Zhuang et al., NeurIPS'20), as adabelief-pytorch 0.2.1.

    ``s = beta2 * s + (1 - beta2) * (g - m)**2 + eps`` (eps is added into the state, as the
    reference does); the direction is ``(m / bc1) / (sqrt(s / bc2) + eps)``. With
    ``rectify`` (the reference default) RAdam's variance rectification applies: while the
    approximated SMA length is below 5 the step is SGD with momentum (``degenerated_to_sgd``)
    or no step. With ``amsgrad`` the running maximum of ``s`` is used in both branches (the
    reference ignores it in the rectified branch, which the paper does not intend).
    State: ``exp_avg``, ``exp_avg_var`` (+ ``max_exp_avg_var``).
    """

    elementwise = True

    slot_names = ("exp_avg", "exp_avg_var", "max_exp_avg_var")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        out = [SlotSpec("exp_avg", shape), SlotSpec("exp_avg_var", shape, "unsigned")]
        if group["amsgrad"]:
            out.append(SlotSpec("max_exp_avg_var", shape, "unsigned"))
        return out

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2 = ctx.hp("betas")
        eps = ctx.hp("eps")
        m, s = ctx.slot("exp_avg"), ctx.slot("exp_avg_var")
        torch._foreach_lerp_(m, updates, 1 - beta1)
        residual = torch._foreach_sub(updates, m)
        torch._foreach_mul_(s, beta2)
        torch._foreach_addcmul_(s, residual, residual, 1 - beta2)
        torch._foreach_add_(s, eps)
        second = s
        if ctx.hp("amsgrad"):
            second = ctx.slot("max_exp_avg_var")
            torch._foreach_maximum_(second, s)
        out = []
        numbers = ctx.prelude()
        for mi, di, mode, a, b in zip(m, second, numbers["mode"], numbers["a"], numbers["b"]):
            if mode == "adam":  # (m / bc1) / (sqrt(s / bc2) + eps)
                out.append(mi / ((di.sqrt() / a).add_(eps)) / b)
            elif mode == "rectified":
                out.append(mi / di.sqrt().add_(eps) * a)
            elif mode == "sgd":
                out.append(mi / b)
            else:
                out.append(torch.zeros_like(mi))
        return out

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """Each tensor's branch at its step (``"adam"`` without rectification; else
        ``"rectified"`` once the SMA length reaches 5, before that ``"sgd"`` or ``"none"``)
        and its two numbers: ``sqrt(bc2)`` and ``bc1`` (adam), ``r / bc1`` (rectified),
        ``bc1`` (sgd)."""
        beta1, beta2 = ctx.hp("betas")
        rectify, to_sgd = ctx.hp("rectify"), ctx.hp("degenerated_to_sgd")
        modes, first, second = [], [], []
        for t in ctx.steps:
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            if not rectify:
                modes.append("adam")
                first.append(math.sqrt(bc2))
                second.append(bc1)
                continue
            sma_max = 2 / (1 - beta2) - 1
            sma = sma_max - 2 * t * beta2**t / bc2
            if sma >= 5:
                r = math.sqrt(
                    bc2 * (sma - 4) / (sma_max - 4) * (sma - 2) / sma * sma_max / (sma_max - 2)
                )
                modes.append("rectified")
                first.append(r / bc1)
                second.append(1.0)
            else:
                modes.append("sgd" if to_sgd else "none")
                first.append(1.0)
                second.append(bc1)
        return {"mode": modes, "a": first, "b": second}


class ScaleByLaProp(Transform):
    """LaProp (Ziyin, Wang, Ueda, arXiv 2002.04839), as the official code.

    Normalise first, then average: ``u = g / (sqrt(v / bc2) + eps)``,
    ``m = beta1 * m + (1 - beta1) * lr * u``. Because the momentum accumulates ``lr * u``,
    its bias correction is the EMA of past learning rates (``exp_avg_lr``, a float in the
    state), so the output, multiplied by ``lr`` later, is ``m / exp_avg_lr``.
    State: ``exp_avg``, ``exp_avg_sq`` (+ ``max_exp_avg_sq`` with amsgrad).
    """

    elementwise = True

    slot_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_avg_lr")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        out = [SlotSpec("exp_avg", shape), SlotSpec("exp_avg_sq", shape, "unsigned")]
        if group["amsgrad"]:
            out.append(SlotSpec("max_exp_avg_sq", shape, "unsigned"))
        return [*out, SlotSpec("exp_avg_lr", None)]

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """The learning-rate average (advanced), ``(1 - beta1) * lr``, whether ``lr`` is 0,
        and ``1 - beta2**t``."""
        beta1, beta2 = ctx.hp("betas")
        lr = float(ctx.hp("lr"))
        lr_avgs = []
        for i in range(len(ctx.steps)):
            avg = ctx.scalar("exp_avg_lr", i) * beta1 + (1 - beta1) * lr
            ctx.set_scalar("exp_avg_lr", i, avg)
            lr_avgs.append(avg)
        n = len(ctx.steps)
        return {"lr_avg": lr_avgs, "rate": [(1 - beta1) * lr] * n, "zero": [lr == 0] * n,
                "bc2": [1 - beta2**t for t in ctx.steps]}

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2 = ctx.hp("betas")
        eps = ctx.hp("eps")
        m, v = ctx.slot("exp_avg"), ctx.slot("exp_avg_sq")
        coef = ctx.prelude()
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, updates, updates, 1 - beta2)
        second = v
        if ctx.hp("amsgrad"):
            second = ctx.slot("max_exp_avg_sq")
            torch._foreach_maximum_(second, v)
        denom = torch._foreach_div(second, scalars(coef["bc2"]))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        step = torch._foreach_div(updates, denom)
        torch._foreach_mul_(m, beta1)
        add_scaled_(m, step, coef["rate"][0])
        if coef["zero"][0]:
            return torch._foreach_mul(m, 0.0)
        return torch._foreach_div(m, scalars(coef["lr_avg"]))


def _linear_warmup(step: int, end: float, start: float, warmup: int) -> float:
    if step < warmup:
        a = step / float(warmup)
        return (1.0 - a) * start + a * end
    return end


def _half_life_warmup(step: int, end: float, start: float, warmup: int) -> float:
    """AdEMAMix's beta3 scheduler: linear in the half-life ``ln(0.5)/ln(beta) - 1``."""

    def half_life(beta: float) -> float:
        return math.log(0.5) / math.log(beta + 1e-8) - 1

    if step < warmup:
        a = step / float(warmup)
        return math.pow(0.5, 1 / ((1.0 - a) * half_life(start) + a * half_life(end) + 1))
    return end


class ScaleByAdEMAMix(Transform):
    """AdEMAMix (Pagliardini, Ablin, Grangier, arXiv 2409.03113), as apple/ml-ademamix.

    Mixes a fast bias-corrected EMA with a slow, uncorrected one:
    ``((m1 / bc1) + alpha * m2) / (sqrt(v / bc2) + eps)``. ``alpha`` ramps linearly over
    ``alpha_warmup`` steps and ``beta3`` over ``beta3_warmup`` steps (linear in half-life,
    starting from ``beta1``). State: ``exp_avg_fast`` (absent when ``beta1 == 0``),
    ``exp_avg_slow``, ``exp_avg_sq``.
    """

    elementwise = True

    slot_names = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        fast = [SlotSpec("exp_avg_fast", shape)] if group["betas"][0] != 0 else []
        return [*fast, SlotSpec("exp_avg_slow", shape), SlotSpec("exp_avg_sq", shape, "unsigned")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2, beta3_final = ctx.hp("betas")
        eps, alpha_final = ctx.hp("eps"), ctx.hp("alpha")
        alpha_warmup, beta3_warmup = ctx.hp("alpha_warmup"), ctx.hp("beta3_warmup")
        slow, v = ctx.slot("exp_avg_slow"), ctx.slot("exp_avg_sq")
        if beta1 != 0:
            fast = ctx.slot("exp_avg_fast")
            torch._foreach_lerp_(fast, updates, 1 - beta1)
        else:
            fast = updates
        alphas, beta3s = [], []
        for t in ctx.steps:
            alphas.append(
                alpha_final if alpha_warmup is None
                else _linear_warmup(t, alpha_final, 0.0, alpha_warmup)
            )
            beta3s.append(
                beta3_final if beta3_warmup is None
                else _half_life_warmup(t, beta3_final, beta1, beta3_warmup)
            )
        torch._foreach_lerp_(slow, updates, scalars([1 - b for b in beta3s]))
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, updates, updates, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, scalars([root(1 - p) for p in ctx.powers(beta2)]))
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(fast, scalars([1 - p for p in ctx.powers(beta1)]))
        torch._foreach_add_(out, torch._foreach_mul(slow, scalars(alphas)))
        torch._foreach_div_(out, denom)
        return out


class ScaleByAdan(Transform):
    """Adan (Xie et al., arXiv 2208.06677), as sail-sg/Adan with the code's betas.

    With ``(b1, b2, b3) = group["betas"]`` (the code's convention: 1 minus the paper's) and
    ``d_g = g - g_prev`` (zero at the first step):
    ``m = EMA_b1(g)``, ``d = EMA_b2(d_g)``, ``n = EMA_b3((g + b2 * d_g)**2)``; the direction is
    ``(m / bc1 + b2 * d / bc2) / (sqrt(n / bc3) + eps)``.
    State: ``exp_avg``, ``exp_avg_diff``, ``exp_avg_sq``, ``prev_grad``.
    """

    elementwise = True

    slot_names = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("exp_avg", shape), SlotSpec("exp_avg_diff", shape),
                SlotSpec("exp_avg_sq", shape, "unsigned"), SlotSpec("prev_grad", shape)]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2, beta3 = ctx.hp("betas")
        eps = ctx.hp("eps")
        prev = ctx.slot("prev_grad")
        for buf, u, fresh in zip(prev, updates, ctx.fresh("prev_grad")):
            if fresh:  # the first difference is zero
                buf.copy_(u)
        m, d, n = ctx.slot("exp_avg"), ctx.slot("exp_avg_diff"), ctx.slot("exp_avg_sq")
        diff = torch._foreach_sub(updates, prev)
        torch._foreach_lerp_(m, updates, 1 - beta1)
        torch._foreach_lerp_(d, diff, 1 - beta2)
        torch._foreach_mul_(diff, beta2)
        torch._foreach_add_(diff, updates)
        torch._foreach_mul_(n, beta3)
        torch._foreach_addcmul_(n, diff, diff, 1 - beta3)
        for p_buf, u in zip(prev, updates):
            p_buf.copy_(u)
        denom = torch._foreach_sqrt(n)
        torch._foreach_div_(denom, scalars([root(1 - p) for p in ctx.powers(beta3)]))
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(m, scalars([1 - p for p in ctx.powers(beta1)]))
        torch._foreach_add_(
            out, torch._foreach_mul(d, scalars([beta2 / (1 - p) for p in ctx.powers(beta2)]))
        )
        torch._foreach_div_(out, denom)
        return out

