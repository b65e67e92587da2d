"""Transforms of the Adam variants and of the classical adaptive methods (Adagrad, RMSprop).

Each returns a direction; the shell applies the learning rate, the weight decay and the step.
Where a method is Adam plus one extra factor, the transform wraps or follows
:class:`~llmvalley.optim.transforms.adaptive.ScaleByAdam` instead of repeating it:

- :class:`Friction` (diffGrad) multiplies an inner chain's direction by a per-coordinate factor;
- :class:`ProjectScaleInvariant` (AdamP, SGDP) removes the radial part of a direction;
- :class:`BiasCorrect` divides by ``1 - beta^t`` (AdamP's Nesterov form);
- :class:`DampedMomentum` is SGDP's zero-initialised heavy ball.

The others keep moments that Adam does not (EXAdam's cross-moment debiasing, FAdam's Fisher
EMA and clipped natural gradient, AdaMomentum's EMA of the squared momentum, TAM's torque,
Ano's sign-driven second moment, Adagrad's sum, RMSprop's averages).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from llmvalley.optim.transforms.base import (
    Shape,
    SlotSpec,
    StepContext,
    Transform,
    root,
    scalars,
)
from llmvalley.optim.transforms.combine import Combinator, chain_paths, chain_slots, run_chain
from llmvalley.optim.transforms.stored import row_aligned, stored_rows, stored_scalars

Group = Mapping[str, Any]


def _rms(x: Tensor) -> Tensor:
    """Root mean square of all entries (0-d tensor)."""
    return x.square().mean().sqrt()


# ---- diffGrad -------------------------------------------------------------------------------
class Friction(Combinator):
    """diffGrad's friction (Dubey et al., arXiv 1909.11015, diffGrad_v2.py).

    Runs ``inner`` (Adam with the HF epsilon form) and multiplies its direction by
    ``xi = sigmoid(|u_prev - u|)``, with ``u`` the chain's input (the gradient, L2 term
    included) and ``u_prev`` the previous one (zero before the first step). Because ``xi``
    multiplies ``m`` only, ``xi * Adam(u)`` is exactly diffGrad's ``(sqrt(bc2)/bc1) xi m /
    (sqrt(v) + eps)``. State: ``previous_grad`` (a copy, not an alias: the paper's code
    aliased it, which made the friction constant).
    """

    elementwise = True

    slot_names = ("previous_grad",)

    def __init__(self, inner: list[Transform]) -> None:
        self.inner = list(inner)

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("previous_grad", shape)]

    def paths(self) -> list[list[Transform]]:
        return [[self, *p] for p in chain_paths(self.inner)]

    def inner_slots(self, shape: Shape, group: Group, name: str = "") -> list:
        return chain_slots(self.inner, shape, group, name)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        prev = ctx.slot("previous_grad")
        friction = [torch.sigmoid((p - u).abs_()) for p, u in zip(prev, updates)]
        for p, u in zip(prev, updates):
            p.copy_(u)
        out = run_chain(self.inner, ctx, updates, ctx.keymap)
        return torch._foreach_mul(out, friction)


# ---- AdamP / SGDP ---------------------------------------------------------------------------
class BiasCorrect(Transform):
    """Divide the update by ``1 - beta^t`` (``beta = group["betas"][beta_index]``)."""

    elementwise = True

    def __init__(self, beta_index: int = 0) -> None:
        self.beta_index = beta_index

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta = ctx.hp("betas")[self.beta_index]
        return torch._foreach_div(updates, scalars([1 - p for p in ctx.powers(beta)]))


class DampedMomentum(Transform):
    """SGDP's momentum (clovaai/AdamP ``sgdp.py``): a heavy ball that starts from zero.

    ``b = momentum * b + (1 - dampening) * u`` (so the first step is ``(1 - dampening) u``,
    unlike torch.optim.SGD, which copies ``u``); the output is ``u + momentum * b`` with
    ``nesterov``, else ``b``. Without momentum no state is kept and the output is
    ``(1 - dampening) u``. State: ``momentum_buffer``.
    """

    elementwise = True

    slot_names = ("momentum_buffer",)

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("momentum_buffer", shape)] if group["momentum"] != 0 else []

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        momentum, keep = ctx.hp("momentum"), 1.0 - ctx.hp("dampening")
        if momentum == 0:
            return torch._foreach_mul(updates, keep)
        bufs = ctx.slot("momentum_buffer")
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, updates, alpha=keep)
        if ctx.hp("nesterov"):
            return torch._foreach_add(updates, bufs, alpha=momentum)
        return bufs


class AlignRows(Transform):
    """The identity on values; in a compiled CPU step it lets the transforms after it update
    their state in the same pass as :class:`ProjectScaleInvariant`'s row sums (see
    :func:`~llmvalley.optim.transforms.stored.row_aligned`). AdamP's chain starts with it;
    SGDP's does not (its default has no state to update, and its compiled step is at 1.15x
    fused AdamW already)."""

    elementwise = True

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        return [row_aligned(u) for u in updates]


class ProjectScaleInvariant(Transform):
    """AdamP/SGDP's projection (Heo et al., ICLR 2021, arXiv 2006.08217; clovaai/AdamP).

    For a tensor of two or more dimensions, the weight is taken as scale-invariant when
    ``max |cos(g, p)| < delta / sqrt(d)`` over its rows (``(out, -1)`` view, ``d`` the row
    length), else over the whole tensor (``d`` its size); the first view that passes is used.
    The direction then loses its component along the (per-row or whole) unit weight, and the
    tensor's weight decay is multiplied by ``wd_ratio``. ``g`` is the gradient and ``p`` the
    weight before the step. With ``decay_over_momentum`` (SGDP) the weight decay of every
    tensor is also divided by ``1 - momentum``, as the reference does.
    """

    per_tensor = True

    def __init__(self, decay_over_momentum: bool = False) -> None:
        self.decay_over_momentum = decay_over_momentum

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        delta, ratio, eps = ctx.hp("delta"), ctx.hp("wd_ratio"), ctx.hp("eps")
        plan = ctx.plan
        traced = torch.compiler.is_compiling()
        out = []
        for i, (u, g, p) in enumerate(zip(updates, ctx.grads, ctx.params)):
            if self.decay_over_momentum:
                plan.weight_decay[i] = plan.weight_decay[i] / (1 - ctx.hp("momentum"))
            if u.ndim < 2:
                out.append(u)
                continue
            if traced:  # the compiled tier: the same choice without a host sync
                u, projected = project_without_sync(u, g, p, delta, eps)
                if plan.weight_decay[i] != 0:
                    plan.weight_decay[i] = plan.weight_decay[i] * stored_scalars(
                        [torch.where(projected, ratio, 1.0)])[0]
                out.append(u)
                continue
            for rows in (p.shape[0], 1):  # per output channel, then the whole layer
                pv, gv = p.reshape(rows, -1), g.reshape(rows, -1)
                cos = F.cosine_similarity(gv, pv, dim=1, eps=eps).abs()
                if cos.max() < delta / math.sqrt(pv.shape[1]):
                    unit = pv / (pv.norm(dim=1, keepdim=True) + eps)
                    uv = u.reshape(rows, -1)
                    uv = uv - unit * (unit * uv).sum(dim=1, keepdim=True)
                    u = uv.reshape(u.shape)
                    plan.weight_decay[i] = plan.weight_decay[i] * ratio
                    break
            out.append(u)
        return out


def project_without_sync(u: Tensor, g: Tensor, p: Tensor, delta: float,
                         eps: float) -> tuple[Tensor, Tensor]:
    """:class:`ProjectScaleInvariant`'s choice and projection of one tensor as tensor
    arithmetic (no branch on a value: what a compiled step runs), and whether it projected.

    Per row ``r`` of the ``(out, -1)`` views, one pass gathers ``g.p``, ``|g|^2``, ``|p|^2``
    and ``p.u``; the whole-tensor sums are their totals. ``cos = g.p / (max(|g|, eps)
    max(|p|, eps))`` is ``F.cosine_similarity``'s, and the projection
    ``u - unit (unit.u)`` with ``unit = p / (|p| + eps)`` is ``u - p (p.u) / (|p| + eps)^2``;
    the per-row projection wins when every row passes, else the whole one when it passes,
    else none (the eager loop's order). Equal to the eager code to float rounding.
    """
    rows = p.shape[0]
    pv, gv, uv = p.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
    sums = torch.stack([(gv * pv).sum(1), (gv * gv).sum(1), (pv * pv).sum(1),
                        (pv * uv).sum(1)])
    gp, gg, pp, pu = sums
    gp_all, gg_all, pp_all, pu_all = sums.sum(1)

    def cosine(dot: Tensor, g2: Tensor, p2: Tensor) -> Tensor:
        return (dot / (g2.sqrt().clamp_min(eps) * p2.sqrt().clamp_min(eps))).abs()

    by_rows = cosine(gp, gg, pp).amax() < delta / math.sqrt(pv.shape[1])
    whole = cosine(gp_all, gg_all, pp_all) < delta / math.sqrt(p.numel())
    coef = torch.where(by_rows, pu / (pp.sqrt() + eps) ** 2,
                       torch.where(whole, pu_all / (pp_all.sqrt() + eps) ** 2, 0.0))
    # stored: inlined, the choice and its square roots ran once per vector of the write
    return (uv - pv * stored_rows(coef)[:, None]).reshape(u.shape), by_rows | whole


# ---- EXAdam ---------------------------------------------------------------------------------
class ScaleByEXAdam(Transform):
    """EXAdam (Adly, arXiv 2412.20302; AhmedMostafa16/EXAdam).

    ``d1 = 1 + beta2^t v / (v + eps)``, ``d2 = 1 + beta1^t m^2 / (m^2 + eps)``;
    ``m~ = d1 m / bc1``, ``v~ = d2 v / bc2``, ``g~ = d1 g / bc1``; the direction is
    ``(m~ + g~) / (sqrt(v~) + eps)``, times ``ln(sqrt(2) sqrt(t + 1))`` with
    ``version=1`` (the first paper version's growing step size). State: ``exp_avg``,
    ``exp_avg_sq`` (the reference's ``m`` and ``v``).
    """

    elementwise = True

    slot_names = ("exp_avg", "exp_avg_sq")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("exp_avg", shape), SlotSpec("exp_avg_sq", shape, "unsigned")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2 = ctx.hp("betas")
        eps, version = ctx.hp("eps"), ctx.hp("version")
        ms, vs = ctx.slot("exp_avg"), ctx.slot("exp_avg_sq")
        torch._foreach_lerp_(ms, updates, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, updates, updates, 1 - beta2)
        out = []
        for g, m, v, t, p1, p2 in zip(updates, ms, vs, ctx.steps, ctx.powers(beta1),
                                      ctx.powers(beta2)):
            m2 = m.square()
            d1 = (v / (v + eps)).mul_(p2).add_(1)
            d2 = (m2 / (m2 + eps)).mul_(p1).add_(1)
            denom = (v * d2).div_(1 - p2).sqrt_().add_(eps)
            step = (m + g).mul_(d1).div_(1 - p1).div_(denom)
            if version == 1:
                step.mul_(math.log(math.sqrt(2.0) * math.sqrt(t + 1)))
            out.append(step)
        return out


# ---- FAdam ----------------------------------------------------------------------------------
class ScaleByFAdam(Transform):
    """FAdam (Hwang, arXiv 2405.12807, Algorithm 1).

    ``beta2_t = beta2 (1 - beta2^(t-1)) / (1 - beta2^t)``; ``f = beta2_t f + (1 - beta2_t)
    g^2`` (the Fisher diagonal); ``eps_t = eps min(1, RMS(g))``; ``d = f^p + eps_t``;
    ``g_nat = g / d`` clipped to ``g_nat / max(1, RMS(g_nat) / clip)``;
    ``m = beta1 m + (1 - beta1) g_nat`` (no bias correction); the weight decay in
    natural-gradient form ``w = theta / d``, clipped the same way; the direction is
    ``m + weight_decay * w``. When a tensor's gradient is all zero, ``eps_t = eps`` (the
    formula's ``0/0`` would poison the momentum). State: ``momentum``, ``fim``.
    """

    per_tensor = True

    slot_names = ("momentum", "fim")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("momentum", shape), SlotSpec("fim", shape, "unsigned")]

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """Each tensor's ``beta2_t`` (computed before a compiled kernel, which would otherwise
        evaluate the powers of the step in its loop)."""
        beta2 = ctx.hp("betas")[1]
        return {"beta2_t": [beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
                            for t in ctx.steps]}

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1 = ctx.hp("betas")[0]
        eps, clip, power = ctx.hp("eps"), ctx.hp("clip"), ctx.hp("p")
        wd = float(ctx.hp("weight_decay"))
        out = []
        for g, m, f, p, beta2_t in zip(updates, ctx.slot("momentum"), ctx.slot("fim"),
                                       ctx.params, ctx.prelude()["beta2_t"]):
            if isinstance(beta2_t, Tensor):  # compiled: a 0-d tensor, which value cannot take
                f.mul_(beta2_t).addcmul_(g, g * (1 - beta2_t))
            else:
                f.mul_(beta2_t).addcmul_(g, g, value=1 - beta2_t)
            grad_rms = _rms(g)
            eps_t = torch.where(grad_rms > 0, eps * grad_rms.clamp(max=1.0), eps)
            denom = f.pow(power).add_(eps_t)
            nat = g / denom
            nat.div_(_rms(nat).div(clip).clamp(min=1.0))
            m.lerp_(nat, 1 - beta1)
            if wd == 0:
                out.append(m)
                continue
            w = p / denom
            w.div_(_rms(w).div(clip).clamp(min=1.0))
            out.append(w.mul_(wd).add_(m))
        return out


# ---- AdaMomentum ----------------------------------------------------------------------------
class ScaleByAdaMomentum(Transform):
    """AdaMomentum (Wang et al., arXiv 2106.11514; wyzjack/AdaM3, non-rectified update).

    ``m = EMA_beta1(g)``; ``v = beta2 v + (1 - beta2) m^2 + eps`` (eps is added into the state,
    as the reference does); with ``amsgrad`` the running maximum of ``v`` is used. The
    direction is ``(m / bc1) / sqrt(v / bc2)``. State: ``exp_avg``, ``exp_avg_var``
    (+ ``max_exp_avg_var``).
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
        m, v = ctx.slot("exp_avg"), ctx.slot("exp_avg_var")
        torch._foreach_lerp_(m, updates, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, m, m, 1 - beta2)
        torch._foreach_add_(v, ctx.hp("eps"))
        second = v
        if ctx.hp("amsgrad"):
            second = ctx.slot("max_exp_avg_var")
            torch._foreach_maximum_(second, v)
        denom = torch._foreach_sqrt(second)
        torch._foreach_mul_(denom, scalars([(1 - p1) / root(1 - p2) for p1, p2
                                            in zip(ctx.powers(beta1), ctx.powers(beta2))]))
        return torch._foreach_div(m, denom)


# ---- TAM ------------------------------------------------------------------------------------
class TorqueAwareMomentum(Transform):
    """Torque-aware momentum (Malviya et al., arXiv 2412.18790, TAM).

    Per tensor: ``c = cos(m_prev, g)`` (0 while either is zero), ``s = gamma s + (1 - gamma)
    c`` with ``gamma = group["decay_rate"]``, ``d = (1 + s) / 2``; then
    ``m = momentum * m + (eps + d) g`` and the direction is ``m``. State:
    ``momentum_buffer`` and the smoothed correlation ``torque``, a one-element tensor in the
    compute dtype, computed on the device without a host sync (so that a compiled step runs
    the whole chain in one function). A checkpoint that holds the torque as a Python float
    (written before it was a tensor) is converted when the slot is first read.
    """

    per_tensor = True

    slot_names = ("momentum_buffer", "torque")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        # one element, not 0-d: inductor drops in-place updates of 0-d float64 CPU tensors,
        # and the compiled tier runs such groups eagerly (llmvalley.optim.compiled)
        return [SlotSpec("momentum_buffer", shape), SlotSpec("torque", (1,), "exact")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta, gamma, eps = ctx.hp("momentum"), ctx.hp("decay_rate"), ctx.hp("eps")
        _float_torque_to_tensor(ctx)
        bufs = ctx.slot("momentum_buffer")
        for g, m, s in zip(updates, bufs, ctx.slot("torque")):
            norms = torch.linalg.vector_norm(m) * torch.linalg.vector_norm(g)
            cos = torch.where(norms > 0, torch.sum(m * g) / norms, 0.0)
            s.mul_(gamma).add_(cos * (1 - gamma))
            m.mul_(beta).add_(g * ((s.view(()) + 1) / 2 + eps))
        return bufs


def _float_torque_to_tensor(ctx: StepContext) -> None:
    """Convert TAM torques stored as Python floats (checkpoints from before the torque was a
    tensor slot) into the one-element tensor the slot now is."""
    key = ctx.key("torque")
    for st, g, dtype in zip(ctx.states, ctx.grads, ctx.dtypes):
        value = st.get(key)
        if value is not None and not isinstance(value, Tensor):
            st[key] = torch.full((1,), float(value), dtype=dtype, device=g.device)


# ---- Ano ------------------------------------------------------------------------------------
class ScaleByAno(Transform):
    """Ano (Kegreisz, arXiv 2508.18258; ano-optimizer 1.0.0).

    ``m = EMA_beta1(g)``; ``v = beta2 v + (1 - beta2) sign(g^2 - v) g^2`` (Yogi-like additive
    second moment); the direction is ``|g| sign(m) / sqrt(v / bc2 + eps)``. With
    ``logarithmic_schedule`` (Anolog) ``beta1 = 1 - 1 / ln(max(2, t))``. State: ``exp_avg``,
    ``exp_avg_sq``.
    """

    elementwise = True

    slot_names = ("exp_avg", "exp_avg_sq")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("exp_avg", shape), SlotSpec("exp_avg_sq", shape, "unsigned")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2 = ctx.hp("betas")
        eps, log_schedule = ctx.hp("eps"), ctx.hp("logarithmic_schedule")
        out = []
        for g, m, v, t, p2 in zip(updates, ctx.slot("exp_avg"), ctx.slot("exp_avg_sq"),
                                  ctx.steps, ctx.powers(beta2)):
            b1 = 1 - 1 / math.log(max(2, t)) if log_schedule else beta1
            m.lerp_(g, 1 - b1)
            sq = g.square()
            v.mul_(beta2).addcmul_(torch.sign(sq - v), sq, value=1 - beta2)
            denom = (v / (1 - p2)).add_(eps).sqrt_()
            out.append(g.abs().mul_(torch.sign(m)).div_(denom))
        return out


# ---- Adagrad / RMSprop ----------------------------------------------------------------------
class ScaleByAdagrad(Transform):
    """Adagrad (Duchi, Hazan, Singer, JMLR 2011), as torch.optim.Adagrad.

    ``s += g^2`` (``s`` starts at ``initial_accumulator_value``); the direction is
    ``g / (sqrt(s) + eps) / (1 + (t - 1) lr_decay)``. State: ``sum``.
    """

    elementwise = True

    slot_names = ("sum",)

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("sum", shape, "unsigned")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        sums = ctx.slot("sum")
        start = ctx.hp("initial_accumulator_value")
        for s, fresh in zip(sums, ctx.fresh("sum")):
            if fresh:
                s.fill_(start)
        torch._foreach_addcmul_(sums, updates, updates)
        denom = torch._foreach_sqrt(sums)
        torch._foreach_add_(denom, ctx.hp("eps"))
        decay = ctx.hp("lr_decay")
        torch._foreach_mul_(denom, scalars([1 + (t - 1) * decay for t in ctx.steps]))
        return torch._foreach_div(updates, denom)


class ScaleByRMSprop(Transform):
    """RMSprop (Hinton, Coursera lecture 6e), as torch.optim.RMSprop.

    ``v = alpha v + (1 - alpha) g^2``; with ``centered``, ``a = EMA_alpha(g)`` and the
    denominator is ``sqrt(v - a^2) + eps``, else ``sqrt(v) + eps``. With ``momentum > 0``,
    ``b = momentum b + g / denom`` is the direction, else ``g / denom``. State:
    ``square_avg`` (+ ``grad_avg``, + ``momentum_buffer``).
    """

    elementwise = True

    slot_names = ("square_avg", "grad_avg", "momentum_buffer")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        out = [SlotSpec("square_avg", shape, "unsigned")]
        if group["centered"]:
            out.append(SlotSpec("grad_avg", shape))
        if group["momentum"] > 0:
            out.append(SlotSpec("momentum_buffer", shape))
        return out

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        alpha, eps, momentum = ctx.hp("alpha"), ctx.hp("eps"), ctx.hp("momentum")
        sq = ctx.slot("square_avg")
        torch._foreach_mul_(sq, alpha)
        torch._foreach_addcmul_(sq, updates, updates, 1 - alpha)
        if ctx.hp("centered"):
            avg = ctx.slot("grad_avg")
            torch._foreach_lerp_(avg, updates, 1 - alpha)
            denom = torch._foreach_addcmul(sq, avg, avg, -1)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(sq)
        torch._foreach_add_(denom, eps)
        step = torch._foreach_div(updates, denom)
        if momentum > 0:
            bufs = ctx.slot("momentum_buffer")
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, step)
            return bufs
        return step
