"""Parameter-free and model-based step sizes: Prodigy, D-Adaptation (Adam), DoG/LDoG, MoMo.

These methods estimate the step size from statistics summed over *all* tensors of a parameter
group (Prodigy's and D-Adaptation's distance estimate ``d``, DoG's ``rbar`` and ``G``, MoMo's
loss average). Such a group-level number is declared as a float slot that every tensor of the
group keeps a copy of (no tensor memory, checkpointed with the state); it is read from the
tensor that stepped last (:func:`shared`) and written to all (:func:`set_shared`). The
references keep them in ``param_groups`` instead, and Prodigy, D-Adaptation and MoMo share
them across *all* groups of the optimizer: here each group has its own (see the catalogue
notes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import (
    Shape,
    SlotSpec,
    StepContext,
    Transform,
    add_scaled_,
    float_totals,
    numel,
)
from llmvalley.optim.transforms.combine import Combinator, chain_paths, chain_slots, run_chain

Group = Mapping[str, Any]


def shared(ctx: StepContext, name: str) -> float:
    """A group-level float slot: the copy of the tensor with the highest step count."""
    latest = max(range(len(ctx.steps)), key=ctx.steps.__getitem__)
    return ctx.scalar(name, latest)


def set_shared(ctx: StepContext, name: str, value: float) -> None:
    for i in range(len(ctx.steps)):
        ctx.set_scalar(name, i, value)


class Overlay(Mapping):
    """A parameter group with some values replaced (``eps`` scaled by Prodigy's ``d``)."""

    def __init__(self, group: Group, values: Mapping[str, Any]) -> None:
        self.group, self.values = group, values

    def __getitem__(self, key: str) -> Any:
        return self.values[key] if key in self.values else self.group[key]

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(self.group), **dict.fromkeys(self.values)})

    def __len__(self) -> int:
        return len(set(self.group) | set(self.values))


def each(ctx: StepContext, **values: Any) -> dict[str, list[Any]]:
    """A prelude's group-level numbers, one copy per tensor (a prelude gives per-tensor
    numbers; equal ones reach a compiled kernel as one 0-d tensor)."""
    n = len(ctx.steps)
    return {k: [v] * n for k, v in values.items()}


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


