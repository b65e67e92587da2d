"""QDWH polar decomposition and the PolarGrad update (Lau et al., arXiv 2505.21799).

QDWH (QR-based dynamically weighted Halley iteration; Nakatsukasa, Bai and Gygi, "Optimizing
Halley's iteration for computing the matrix polar decomposition", SIAM J. Matrix Anal. Appl.
31(5), 2010) computes the polar factor ``U V^T`` of ``X = U S V^T`` with rational iterations
whose weights ``(a, b, c)`` are chosen from a lower bound ``l`` on the smallest singular value.
This is the variant of timlautk/polargrad's ``qdwh.py`` (a port of ``jax.lax.linalg.qdwh``),
reproduced step for step: see :func:`qdwh`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform
from llmvalley.optim.transforms.orthogonalize import (
    lapack_dtype,
    matrix_view,
    orthogonalize_matrices,
)

#: polar-factor methods of PolarGrad: QDWH (the reference's default) and our orthogonalizers
POLAR_METHODS = ("qdwh", "newton_schulz", "polar_express", "svd")

#: iterations with ``c`` above this use the QR form, the others the Cholesky form
CHOLESKY_CUTOFF = 100.0

Coefficients = tuple[float, float, float]


class QDWHResult(NamedTuple):
    """The polar factor, the number of QDWH iterations run (the final Newton-Schulz
    refinement not counted) and whether the last Cholesky-form step met the tolerance."""

    u: Tensor
    iterations: int
    converged: bool


def qdwh_schedule(eps: float, max_iterations: int) -> tuple[list[Coefficients],
                                                             list[Coefficients]]:
    """The dynamic weights ``(a, b, c)`` of QDWH, split into its QR and Cholesky stages.

    Starting from ``l = eps`` (the lower bound on the scaled smallest singular value), one
    ``(a, b, c)`` is computed per iteration, in Python floats, while ``l + 5 eps < 1`` and at
    most ``max_iterations`` times; iterations with ``c > 100`` go to the QR stage.
    """
    qr: list[Coefficients] = []
    chol: list[Coefficients] = []
    low, tol_l = eps, 10.0 * eps / 2.0
    while low + tol_l < 1 and len(qr) + len(chol) < max_iterations:
        l2 = low * low
        d = (4 * (1 / l2 - 1) / l2) ** (1 / 3)
        sqd = (1.0 + d) ** (1 / 2)
        a = sqd + (2 - d + 2 * (2 - l2) / (l2 * sqd)) ** (1 / 2)
        b = (a - 1) ** 2 / 4
        c = a + b - 1
        low = low * (a + b * l2) / (1 + c * l2)
        (qr if c > CHOLESKY_CUTOFF else chol).append((a, b, c))
    return qr, chol


def _qr_step(u: Tensor, a: float, b: float, c: float) -> Tensor:
    """``e u + (a - e) / sqrt(c) Q1 Q2^T`` with ``[sqrt(c) u; I] = [Q1; Q2] R``, ``e = b / c``."""
    e = b / c
    sqrt_c = c ** (1 / 2)
    rows, cols = u.shape
    eye = torch.eye(cols, dtype=u.dtype, device=u.device)
    q = torch.linalg.qr(torch.cat([sqrt_c * u, eye]), mode="reduced").Q
    return e * u + ((a - e) / sqrt_c) * (q[:rows] @ q[rows:].mT)


def _cholesky_step(u: Tensor, a: float, b: float, c: float) -> Tensor:
    """``e u + (a - e) u (c u^T u + I)^{-1}`` (a Cholesky solve), ``e = b / c``."""
    e = b / c
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    factor = torch.linalg.cholesky(c * (u.mT @ u) + eye)
    z = torch.cholesky_solve(u.mT, factor).mT
    return e * u + (a - e) * z


def qdwh(x: Tensor, max_iterations: int = 2, eps: float | None = None) -> QDWHResult:
    """Polar factor of the matrix ``x`` by QDWH, as timlautk/polargrad's ``polar(method="qdwh")``.

    - A wide ``x`` (fewer rows than columns) is processed as ``x^T`` and transposed back.
    - Computed in at least float32 (bf16/fp16 are promoted; float64 stays float64); the result
      has ``x``'s dtype. ``eps`` defaults to the machine epsilon of that compute dtype, so the
      coefficient schedule (:func:`qdwh_schedule`) depends on it.
    - ``x`` is scaled by ``1 / sqrt(||x||_1 ||x||_inf)`` (matrix 1- and inf-norms; a zero
      matrix is left as is and maps to zero).
    - The QR-form iterations run first, then the Cholesky-form ones, each followed by the test
      ``||u_new - u||_F > (5 eps)^(1/3)`` ("not converged"). The flag is "not converged" when
      there is no Cholesky-form iteration. While not converged and fewer than
      ``max_iterations`` iterations ran in total, Halley steps ``(a, b, c) = (3, 1, 3)`` follow
      (Cholesky form, same test).
    - Finally one Newton-Schulz refinement ``u <- 1.5 u - 0.5 u (u^T u)``.
    """
    if x.ndim != 2:
        raise ValueError(f"qdwh needs a 2-D matrix, got shape {tuple(x.shape)}")
    if max_iterations < 0:
        raise ValueError(f"qdwh: max_iterations={max_iterations} must be >= 0")
    dtype = lapack_dtype(x.dtype)
    wide = x.shape[0] < x.shape[1]
    mat = x.to(dtype)
    if wide:
        mat = mat.mT
    if eps is None:
        eps = float(torch.finfo(dtype).eps)
    one_norm = torch.linalg.matrix_norm(mat, ord=1)
    inf_norm = torch.linalg.matrix_norm(mat, ord=math.inf)
    scale = torch.where(one_norm == 0, 1.0, 1 / torch.sqrt(one_norm * inf_norm))
    u = mat * scale

    qr_coefs, chol_coefs = qdwh_schedule(eps, max_iterations)
    tol_norm = (10.0 * eps / 2.0) ** (1 / 3)
    for abc in qr_coefs:
        u = _qr_step(u, *abc)
    not_converged = True
    for abc in chol_coefs:
        prev, u = u, _cholesky_step(u, *abc)
        not_converged = bool(torch.linalg.matrix_norm(u - prev) > tol_norm)
    done = len(qr_coefs) + len(chol_coefs)
    while not_converged and done < max_iterations:
        prev, u = u, _cholesky_step(u, 3.0, 1.0, 3.0)
        not_converged = bool(torch.linalg.matrix_norm(u - prev) > tol_norm)
        done += 1
    u = 1.5 * u - 0.5 * u @ (u.mT @ u)
    if wide:
        u = u.mT
    return QDWHResult(u.to(x.dtype), done, not not_converged)


def polar_factors(mats: Sequence[Tensor], group: dict[str, Any]) -> list[Tensor]:
    """The polar factor of each matrix by ``group["polar_method"]``, in each matrix's dtype.

    ``"qdwh"`` runs :func:`qdwh` with ``inner_steps`` iterations, one matrix at a time; the
    others are :func:`~.orthogonalize.orthogonalize` with the group's ``ns_*`` options.
    """
    method = group["polar_method"]
    if method == "qdwh":
        steps = int(group["inner_steps"])
        return [qdwh(x, steps).u for x in mats]
    if method not in POLAR_METHODS:
        raise ValueError(f"unknown polar_method {method!r}; expected one of {POLAR_METHODS}")
    return orthogonalize_matrices(mats, group, method)


class PolarGradUpdate(Transform):
    """PolarGrad's direction (timlautk/polargrad ``polar_grad.py``), nuclear-norm scaled.

    Default: ``M.lerp_(G, 1 - momentum)``; ``U = polar(M)``; output ``<M, U> U``
    (``<M, U> = ||M||_*`` for the exact factor). With ``polar_first``: ``U = polar(G)``;
    ``M.lerp_(U, 1 - momentum)``; output ``<G, U> M``. ``polar`` is :func:`polar_factors`
    (``polar_method``, ``inner_steps``, ``ns_*``); >2-D kernels use their ``(out, -1)``
    matrix view. State ``momentum`` (the parameter's shape). The caller applies ``lr``.
    """

    slot_names = ("momentum",)

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        return [SlotSpec("momentum", shape)]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta = float(ctx.hp("momentum"))
        polar_first = bool(ctx.hp("polar_first"))
        mats = [matrix_view(u, ctx.name(i)) for i, u in enumerate(updates)]
        bufs = ctx.slot("momentum")
        if polar_first:
            sources = mats
        else:
            torch._foreach_lerp_(bufs, updates, 1 - beta)
            sources = [matrix_view(b) for b in bufs]
        polars = polar_factors(sources, ctx.group)
        out = []
        for src, pol, buf in zip(sources, polars, bufs):
            nuclear = torch.sum(src * pol)
            if polar_first:
                buf.lerp_(pol.reshape(buf.shape), 1 - beta)
                out.append(nuclear * buf)
            else:
                out.append((nuclear * pol).reshape(buf.shape))
        return out
