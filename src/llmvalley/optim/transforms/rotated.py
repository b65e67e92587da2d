"""Adaptive updates in a rotated basis of each weight matrix: Conda and COSMOS.

Both keep Adam-style element-wise statistics, but in a basis that follows the matrix's own
geometry instead of the coordinate axes:

- Conda (Wang et al. 2025) rotates the short side of the matrix into the singular basis of the
  momentum, refreshed by an SVD every ``update_proj_gap`` steps, and runs Adam there.
- COSMOS (Liu et al., arXiv 2502.17410) tracks the leading rank-``r`` eigenbasis of the
  gradient covariance ``E[G^T G]`` (one power-iteration/QR step per step), runs Adam in that
  subspace and an orthogonalized (Newton-Schulz) update on the residual.

Both need whole matrices; >2-D kernels are viewed as ``(out, -1)`` (:func:`matrix_view`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, StepContext, Transform
from llmvalley.optim.transforms.orthogonalize import (
    lapack_dtype,
    matrix_dims,
    matrix_view,
    orthogonalize_matrices,
)


# ---- Conda ---------------------------------------------------------------------------------
def conda_side(shape: Shape) -> str:
    """Which side Conda rotates (the reference's ``proj_type="std"``): the columns of a
    tall-or-square matrix (``G V``, ``V`` n x n), the rows of a wide one (``U^T G``)."""
    m, n = matrix_dims(shape)
    return "right" if m >= n else "left"


class ScaleByConda(Transform):
    """Conda's direction: Adam in the singular basis of the momentum (jie040109/Conda).

    Per step ``t`` (counted from 1), for an ``m x n`` matrix:

    1. ``M = beta1 M + (1 - beta1) G`` in the original space;
    2. when ``(t - 1) % update_proj_gap == 0``: ``Q`` = the full square singular basis of
       ``M`` on the short side (``V`` of ``M = U S V^T`` when ``m >= n``, else ``U``);
    3. ``g' = G Q^T`` and ``m' = M Q^T`` (or ``Q^T G``, ``Q^T M`` for wide matrices);
    4. ``V = beta2 V + (1 - beta2) g'^2`` (element-wise, in the rotated basis; not rotated
       when ``Q`` changes, as the reference);
    5. output ``scale * sqrt(bc2) / bc1 * back(m' / (sqrt(V) + eps))`` (Hugging Face's bias
       correction; ``back`` undoes the rotation).

    The caller applies ``lr`` and, after the step, the weight decay. State ``exp_avg``
    (m x n), ``exp_avg_sq`` (m x n, rotated), ``ortho`` (min(m, n) squared).
    """

    state_keys = ("exp_avg", "exp_avg_sq", "ortho")

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2 = ctx.hp("betas")
        eps, scale = float(ctx.hp("eps")), float(ctx.hp("scale"))
        gap = int(ctx.hp("update_proj_gap"))
        out = []
        for i, (g, st, t) in enumerate(zip(updates, ctx.states, ctx.steps)):
            gm = matrix_view(g, ctx.name(i))
            right = conda_side(tuple(g.shape)) == "right"
            if "exp_avg" not in st:
                st["exp_avg"] = ctx.zeros(i, gm.shape)
                st["exp_avg_sq"] = ctx.zeros(i, gm.shape)
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.lerp_(gm, 1 - beta1)
            if "ortho" not in st or (t - 1) % gap == 0:
                st["ortho"] = self._basis(m, right)
            q = st["ortho"]
            g_rot = gm @ q.T if right else q.T @ gm
            m_rot = m @ q.T if right else q.T @ m
            v.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
            direction = m_rot / (v.sqrt() + eps)
            back = direction @ q if right else q @ direction
            factor = scale * math.sqrt(1 - beta2**t) / (1 - beta1**t)
            out.append((back * factor).reshape(g.shape))
        return out

    @staticmethod
    def _basis(m: Tensor, right: bool) -> Tensor:
        """``V^T``-rows (right) or ``U``-columns (left) of the thin SVD of ``m``."""
        u, _, vh = torch.linalg.svd(m.to(lapack_dtype(m.dtype)), full_matrices=False)
        return (vh if right else u).to(m.dtype)

    def state_numel(self, shape: Shape, group: dict[str, Any]) -> int:
        m, n = matrix_dims(shape)
        return 2 * m * n + min(m, n) ** 2


# ---- COSMOS --------------------------------------------------------------------------------
def cosmos_rank(shape: Shape, rank: int) -> int:
    """The subspace rank: ``rank`` capped at the input dimension ``n``."""
    return min(int(rank), matrix_dims(shape)[1])


class COSMOSUpdate(Transform):
    """COSMOS (Liu et al., arXiv 2502.17410), as lliu606/COSMOS ``COSMOS_optim.py``; this
    transform applies the step itself.

    For an ``m x n`` matrix (``n`` the input dimension), rank ``r``, step ``t``:

    1. ``M = beta1 M + G``; ``bc1 = (1 - beta1^t) / (1 - beta1)``, ``bc2 = 1 - beta2^t``;
    2. the basis ``P`` (n x r) and projected covariance ``C`` (r x r): at ``t = 1``, ``P`` =
       the top ``r`` left singular vectors of ``G^T G`` and ``C = (1 - beta2) (GP)^T (GP)``;
       afterwards ``P' = QR(beta2 P C + (1 - beta2) G^T (G P))``, ``T = P^T P'``,
       ``C = beta2 T^T C T + (1 - beta2) (G P')^T (G P')``;
    3. ``V = beta2 V + (1 - beta2) (G P)^2`` (m x r);
    4. Nesterov: ``H = (G + beta1 M) / (1 + beta1 bc1)``;
    5. ``A = [(H P) / (sqrt(V / bc2) + eps)] P^T``; ``B = NS(H - H P P^T)`` rescaled to
       Frobenius norm ``sqrt(mn)``; ``U = A + gamma B``;
    6. ``W *= 1 - lr wd``; ``W -= lr lr_ratio sqrt(mn) U / (||U||_F + eps)``.

    ``B`` uses the :class:`~.orthogonalize.Orthogonalize` options (``ns_*``). When ``r = n``
    the residual is zero in exact arithmetic and ``B`` is taken as 0 (orthogonalizing the
    rounding noise would inject a full-size random direction). State ``exp_avg`` (m x n),
    ``exp_avg_sq`` (m x r), ``exp_avg_GG`` (r x r), ``exp_avg_P`` (n x r): the reference's
    names.
    """

    state_keys = ("exp_avg", "exp_avg_sq", "exp_avg_GG", "exp_avg_P")

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        group = ctx.group
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        ratio, gamma = float(group["lr_ratio"]), float(group["gamma"])
        for i, (p, g, st, t) in enumerate(zip(ctx.params, updates, ctx.states, ctx.steps)):
            gm = matrix_view(g, ctx.name(i))
            pm = matrix_view(p)
            m_rows, n_cols = gm.shape
            r = cosmos_rank(tuple(g.shape), group["rank"])
            if "exp_avg" not in st:
                st["exp_avg"] = ctx.zeros(i, gm.shape)
                st["exp_avg_sq"] = ctx.zeros(i, (m_rows, r))
                st["exp_avg_GG"] = ctx.zeros(i, (r, r))
                st["exp_avg_P"] = ctx.zeros(i, (n_cols, r))
            mom, v, cov, basis = (st[k] for k in self.state_keys)
            mom.mul_(beta1).add_(gm)
            bc1 = (1 - beta1**t) / (1 - beta1)
            bc2 = 1 - beta2**t
            low = self._track_subspace(gm, basis, cov, beta2, r, first=t == 1)
            v.mul_(beta2).addcmul_(low, low, value=1 - beta2)
            look = (gm + beta1 * mom) / (1 + beta1 * bc1)
            look_low = look @ basis
            adam = (look_low / ((v.sqrt() / math.sqrt(bc2)).add_(eps))) @ basis.T
            scale = math.sqrt(m_rows * n_cols)
            if r < n_cols:
                ortho = orthogonalize_matrices([look - look_low @ basis.T], group)[0]
                adam.add_(ortho * (scale / (ortho.norm() + eps)), alpha=gamma)
            if wd > 0:
                pm.mul_(1 - lr * wd)
            pm.add_(adam / (adam.norm() + eps), alpha=-scale * ratio * lr)
        return updates

    @staticmethod
    def _track_subspace(g: Tensor, basis: Tensor, cov: Tensor, beta2: float, r: int,
                        first: bool) -> Tensor:
        """Update ``P`` and ``C`` in place (step 2 of the class docstring); return ``G P``
        with the new ``P``."""
        qr_dtype = lapack_dtype(g.dtype)
        if first:
            u, _, _ = torch.linalg.svd((g.T @ g).to(qr_dtype), full_matrices=False)
            basis.copy_(u[:, :r])
            low = g @ basis
            cov.copy_(low.T @ low * (1 - beta2))
            return low
        old = basis.clone()
        target = beta2 * (basis @ cov) + (1 - beta2) * (g.T @ (g @ basis))
        basis.copy_(torch.linalg.qr(target.to(qr_dtype), mode="reduced").Q)
        rot = old.T @ basis
        low = g @ basis
        cov.copy_(beta2 * (rot.T @ (cov @ rot)) + (1 - beta2) * (low.T @ low))
        return low

    def state_numel(self, shape: Shape, group: dict[str, Any]) -> int:
        m, n = matrix_dims(shape)
        r = cosmos_rank(shape, group["rank"])
        return m * n + m * r + r * r + n * r