# ---- Prodigy ------------------------------------------------------------------------------
class ProdigyStep(Combinator):
    """Prodigy's step size (Mishchenko & Defazio, arXiv 2306.06101), as prodigyopt 1.1.2.

    With the group's ``d`` (from ``d0``), ``dlr = d * lr * bc`` (``bc = sqrt(bc2) / bc1`` with
    ``use_bias_correction``, else 1) and ``g_s`` every ``slice_p``-th gradient entry::

        r = beta3 r + (d / d0) dlr <g_s, p0_s - p_s>,   s = beta3 s + (d / d0) dlr g_s
        d_hat = d_coef r / |s|_1;  d = max(d, d_hat) while d == d0;  d_max = max(d_max, d_hat)
        d = min(d_max, d * growth_rate)

    (``safeguard_warmup``: ``s`` grows by ``(d / d0) d g_s``). ``inner`` (Adam without bias
    correction, ``ScaleByAdam(debias=False)``) then runs on ``d_old * g`` with ``eps`` replaced
    by ``d_new * eps``: its moments are Prodigy's ``d``-weighted ones, ``m / (sqrt(v) + d eps)``,
    and the step is ``lr * d_old * bc`` times that; with ``beta1 = 0`` the reference takes
    ``d_new`` instead of ``d_old`` in the direction, and so does this (the plan's scale).
    State: ``s`` and ``p0`` (the sliced initial point, ``"exact"``), and group-level floats
    ``d``, ``d_max``, ``d_numerator``.

    The float state is read in :meth:`gather_prelude` (before the sums) and advanced in
    :meth:`prelude` (after them); :meth:`gather` and ``__call__`` only do tensor work, so the
    compiled tier compiles both (:attr:`compiled_gather`).
    """

    slot_names = ("s", "p0", "d", "d_max", "d_numerator")
    shared_stats = True
    compiled_gather = True

    def __init__(self, inner: list[Transform]) -> None:
        self.inner = list(inner)

    def paths(self) -> list[list[Transform]]:
        return [[self, *p] for p in chain_paths(self.inner)]

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        n = -(-numel(shape) // int(group["slice_p"]))
        d0 = float(group["d0"])
        return [SlotSpec("s", (n,)), SlotSpec("p0", (n,), "exact"),
                SlotSpec("d", None, init=d0), SlotSpec("d_max", None, init=d0),
                SlotSpec("d_numerator", None)]

    def inner_slots(self, shape, group, name=""):
        return chain_slots(self.inner, shape, group, name)

    @staticmethod
    def _beta3(ctx: StepContext) -> float:
        beta3 = ctx.hp("beta3")
        return math.sqrt(ctx.hp("betas")[1]) if beta3 is None else float(beta3)

    def _rates(self, ctx: StepContext) -> tuple[float, float, float]:
        """``(d, dlr, bc)`` of this step (from the float state: eagerly)."""
        beta1, beta2 = ctx.hp("betas")
        d = shared(ctx, "d")
        t = max(ctx.steps)
        bc = math.sqrt(1 - beta2**t) / (1 - beta1**t) if ctx.hp("use_bias_correction") else 1.0
        return d, d * float(ctx.hp("lr")) * bc, bc

    def gather_prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """``weight = (d / d0) dlr`` (the numerator term's factor), ``grow`` (``s``'s) and
        whether the group is frozen (lr 0: it adds nothing, as in the reference)."""
        d, dlr, _ = self._rates(ctx)
        d0 = float(ctx.hp("d0"))
        grow = (d / d0) * (d if ctx.hp("safeguard_warmup") else dlr)
        return each(ctx, weight=(d / d0) * dlr, grow=grow, frozen=float(ctx.hp("lr")) == 0.0)

    def gather(self, ctx: StepContext, updates: list[Tensor]) -> dict[str, Tensor]:
        """This group's ``<g, p0 - p>`` term and ``|s|_1`` (``s`` updated), as 0-d float64
        tensors."""
        nums = ctx.prelude(gather=True)
        if nums["frozen"][0]:
            zero = updates[0].new_zeros((), dtype=torch.float64)
            return {"delta": zero, "denom": zero}
        weight, grow = nums["weight"][0], nums["grow"][0]
        beta3, stride = self._beta3(ctx), int(ctx.hp("slice_p"))
        delta: Any = 0.0
        denom: Any = 0.0
        for p, g, s, p0, fresh in zip(ctx.params, updates, ctx.slot("s"), ctx.slot("p0"),
                                      ctx.fresh("p0")):
            p_s, g_s = p.reshape(-1)[::stride], g.reshape(-1)[::stride]
            if fresh:
                p0.copy_(p_s)
            delta = delta + weight * torch.dot(g_s, p0 - p_s).double()
            add_scaled_(s.mul_(beta3), g_s, grow)
            denom = denom + s.abs().sum().double()
        return {"delta": delta, "denom": denom}

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """The new ``d`` from the sums over every group (``ctx.totals``), with the float state
        advanced; the numbers ``__call__`` needs."""
        beta1 = ctx.hp("betas")[0]
        d, _, bc = self._rates(ctx)
        d0 = float(ctx.hp("d0"))
        delta, denom = ctx.totals["delta"], ctx.totals["denom"]
        numerator = shared(ctx, "d_numerator") * self._beta3(ctx)
        d_old = d
        if denom > 0:
            numerator += delta
            d_hat = float(ctx.hp("d_coef")) * numerator / denom
            d_max = shared(ctx, "d_max")
            if d == d0:
                d = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d = min(d_max, d * float(ctx.hp("growth_rate")))
            set_shared(ctx, "d_numerator", numerator)
            set_shared(ctx, "d", d)
            set_shared(ctx, "d_max", d_max)
        # with beta1 = 0 the reference's direction holds the new d (the plan's scale)
        scale = d / d_old if beta1 == 0 else 1.0
        return each(ctx, d_old=d_old, eps=d * ctx.hp("eps"), scale=scale, rate=d_old * bc,
                    frozen=float(ctx.hp("lr")) == 0.0, skip=denom == 0)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        if ctx.totals is None and ctx.preludes is None:  # run alone: this group's sums
            ctx.totals = float_totals(self.gather(ctx, updates))
        nums = ctx.prelude()
        n = len(updates)
        if nums["frozen"][0]:  # a frozen group: no state update, no step
            return [torch.zeros_like(u) for u in updates]
        scaled = torch._foreach_mul(updates, nums["d_old"][0])
        inner_ctx = ctx.subset(list(range(n)), group=Overlay(ctx.group, {"eps": nums["eps"][0]}))
        inner_ctx.plan = ctx.plan
        out = run_chain(self.inner, inner_ctx, scaled, ctx.keymap)
        if nums["skip"][0]:  # no gradient seen yet: the reference skips the step (moments updated)
            ctx.plan.weight_decay = [0.0] * n
            return [torch.zeros_like(u) for u in out]
        scale, rate = nums["scale"][0], nums["rate"][0]
        if isinstance(scale, Tensor) or scale != 1.0:
            ctx.plan.scale = [s * scale for s in ctx.plan.scale]
        ctx.plan.lr_mult = [m * rate for m in ctx.plan.lr_mult]
        return out


# ---- D-Adaptation Adam ----------------------------------------------------------------------
class DAdaptAdam(Transform):
    """D-Adapt Adam (Defazio & Mishchenko, arXiv 2301.07733), as dadaptation 3.2.

    With ``dlr = d * lr * bc`` (``bc = sqrt(bc2) / bc1`` with ``use_bias_correction``) and the
    group's ``layer_scale`` ``r``::

        num = sqrt(b2) num + (1 - sqrt(b2)) sum_i r dlr <g, s / (sqrt(v) + eps)>   (v before)
        m = b1 m + (1 - b1) r dlr g,   v = b2 v + (1 - b2) g^2,
        s = sqrt(b2) s + (1 - sqrt(b2)) dlr g
        d = max(d, min(num / ((1 - sqrt(b2)) r |s|_1), d * growth_rate))

    and the step is ``p -= m / (sqrt(v) + eps)``: the learning rate is inside ``m``, so the
    direction is absolute; decoupled weight decay shrinks by ``wd * dlr`` (through the plan's
    ``lr_mult = dlr / lr``, which an absolute step does not use). The moments are kept
    here rather than in :class:`~.adaptive.ScaleByAdam` because their arrangement differs:
    ``m`` accumulates ``dlr``-weighted gradients, neither moment is bias-corrected, and the
    numerator needs ``v`` before its update. State: ``s``, ``exp_avg``, ``exp_avg_sq``, and
    group-level floats ``d`` and ``numerator_weighted`` (read in :meth:`gather_prelude`,
    advanced in :meth:`prelude`, so that both passes compile: :attr:`compiled_gather`).
    """

    slot_names = ("s", "exp_avg", "exp_avg_sq", "d", "numerator_weighted")
    shared_stats = True
    compiled_gather = True

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("s", shape), SlotSpec("exp_avg", shape),
                SlotSpec("exp_avg_sq", shape, "unsigned"),
                SlotSpec("d", None, init=float(group["d0"])),
                SlotSpec("numerator_weighted", None)]

    def _dlr(self, ctx: StepContext) -> float:
        beta1, beta2 = ctx.hp("betas")
        t = max(ctx.steps)
        bc = math.sqrt(1 - beta2**t) / (1 - beta1**t) if ctx.hp("use_bias_correction") else 1.0
        return shared(ctx, "d") * float(ctx.hp("lr")) * bc

    def gather_prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        return each(ctx, dlr=self._dlr(ctx), frozen=not float(ctx.hp("lr")) > 0)

    def gather(self, ctx: StepContext, updates: list[Tensor]) -> dict[str, Any]:
        """Update the moments and ``s``; this group's numerator term and ``r |s|_1`` (0-d
        float64 tensors)."""
        nums = ctx.prelude(gather=True)
        if nums["frozen"][0]:
            zero = updates[0].new_zeros((), dtype=torch.float64)
            return {"acc": zero, "l1": zero}
        beta1, beta2 = ctx.hp("betas")
        eps, r = ctx.hp("eps"), float(ctx.hp("layer_scale"))
        dlr, root = nums["dlr"][0], math.sqrt(beta2)
        acc: Any = 0.0
        l1: Any = 0.0
        for g, m, v, s in zip(updates, ctx.slot("exp_avg"), ctx.slot("exp_avg_sq"),
                              ctx.slot("s")):
            acc = acc + r * dlr * torch.dot(g.reshape(-1),
                                            (s / (v.sqrt() + eps)).reshape(-1)).double()
            add_scaled_(m.mul_(beta1), g, r * dlr * (1 - beta1))
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            add_scaled_(s.mul_(root), g, dlr * (1 - root))
            l1 = l1 + r * s.abs().sum().double()
        return {"acc": acc, "l1": l1}

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """The new ``d`` from the sums over every group (``ctx.totals``), with the float state
        advanced (not while nothing has been learnt: the reference then takes no step)."""
        _, beta2 = ctx.hp("betas")
        lr = float(ctx.hp("lr"))
        d, dlr, root = shared(ctx, "d"), self._dlr(ctx), math.sqrt(beta2)
        acc, l1 = ctx.totals["acc"], ctx.totals["l1"]
        if l1 != 0:
            weighted = root * shared(ctx, "numerator_weighted") + (1 - root) * acc
            d = max(d, min(weighted / ((1 - root) * l1), d * float(ctx.hp("growth_rate"))))
            set_shared(ctx, "numerator_weighted", weighted)
            set_shared(ctx, "d", d)
        return each(ctx, skip=l1 == 0, frozen=lr == 0, rate=dlr / lr if lr else 0.0)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        if ctx.totals is None and ctx.preludes is None:  # run alone: this group's sums
            ctx.totals = float_totals(self.gather(ctx, updates))
        nums = ctx.prelude()
        n = len(updates)
        if nums["skip"][0] or nums["frozen"][0]:  # no step (a frozen group's d still moves)
            ctx.plan.weight_decay = [0.0] * n
            return [torch.zeros_like(u) for u in updates]
        eps, rate = ctx.hp("eps"), nums["rate"][0]
        out = []
        for i, (m, v) in enumerate(zip(ctx.slot("exp_avg"), ctx.slot("exp_avg_sq"))):
            out.append(m / (v.sqrt() + eps))
            ctx.plan.absolute[i] = True  # the step ignores lr_mult; the decay rate is dlr
            ctx.plan.lr_mult[i] = ctx.plan.lr_mult[i] * rate
        return out


