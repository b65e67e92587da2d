"""Bases that adaptive methods run in: Conda's singular basis and COSMOS's tracked subspace.

Both are :class:`~.combine.Projector` s for :class:`~.combine.InBasis`, which runs an ordinary
:class:`~.adaptive.ScaleByAdam` inside them:

- :class:`SingularBasis` (Conda, Wang et al. 2025): the full square singular basis of the
  momentum on the matrix's short side, refreshed by an SVD every ``update_proj_gap`` steps.
- :class:`TrackedSubspace` (COSMOS, Liu et al., arXiv 2502.17410): the leading rank-``r``
  eigenbasis of the gradient covariance ``E[G^T G]``, tracked by one power-iteration/QR step
  per step.

Tensors reach them as ``(out, -1)`` matrices (:func:`~.orthogonalize.matrix_view`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform
from llmvalley.optim.transforms.combine import Projector
from llmvalley.optim.transforms.orthogonalize import lapack_dtype, matrix_dims

Group = Mapping[str, Any]


# ---- Conda ---------------------------------------------------------------------------------
def conda_side(shape: Shape) -> str:
    """Which side Conda rotates (the reference's ``proj_type="std"``): the columns of a
    tall-or-square matrix (``G V``, ``V`` n x n), the rows of a wide one (``U^T G``)."""
    m, n = matrix_dims(shape)
    return "right" if m >= n else "left"


class SingularBasis(Projector):
    """The full square singular basis of the update on the short side (jie040109/Conda,
    ``proj_type="std"``).

    At steps ``t`` with ``(t - 1) % update_proj_gap == 0`` (the reference's pre-increment
    count) ``Q`` becomes ``V^T`` of ``X = U S V^T`` when ``m >= n`` (projection ``X Q^T``, back
    ``Y Q``), else ``U`` (projection ``Q^T X``, back ``Q Y``). The SVD runs in at least
    float32. State ``ortho`` (``min(m, n)`` squared).
    """

    slot_names = ("ortho",)

    def slots(self, shape: Shape, group: Group) -> list[SlotSpec]:
        side = min(matrix_dims(shape))
        return [SlotSpec("ortho", (side, side), "exact")]

    def projected_shape(self, shape: Shape, group: Group) -> Shape:
        return tuple(shape)

    def refresh(self, ctx: StepContext, i: int, source: Tensor) -> None:
        q = ctx.slot("ortho", [i])[0]
        due = (ctx.steps[i] - 1) % int(ctx.hp("update_proj_gap")) == 0
        if not (due or ctx.fresh("ortho")[i]):
            return
        u, _, vh = torch.linalg.svd(source.to(lapack_dtype(source.dtype)), full_matrices=False)
        q.copy_(vh if conda_side(tuple(source.shape)) == "right" else u)

    def project(self, ctx: StepContext, i: int, x: Tensor) -> Tensor:
        q = ctx.slot("ortho", [i])[0]
        return x @ q.T if conda_side(tuple(x.shape)) == "right" else q.T @ x

    def back(self, ctx: StepContext, i: int, y: Tensor) -> Tensor:
        q = ctx.slot("ortho", [i])[0]
        return y @ q if conda_side(tuple(y.shape)) == "right" else q @ y


# ---- COSMOS --------------------------------------------------------------------------------
def cosmos_rank(shape: Shape, rank: int) -> int:
    """The subspace rank: ``rank`` capped at the input dimension ``n``."""
    return min(int(rank), matrix_dims(shape)[1])


class TrackedSubspace(Projector):
    """COSMOS's basis ``P`` (n x r) of the gradient covariance, as lliu606/COSMOS.

    At the first step ``P`` = the top ``r`` left singular vectors of ``G^T G`` and
    ``C = (1 - beta2) (GP)^T (GP)``; afterwards ``P' = QR(beta2 P C + (1 - beta2) G^T (G P))``,
    ``T = P^T P'``, ``C = beta2 T^T C T + (1 - beta2) (G P')^T (G P')`` (``beta2 = betas[1]``,
    ``r = min(rank, n)``). Projection ``X P``, back ``Y P^T``. State ``exp_avg_GG`` (r x r)
    and ``exp_avg_P`` (n x r): the reference's names.
    """

    slot_names = ("exp_avg_GG", "exp_avg_P")
    source = "grad"

    def slots(self, shape: Shape, group: Group) -> list[SlotSpec]:
        r = cosmos_rank(shape, group["rank"])
        return [SlotSpec("exp_avg_GG", (r, r), "exact"),
                SlotSpec("exp_avg_P", (matrix_dims(shape)[1], r), "exact")]

    def projected_shape(self, shape: Shape, group: Group) -> Shape:
        return (matrix_dims(shape)[0], cosmos_rank(shape, group["rank"]))

    def complete(self, shape: Shape, group: Group) -> bool:
        return cosmos_rank(shape, group["rank"]) >= matrix_dims(shape)[1]

    def refresh(self, ctx: StepContext, i: int, g: Tensor) -> None:
        cov, basis = ctx.slot("exp_avg_GG", [i])[0], ctx.slot("exp_avg_P", [i])[0]
        beta2 = ctx.hp("betas")[1]
        qr_dtype = lapack_dtype(g.dtype)
        if ctx.fresh("exp_avg_P")[i]:
            u, _, _ = torch.linalg.svd((g.T @ g).to(qr_dtype), full_matrices=False)
            basis.copy_(u[:, :basis.shape[1]])
            low = g @ basis
            cov.copy_(low.T @ low * (1 - beta2))
            return
        old = basis.clone()
        target = beta2 * (basis @ cov) + (1 - beta2) * (g.T @ (g @ basis))
        basis.copy_(torch.linalg.qr(target.to(qr_dtype), mode="reduced").Q)
        rot = old.T @ basis
        low = g @ basis
        cov.copy_(beta2 * (rot.T @ (cov @ rot)) + (1 - beta2) * (low.T @ low))

    def project(self, ctx: StepContext, i: int, x: Tensor) -> Tensor:
        return x @ ctx.slot("exp_avg_P", [i])[0]

    def back(self, ctx: StepContext, i: int, y: Tensor) -> Tensor:
        return y @ ctx.slot("exp_avg_P", [i])[0].T


class FrobeniusNormalize(Transform):
    """``u * gain * sqrt(numel) / (||u||_F + eps)`` with ``gain = group[gain_key]`` (1 when
    None) and ``eps = group["eps"]``: COSMOS's normalisation of its residual and its update."""

    def __init__(self, gain_key: str | None = None) -> None:
        self.gain_key = gain_key

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        gain = float(ctx.hp(self.gain_key)) if self.gain_key else 1.0
        eps = float(ctx.hp("eps"))
        out = []
        for u in updates:
            scale = math.sqrt(u.numel())
            out.append(u * (scale / (u.norm() + eps)) * gain if gain != 1.0
                       else u * (scale / (u.norm() + eps)))
        return out
