"""SPlus: signed momentum in a Shampoo eigenbasis, with an EMA of the weights for evaluation.

SPlus (Frans, Levine, Abbeel, "A Stable Whitening Optimizer for Efficient Neural Network
Training", arXiv 2506.07254; official code kvfrans/splus, ``optax/splus.py``). For a matrix
``W`` (both sides below ``max_dim``) with gradient ``G`` and momentum ``M``:

    M   <- b1 M + (1 - b1) G
    U    = Q_L sign(Q_L^T M Q_R) Q_R^T          (Q from the previous refresh; I at first)
    L   <- b2 L + (1 - b2) G G^T,   R <- b2 R + (1 - b2) G^T G
    Q_L, Q_R = eigenvectors of L + eps I, R + eps I   at step 1 and every inverse_every
    W   <- W - lr * s * (U + wd * W),   s = 2 / (m + n)

A side of ``max_dim`` or more keeps no factor (that side is not rotated). Everything else
(vectors, >2-D tensors, matrices with a side of ``max_dim`` or more, and matrices whose name
contains one of ``nonstandard_strings``: embeddings) takes ``sign(M)`` rotated as above where
it is a matrix, and the constant scale ``s = nonstandard_constant``. The model is evaluated at
the bias-corrected EMA of the weights taken before each step, ``E / (1 - ema_rate^t)``.

:class:`ScaleBySPlus` is the rotation and sign, :class:`EvalWeightAverage` the weight EMA
(train/eval iterates through :meth:`~.base.Transform.set_mode`). The factor algebra
(:func:`~.kronecker.apply_modes`, :func:`~.kronecker.flat_views`,
:func:`~.kronecker.factor_eigh`) is Shampoo/SOAP's, from :mod:`.kronecker`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform
from llmvalley.optim.transforms.kronecker import (
    apply_modes,
    factor_eigh,
    flat_views,
    square_numel,
)

Group = Mapping[str, Any]


def splus_sides(shape: Shape, group: Group) -> list[int | None]:
    """The factor size of each side of a matrix (None: the side is ``max_dim`` or more and is
    not rotated); no factors for tensors that are not matrices, as the reference."""
    if len(shape) != 2:
        return []
    limit = int(group["max_dim"])
    return [int(d) if d < limit else None for d in shape]


def splus_scale(shape: Shape, group: Group, name: str = "") -> float:
    """The step scale of a tensor: ``2 / (m + n)`` for a matrix with both sides below
    ``max_dim`` whose name contains none of ``nonstandard_strings`` (lower-cased, as the
    reference matches its parameter paths), else ``nonstandard_constant``."""
    limit = int(group["max_dim"])
    lowered = name.lower()
    if (len(shape) == 2 and all(d < limit for d in shape) and sum(shape) > 0
            and not any(s.lower() in lowered for s in group["nonstandard_strings"])):
        return 2.0 / (shape[0] + shape[1])
    return float(group["nonstandard_constant"])


class ScaleBySPlus(Transform):
    """SPlus's direction from the momentum it receives (``updates``): ``Q_L sign(Q_L^T M Q_R)
    Q_R^T`` for matrices (factors of the sides below ``max_dim``), ``sign(M)`` otherwise.

    After the direction, the factors take the raw gradient (``ctx.grads``):
    ``L <- b2 L + (1 - b2) G G^T``, ``R <- b2 R + (1 - b2) G^T G`` (``b2 = betas[1]``), and at
    step 1 and every ``inverse_every`` steps the bases become their eigenvectors
    (``eigh(F + eps I)``), used from the next step on. The shape scale (:func:`splus_scale`)
    goes into the plan's ``lr_mult``, so it scales the weight decay too, as the reference
    (``add_decayed_weights`` comes before its scaling). State (the reference's names): ``sides``
    and ``q_sides``, the factors and bases of both sides flattened (exact).

    A factor that is not finite at a refresh is reset to zero and the previous basis kept; a
    failed eigendecomposition keeps the previous basis; both warn, naming the parameter (the
    reference would propagate NaN).
    """

    slot_names = ("sides", "q_sides")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        n = square_numel(splus_sides(tuple(shape), group))
        if n == 0:
            return []
        return [SlotSpec("sides", (n,), "exact"), SlotSpec("q_sides", (n,), "exact")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        b2 = float(ctx.hp("betas")[1])
        every, eps = int(ctx.hp("inverse_every")), float(ctx.hp("eps"))
        out = []
        for i, m in enumerate(updates):
            shape = ctx.shapes[i]
            if m.numel() == 0:
                out.append(torch.zeros_like(m))
                continue
            ctx.plan.lr_mult[i] *= splus_scale(shape, ctx.group, ctx.name(i))
            sizes = splus_sides(shape, ctx.group)
            if square_numel(sizes) == 0:
                out.append(torch.sign(m))
                continue
            t = ctx.steps[i]
            qs = flat_views(ctx.slot("q_sides", [i])[0], sizes)
            if t == 1:  # the reference starts from identity bases
                for q in qs:
                    if q is not None:
                        q.copy_(torch.eye(q.shape[0], dtype=q.dtype, device=q.device))
            rotated = apply_modes(m, qs)
            out.append(apply_modes(torch.sign(rotated), qs, transpose=True))
            # b2 F + ((1 - b2) G) G^T, associated as the reference's ``(1 - b2) * g @ g.T``
            g = ctx.grads[i]
            weighted = g * (1.0 - b2)
            factors = flat_views(ctx.slot("sides", [i])[0], sizes)
            for k, f in enumerate(factors):
                if f is not None:
                    f.mul_(b2).add_(weighted @ g.T if k == 0 else weighted.T @ g)
            if t == 1 or t % every == 0:
                self._refresh(ctx, i, factors, qs, eps)
        return out

    @staticmethod
    def _refresh(ctx: StepContext, i: int, factors: list[Tensor | None],
                 qs: list[Tensor | None], eps: float) -> None:
        """``Q_k = eigh(F_k + eps I)`` eigenvectors for each factor (the order of the
        eigenvectors and their signs do not change the direction)."""
        for f, q in zip(factors, qs):
            if f is None:
                continue
            result = factor_eigh(ctx, i, f, eps, "SPlus", "previous basis")
            if result is not None:
                q.copy_(result[1])


class EvalWeightAverage(Transform):
    """An EMA of the weights, evaluated with bias correction (SPlus's evaluation parameters).

    Each step, before the update, ``E <- r E + (1 - r) W`` (``r = group[rate_key]``) for the
    weights ``W`` the step starts from, as the reference's ``update_fn`` does with the
    parameters it is given; the updates pass through unchanged. :meth:`set_mode` swaps the
    iterates: ``eval()`` puts ``E / (1 - r^t)`` in the parameters (``t`` the tensor's step
    count; the weights themselves before any step) and *keeps the training weights in the
    slot*; ``train()`` puts them back exactly and restores ``E`` as the evaluation weights
    times ``1 - r^t``. So no third copy of the weights is kept (the official PyTorch port
    clones the parameters on ``eval()``): the training weights round-trip bit-exactly, and
    ``E`` changes by at most a rounding of the parameter dtype per switch (a bf16 model
    without master weights rounds it to bf16). State ``ema`` (exact): the average in train
    mode, the training weights in eval mode.
    """

    elementwise = True

    slot_names = ("ema",)
    has_modes = True

    def __init__(self, rate_key: str = "ema_rate") -> None:
        self.rate_key = rate_key

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("ema", shape, "exact")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        rate = float(ctx.hp(self.rate_key))
        for e, w in zip(ctx.slot("ema"), ctx.params):
            e.mul_(rate).add_(w, alpha=1.0 - rate)
        return updates

    def set_mode(self, ctx: StepContext, train: bool) -> list[Tensor]:
        rate = float(ctx.hp(self.rate_key))
        values = []
        for e, w, t in zip(ctx.slot("ema"), ctx.params, ctx.steps):
            correction = 1.0 - rate**t
            if train:  # the slot holds the training weights; w the evaluation weights
                values.append(e.clone())
                e.copy_(w).mul_(correction)
            else:
                values.append(e / correction if correction > 0 else w.clone())
                e.copy_(w)
        return values