# ---- DoG / LDoG -----------------------------------------------------------------------------
class DoGStep(Transform):
    """DoG's step size (Ivgi, Hinder, Carmon, arXiv 2302.12022), as dog-optimizer 1.0.3.

    ``eta = lr * rbar / sqrt(G)`` with ``rbar = max(reps_rel (1 + |x_0|), max_t |x_t - x_0|)``
    and ``G = eps + sum_t |g_t|^2``, norms over the whole group (``layerwise=False``, DoG) or
    over each tensor (``layerwise=True``, LDoG). ``init_eta`` replaces the first step size
    (and ``reps_rel`` then counts as 0, as the reference). The direction is the input ``g``
    (weight decay is coupled, added by the shell); ``eta / lr`` goes to the plan. State: ``x0``
    (the initial point, ``"exact"``) and the floats ``rbar`` and ``G`` (group-level for DoG).
    """

    slot_names = ("x0", "rbar", "G")

    def __init__(self, layerwise: bool = False) -> None:
        self.layerwise = layerwise
        self.whole_group = not layerwise  # DoG's sums run over the whole group

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("x0", shape, "exact"), SlotSpec("rbar", None), SlotSpec("G", None)]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        init_eta = ctx.hp("init_eta")
        reps = 0.0 if init_eta is not None else float(ctx.hp("reps_rel"))
        eps = float(ctx.hp("eps"))
        first = max(ctx.steps) == 1
        x0s = ctx.slot("x0")
        for x0, p, fresh in zip(x0s, ctx.params, ctx.fresh("x0")):
            if fresh:
                x0.copy_(p)
        sq_p = [float(p.square().sum()) for p in ctx.params]
        sq_g = [float(g.square().sum()) for g in updates]
        sq_d = [float((p - x0).square().sum()) for p, x0 in zip(ctx.params, x0s)]
        blocks = [[i] for i in range(len(updates))] if self.layerwise \
            else [list(range(len(updates)))]
        for idx in blocks:
            if first:
                rbar = reps * (1 + math.sqrt(sum(sq_p[i] for i in idx)))
                big_g = sum(sq_g[i] for i in idx) + eps
            else:
                j = max(idx, key=ctx.steps.__getitem__)  # the freshest copy (shared())
                rbar = max(ctx.scalar("rbar", j), math.sqrt(sum(sq_d[i] for i in idx)))
                big_g = ctx.scalar("G", j) + sum(sq_g[i] for i in idx)
            for i in idx:
                ctx.set_scalar("rbar", i, rbar)
                ctx.set_scalar("G", i, big_g)
                if first and init_eta is not None:
                    ctx.plan.absolute[i] = True
                    ctx.plan.scale[i] = ctx.plan.scale[i] * float(init_eta)
                elif big_g > 0:
                    ctx.plan.scale[i] = ctx.plan.scale[i] * rbar / math.sqrt(big_g)
                else:
                    ctx.plan.scale[i] = 0.0
        return updates


