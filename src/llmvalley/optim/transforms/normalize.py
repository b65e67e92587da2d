"""Stateless (or nearly stateless) normalizations of matrix updates.

- row / column normalization (SCALE: per-row RMS of ``nn.Linear`` gradients),
- multi-normalization: alternating square-root row and column normalization (SinkGD),
- standardization + whitening (SWAN's GradNorm and GradWhitening),
- the gradient signal-to-noise scale of SGD-SaI.

Layout: ``W`` is ``(m, n) = (d_out, d_in)`` as ``nn.Linear`` stores it; >2-D kernels are viewed
as ``(out, -1)`` (see :func:`~.orthogonalize.matrix_view`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform
from llmvalley.optim.transforms.orthogonalize import (
    column_norms,
    map_by_shape,
    matrix_view,
    svd_polar,
)


# ---- functions (batched over leading dims where it matters) ------------------------------
def rms_normalize(x: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """``x / max(sqrt(mean(x^2, dim)), eps)``: unit RMS along ``dim`` (SCALE's rule)."""
    return x / x.square().mean(dim=dim, keepdim=True).sqrt().clamp_min(eps)


def sinkhorn_normalize(x: Tensor, iterations: int, eps: float = 1e-30) -> Tensor:
    """SinkGD's SR-Sinkhorn on ``(..., m, n)``: ``iterations`` times, rows to norm
    ``sqrt(n)`` then columns to norm ``sqrt(m)`` (so entries end with RMS about 1)."""
    m, n = x.shape[-2], x.shape[-1]
    for _ in range(iterations):
        x = x * (math.sqrt(n) / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
                 .clamp_min(eps))
        x = x * (math.sqrt(m) / column_norms(x).clamp_min(eps))
    return x


def standardize_rows(x: Tensor, eps: float = 1e-8) -> Tensor:
    """SWAN's GradNorm: subtract each row's mean and divide by its (biased) std + ``eps``,
    both over the ``n`` input columns."""
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    std = centred.square().mean(dim=-1, keepdim=True).sqrt()
    return centred / (std + eps)


def inverse_sqrt_newton_schulz(a: Tensor, steps: int) -> Tensor:
    """``A^{-1/2}`` of SPD matrices ``(B, k, k)`` by the coupled Newton-Schulz iteration.

    ``Y = A / ||A||_F``, ``Z = I``; repeat ``T = (3I - Z Y) / 2``, ``Y <- Y T``, ``Z <- T Z``;
    ``Z -> (A / ||A||_F)^{-1/2}``. Converges quadratically near 1, slowly for tiny eigenvalues.
    """
    norm = torch.linalg.matrix_norm(a, keepdim=True).clamp_min(1e-30)
    y = a / norm
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    z = eye.clone()
    for _ in range(steps):
        t = 1.5 * eye - 0.5 * (z @ y)
        y = y @ t
        z = t @ z
    return z / norm.sqrt()


def whiten(x: Tensor, method: str = "newton_schulz", steps: int = 10) -> Tensor:
    """SWAN's GradWhitening on ``(B, m, n)``: ``(X X^T)^{-1/2} X`` (the Gram matrix of the
    short side, so ``X (X^T X)^{-1/2}`` for tall ``X``); equals the polar factor ``U V^T``
    when ``X`` has full rank. ``method="svd"`` computes that exactly."""
    if method == "svd":
        return svd_polar(x).to(x.dtype)
    if method != "newton_schulz":
        raise ValueError(f"unknown whitening method {method!r}; expected 'newton_schulz'/'svd'")
    if x.shape[-2] <= x.shape[-1]:
        return inverse_sqrt_newton_schulz(x @ x.mT, steps) @ x
    return x @ inverse_sqrt_newton_schulz(x.mT @ x, steps)


# ---- transforms ---------------------------------------------------------------------------
class SinkhornNormalize(Transform):
    """Gradient multi-normalization of SinkGD (hyperparameter ``sinkhorn_steps`` = L)."""

    per_tensor = True

    # 2L passes over each matrix: in cache on the CPU's blocked eager tier, from memory in
    # the compiled kernels (auto's blocked step took 0.55-0.58x the compiled one on 45M)
    auto_compile = False

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        mats = [matrix_view(u, ctx.name(i)) for i, u in enumerate(updates)]
        steps = int(ctx.hp("sinkhorn_steps"))
        outs = map_by_shape(mats, lambda x: sinkhorn_normalize(x, steps))
        return [o.reshape(u.shape) for o, u in zip(outs, updates)]


class SWANNormalizeWhiten(Transform):
    """SWAN's GradNorm then GradWhitening, optionally rescaled to ``||GradNorm(G)||_F``.

    Hyperparameters: ``eps`` (std guard), ``whitening`` (``"newton_schulz"`` or ``"svd"``),
    ``ns_steps`` (coupled Newton-Schulz iterations), ``rescale``.
    """

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        mats = [matrix_view(u, ctx.name(i)) for i, u in enumerate(updates)]
        eps, method = float(ctx.hp("eps")), ctx.hp("whitening")
        steps, rescale = int(ctx.hp("ns_steps")), bool(ctx.hp("rescale"))

        def run(x: Tensor) -> Tensor:
            normed = standardize_rows(x, eps)
            out = whiten(normed, method, steps)
            if rescale:
                ratio = torch.linalg.matrix_norm(normed, keepdim=True) / torch.linalg.matrix_norm(
                    out, keepdim=True).clamp_min(1e-30)
                out = out * ratio
            return out

        outs = map_by_shape(mats, run)
        return [o.reshape(u.shape) for o, u in zip(outs, updates)]


class ScaleBySNR(Transform):
    """SGD-SaI (Xu et al., arXiv 2412.11768): momentum scaled by a frozen gradient SNR.

    At a parameter's first step ``gsnr = ||g|| / (std(g) + eps)`` (unbiased std, as sgd-sai
    1.0.3) is stored; every step
    ``b = g`` (first step) else ``b = momentum * b + (1 - momentum) * g``; output ``gsnr * b``.
    State: ``momentum_buffer`` (numel) and ``gsnr`` (one element).

    Deviation: for one-element tensors (std undefined) the reference uses ``nan_to_num`` and
    gets ``gsnr = |g| / eps`` (about 1e8 times the gradient), which diverges; here ``gsnr = 1``
    (plain momentum SGD) for them.
    """

    per_tensor = True

    slot_names = ("momentum_buffer", "gsnr")

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        return [SlotSpec("momentum_buffer", shape), SlotSpec("gsnr", (), "exact")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        mu, eps = float(ctx.hp("momentum")), float(ctx.hp("eps"))
        old_b, old_u = [], []
        bufs, snrs = ctx.slot("momentum_buffer"), ctx.slot("gsnr")
        fresh = ctx.fresh("gsnr")
        for buf, snr, u, first in zip(bufs, snrs, updates, fresh):
            if first:
                if u.numel() > 1:
                    snr.copy_(u.norm() / (u.std() + eps))
                else:  # std undefined: the reference's |g| / eps (~1e8) diverges; use 1
                    snr.fill_(1.0)
                buf.copy_(u)
            else:
                old_b.append(buf)
                old_u.append(u)
        if old_b:
            torch._foreach_mul_(old_b, mu)
            torch._foreach_add_(old_b, old_u, alpha=1 - mu)
        return torch._foreach_mul(bufs, snrs)


class RMSNormalize(Transform):
    """Unit RMS along one dimension of the matrix view (SCALE's column normalization):
    ``u / max(sqrt(mean(u^2, dim)), 1e-8)``; ``dim=1`` normalizes each output row (over the
    inputs), ``dim=0`` each column."""

    per_tensor = True

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        return [rms_normalize(matrix_view(u, ctx.name(i)), self.dim).reshape(u.shape)
                for i, u in enumerate(updates)]