# ---- MoMo -----------------------------------------------------------------------------------
class MomoStep(Combinator):
    """MoMo's model-based step size (Schaipp et al., arXiv 2305.07583), as fabian-sp/MoMo.

    With ``beta = group[beta_key]`` (MoMo's ``momentum``, MoMo-Adam's ``betas[0]``)::

        d = EMA_beta(g),  gamma_i = EMA_beta(<p_i, g_i>),  fbar = EMA_beta(loss)
        h = (1 + lr wd)(fbar - rho lb) + <p, d> - (1 + lr wd) sum gamma_i
        tau = min(lr / rho, max(h, 0) / <d, P d>)

    and the step ``p -= tau * P d`` (absolute; the shell then applies the weight decay the
    spec declares: proximal ``p /= 1 + lr wd`` or, MoMo-Adam's ``divide=False``, AdamW's).
    ``P d`` is the output of ``inner`` run on ``d`` (empty for MoMo; Adam's second moment,
    ``ScaleByAdam(first_moment="input")``, for MoMo-Adam). ``rho = 1 - beta^t`` when the
    averages start at zero (``bias_correction``, always for MoMo-Adam), else 1 and they start
    at their first values. ``use_fstar`` estimates the lower bound ``lb`` online. State:
    ``grad_avg``, the float ``grad_dot_w`` per tensor, and group-level floats ``loss_avg``
    and ``lb``.
    """

    slot_names = ("grad_avg", "grad_dot_w", "loss_avg", "lb")
    needs_loss = True
    shared_stats = True

    def __init__(self, beta_key: str, inner: list[Transform] | None = None,
                 zero_init: bool | None = None) -> None:
        self.beta_key = beta_key
        self.inner = list(inner or [])
        self.zero_init = zero_init  # None: the group's bias_correction decides

    def paths(self) -> list[list[Transform]]:
        return [[self, *p] for p in chain_paths(self.inner)]

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("grad_avg", shape), SlotSpec("grad_dot_w", None),
                SlotSpec("loss_avg", None), SlotSpec("lb", None, init=float(group["lb"]))]

    def inner_slots(self, shape, group, name=""):
        return chain_slots(self.inner, shape, group, name)

    def _beta(self, ctx: StepContext) -> tuple[float, bool, float, int]:
        """``(beta, zero_init, rho, t)`` of this step."""
        value = ctx.hp(self.beta_key)
        beta = float(value[0] if isinstance(value, (tuple, list)) else value)
        zero = ctx.hp("bias_correction") if self.zero_init is None else self.zero_init
        t = max(ctx.steps)
        return beta, zero, (1 - beta**t if zero else 1.0), t

    def gather(self, ctx: StepContext, updates: list[Tensor]) -> dict[str, float]:
        """Update the averages; this group's ``sum gamma_i``, ``<p, d>`` and ``<d, P d>`` (the
        directions ``P d`` are kept in ``ctx.stash`` for the call)."""
        beta, zero, _, _ = self._beta(ctx)
        avgs = ctx.slot("grad_avg")
        gamma = 0.0
        for i, (p, g, m, fresh) in enumerate(zip(ctx.params, updates, avgs,
                                                 ctx.fresh("grad_avg"))):
            pg = _dot(p, g)
            dot_w = ctx.scalar("grad_dot_w", i)
            if fresh and not zero:
                m.copy_(g)
                dot_w = pg
            m.mul_(beta).add_(g, alpha=1 - beta)
            dot_w = beta * dot_w + (1 - beta) * pg
            ctx.set_scalar("grad_dot_w", i, dot_w)
            gamma += dot_w
        directions = run_chain(self.inner, ctx, list(avgs), ctx.keymap) if self.inner \
            else [m.clone() for m in avgs]
        ctx.stash["directions"] = directions
        return {"gamma": gamma, "dot": sum(_dot(p, m) for p, m in zip(ctx.params, avgs)),
                "norm": sum(_dot(m, u) for m, u in zip(avgs, directions))}

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta, zero, rho, t = self._beta(ctx)
        # the sums over every group (the shell gathers them first), or this group's alone
        totals = ctx.totals if ctx.totals is not None else self.gather(ctx, updates)
        directions = ctx.stash.pop("directions")
        gamma, dot, norm = totals["gamma"], totals["dot"], totals["norm"]
        loss = float(ctx.loss)
        loss_avg = shared(ctx, "loss_avg")
        if t == 1 and not zero:
            loss_avg = loss
        loss_avg = beta * loss_avg + (1 - beta) * loss
        lr, wd = float(ctx.hp("lr")), float(ctx.hp("weight_decay"))
        lb, lb0 = shared(ctx, "lb"), float(ctx.hp("lb"))
        fstar = ctx.hp("use_fstar")
        shrink = 1 + lr * wd
        if fstar:
            cap = shrink * loss_avg + dot - shrink * gamma
            if cap < shrink * rho * lb:
                lb = max(cap / (2 * shrink * rho), lb0)
        h = shrink * (loss_avg - rho * lb) + dot - shrink * gamma
        t1 = max(h, 0.0) / norm if norm > 0 else math.inf
        tau = min(lr / rho, t1)
        if fstar:
            lb = max((loss_avg + dot - gamma - 0.5 * tau * norm) / rho, lb0)
        set_shared(ctx, "loss_avg", loss_avg)
        set_shared(ctx, "lb", lb)
        for i, u in enumerate(directions):
            u.mul_(tau)
            ctx.plan.absolute[i] = True
        return directions
