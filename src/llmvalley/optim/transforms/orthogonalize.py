"""Orthogonalization of matrix updates and the update-scale conventions that go with it.

Orthogonalizers map a matrix ``X = U S V^T`` to (an approximation of) its polar factor
``U V^T``:

- ``"newton_schulz"``: Keller Jordan's quintic Newton-Schulz iteration (Muon), coefficients
  ``(a, b, c) = (3.4445, -4.7750, 2.0315)`` by default, ``X <- a X + (b A + c A^2) X`` with
  ``A = X X^T``, after ``X <- X / max(||X||_F, eps)``. It does not converge to ``U V^T``: it
  pushes every singular value into a band around 1 (Keller's docstring: roughly
  ``Uniform(0.5, 1.5)``). Documented band, checked in ``tests/test_orthogonalize.py`` in fp32
  and bf16: ``[0.67, 1.21]`` for every ``sigma_i`` with ``sigma_i / ||X||_F >= 2 / 3.4445^steps``
  (smaller singular values have not yet been lifted; zero stays zero).
- ``"polar_express"``: the Polar Express schedule (Amsel et al., arXiv 2505.16932), one
  ``(a, b, c)`` per iteration, as used in modded-nanogpt: ``X / (1.02 ||X||_F + 1e-6)``, at
  most 5 iterations. Band ``[0.85, 1.15]`` for ``sigma_i / ||X||_F >= 4e-3`` (5 iterations).
- ``"svd"``: the exact polar factor ``U V^T`` from a thin SVD (tests, small matrices; zero
  singular values map to 0 as they should).

All orthogonalizers run batched over a stack of same-shape matrices (``(..., m, n)``) and
work on the wide orientation (a tall matrix is transposed first and back after), as Keller's
reference does. Parameters with more than two dimensions (conv kernels ``(out, in, kh, kw)``)
are viewed as ``(out, in * kh * kw)`` matrices (Keller's rule: flatten the trailing dims);
tensors with fewer than two dimensions are rejected with an error naming the parameter.

Newton-Schulz form (``ns_form``), all the same iteration, evaluated differently:

- ``"standard"``: torch.optim.Muon's products on ``X`` (``A = X X^T``, ``B = b A + c A^2``,
  ``X <- a X + B X``), op for op, so bf16 results match it bit for bit.
- ``"symmetric"``: the same, but ``A`` and ``B`` are symmetric, so on CPU only their lower
  triangle's column blocks of :data:`SYM_BLOCK` rows are multiplied and then mirrored
  (:func:`symmetric_product`; from 384 rows): 0.625 of those products' multiply-adds for 512
  rows, about 0.89x the standard form's time for 512x512 matrices (CPU, bf16 and float32). In
  float32 / float64 ``a X`` is folded into the product (``X <- (a I + B) X``). Differences from
  ``"standard"``: rounding (bf16: the same error against the float64 iteration, ~3e-3 on
  512x1376 Gaussian inputs). Elsewhere than on CPUs it is ``"standard"``.
- ``"gram"``: the iteration on the small ``m x m`` Gram matrix (the Gram / "symmetric"
  Newton-Schulz of Dao-AILab): every iterate is ``X_k = Q_k X_0`` with ``Q_k`` a polynomial in
  ``R_0 = X_0 X_0^T``, so only ``R`` and ``Q`` are updated (``P = a I + b R + c R^2``,
  ``Q <- P Q``, ``R <- P R P``), with ``X`` and ``R`` re-formed every :data:`GRAM_RESTART`
  iterations for stability. For 5 iterations that is ``4 m^2 n + 14 m^3`` multiply-adds against
  ``10 m^2 n + 5 m^3``, and all but the two ``Q X`` products are symmetric (blocked on CPU, as
  above): 0.65-0.67x the standard form's time at 512x1376, a loss for square matrices. The two agree
  in exact arithmetic (1e-13 in float64), but the Gram matrix squares the condition number:
  in float32 the result differs from the standard iteration's by up to ~1e-4 on tiny
  ill-conditioned inputs (standard float32: ~1e-6); in bf16, against the float64 iteration,
  4e-3 where the standard form has 2.5e-3 (512x1376 Gaussian) and less than it on
  ill-conditioned inputs (8e-3 against 1.1e-2), the singular values in the same band.
- ``"auto"``: ``"gram"`` for matrices at least :data:`GRAM_MIN_ASPECT` times as wide as tall
  (either orientation, any dtype), ``"symmetric"`` otherwise.

``"standard"`` is the recipes' default (torch.optim.Muon's bits); ``"auto"`` is the fastest.
On CPU, a shape's matrices run in chunks of about :data:`NS_CHUNK_BYTES`, so the iterates stay
in cache. ``benchmarks/matrix_step_time.py`` measures all forms.

Compute precision (``ns_dtype``): ``None`` means bfloat16 on CUDA (Keller, torch.optim.Muon), and
for float32 updates on CPUs where bf16 matrix products are faster than float32 ones (a one-time
probe, :func:`cpu_has_native_bf16`: CPUs with AVX512-BF16 or AMX, where bf16 was ~2x faster);
elsewhere the update's own dtype (float32, or float64 in tests). On AVX2-only CPUs a bf16
matmul is ~25x slower than float32, so float32 is kept. Any dtype may be forced. Where bf16 is
chosen, results differ from float32 at bf16 rounding level.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from llmvalley.optim.transforms.base import (
    Shape,
    SlotSpec,
    StepContext,
    Transform,
    numel,
    root,
)
from llmvalley.optim.transforms.shards import (
    ShardedShape,
    all_reduce_sum,
    chunk_sizes,
    shard_group,
    whole_shape,
)

#: Keller Jordan's quintic Newton-Schulz coefficients (Muon, torch.optim.Muon)
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

#: Polar Express schedule for 5 iterations with the 2% safety factor (modded-nanogpt)
POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

ORTHOGONALIZERS = ("newton_schulz", "polar_express", "svd")

#: how a Newton-Schulz iteration is evaluated (module docstring)
NS_FORMS = ("auto", "standard", "symmetric", "gram")

#: ``ns_form="auto"`` takes the Gram form from this aspect ratio (n / m of the wide orientation)
#: on: with blocked symmetric products it overtakes the symmetric form at ~1.35 (512 rows, CPU,
#: bf16 and float32)
GRAM_MIN_ASPECT = 1.5
#: iterations between re-formings of X and its Gram matrix in the Gram form (float32 / float64)
GRAM_RESTART = 3
#: the same after the first re-forming in bf16 / fp16, whose rounding noise in ``R`` (``2^-9``)
#: grows by ``a^2`` per iteration: with 3, 9 of 48 assorted ill-conditioned inputs diverged at
#: 10 iterations; with 2 none did (the first span stays 3 iterations: at 5, every input was
#: stable either way, and one restart less saves 2 ``m^2 n`` products)
GRAM_RESTART_16BIT = 2
#: rows per column block of a blocked symmetric product (CPU; :func:`symmetric_product`)
SYM_BLOCK = 128
#: bytes of ``X`` per batched Newton-Schulz call on CPU (:func:`_chunk_size`)
NS_CHUNK_BYTES = 4 << 20

#: how the Newton-Schulz input is normalised: by ``max(||X||_F, eps)`` or ``||X||_F + eps``
NS_EPS_FORMS = ("clamp", "add")


# ---- helpers ------------------------------------------------------------------------------
def matrix_view(t: Tensor, name: str = "tensor") -> Tensor:
    """``t`` as a matrix: 2-D as is, ``(d0, d1, ...)`` as ``(d0, d1 * ...)`` (Keller's rule)."""
    if t.ndim < 2:
        raise ValueError(
            f"{name} has {t.ndim} dimension(s), but this transform needs a matrix "
            "(2-D, or a >2-D kernel viewed as (out, -1))"
        )
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def column_norms(x: Tensor, dim: int = -2) -> Tensor:
    """The 2-norms of ``x`` along ``dim`` (kept), as the square root of a sum of squares:
    ``torch.linalg.vector_norm`` over an outer dimension (a matrix's columns) is not
    vectorised on CPU and ran 10-17x slower than this (4096 x 256 float32); the two agree
    to float rounding."""
    return x.square().sum(dim=dim, keepdim=True).sqrt()


def matrix_dims(shape: Shape) -> tuple[int, int]:
    """``(m, n)`` of the matrix view of a parameter of ``shape``."""
    return int(shape[0]), numel(shape[1:])


_CPU_BF16: bool | None = None


def cpu_has_native_bf16() -> bool:
    """Whether bf16 matrix products beat float32 ones on this CPU: a one-time probe, cached.

    CPUs without bf16 instructions (no ``avx512_bf16`` / ``amx_bf16`` flag; the AVX2-only
    EPYCs) answer False at once: there a bf16 matmul is ~25x slower than float32. Otherwise a
    256x256 product is timed in both dtypes, interleaved (best of 3); the two differ by 2x or
    more either way, far beyond timing noise. ``LLMVALLEY_CPU_BF16=0`` or ``1`` in the
    environment sets the answer instead (the test suite pins 0, for results that do not depend
    on the machine).
    """
    global _CPU_BF16
    forced = os.environ.get("LLMVALLEY_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if _CPU_BF16 is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith("flags")), "").split()
        except OSError:
            flags = []
        _CPU_BF16 = ("avx512_bf16" in flags or "amx_bf16" in flags) and _bf16_matmul_faster()
    return _CPU_BF16


def _bf16_matmul_faster() -> bool:
    import time

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(256, 256, generator=gen)
    best = {torch.float32: math.inf, torch.bfloat16: math.inf}
    for _ in range(3):
        for dtype in best:
            x = a.to(dtype)
            start = time.perf_counter()
            x @ x
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.bfloat16] < best[torch.float32]


def resolve_dtype(value: Any, device: torch.device, fallback: torch.dtype) -> torch.dtype:
    """The compute dtype for ``ns_dtype=value``. None: bf16 on CUDA, and on CPUs with native
    bf16 for float32 updates (:func:`cpu_has_native_bf16`); otherwise ``fallback``."""
    if value is None:
        if device.type == "cuda":
            return torch.bfloat16
        if device.type == "cpu" and fallback == torch.float32 and cpu_has_native_bf16():
            return torch.bfloat16
        return fallback
    if isinstance(value, str):
        value = getattr(torch, value)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"invalid ns_dtype={value!r}: expected a floating dtype or None")
    return value


def shape_groups(mats: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """The indices of ``mats`` grouped by ``(shape, dtype, device)``: what can be batched."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(mats):
        groups.setdefault((tuple(x.shape), x.dtype, x.device), []).append(i)
    return groups


def map_by_shape(
    mats: Sequence[Tensor], fn: Callable[[Tensor], Tensor]
) -> list[Tensor]:
    """Apply a batched ``fn`` ((B, m, n) -> (B, m, n)) to matrices grouped by shape/dtype."""
    out: list[Tensor | None] = [None] * len(mats)
    for idx in shape_groups(mats).values():
        stacked = torch.stack([mats[i] for i in idx]) if len(idx) > 1 else mats[idx[0]][None]
        result = fn(stacked)
        for j, i in enumerate(idx):
            out[i] = result[j]
    return out  # type: ignore[return-value]


# ---- orthogonalizers (batched over leading dims) -----------------------------------------
def _block_rows(m: int, device: torch.device) -> int:
    """Rows per column block of a blocked symmetric product of ``m x m`` results, 0 for one
    plain product (other devices than the CPU, or fewer than three blocks: with two, the
    copies eat the saving)."""
    return SYM_BLOCK if device.type == "cpu" and m >= 3 * SYM_BLOCK else 0


def symmetric_product(
    a: Tensor, b: Tensor, *, transpose_b: bool = False, c: Tensor | None = None,
    alpha: float = 1.0, beta: float = 0.0, blocked: bool = True,
) -> Tensor:
    """``alpha * a @ op(b) + beta * c`` (``op(b) = b^T`` with ``transpose_b``, else ``b``) for a
    batch ``(B, m, k)`` whose result is symmetric: a Gram matrix ``X X^T`` (``a = b = X``,
    ``transpose_b``), or a product of two commuting symmetric matrices (``b`` symmetric; then
    ``c``, if given, is symmetric too).

    ``blocked`` (CPU, ``m >= 3 * SYM_BLOCK``): only the lower triangle's column blocks are
    multiplied, ``S[r0:, r0:r1] = a[r0:] @ op(b)[:, r0:r1]``, each with the ``r0:r1`` rows of
    ``b`` (= ``op(b)[:, r0:r1]^T``, as ``b`` or ``op(b)`` is symmetric) copied contiguous, and
    mirrored into the upper triangle: ``(k + 1) / 2k`` of the multiply-adds for ``k`` blocks
    (0.625 for 512 rows; measured 0.75-0.8 of the plain product's time, copies included), the
    same sums, so the result differs from the plain product by rounding only. Otherwise one
    plain ``bmm`` / ``baddbmm``, bit for bit the product written out.
    """
    m = a.shape[-2]
    block = _block_rows(m, a.device) if blocked else 0
    if not block:
        rhs = b.mT if transpose_b else b
        if c is None:
            return torch.bmm(a, rhs) if alpha == 1.0 else torch.bmm(a, rhs).mul_(alpha)
        return torch.baddbmm(c, a, rhs, beta=beta, alpha=alpha)
    out = torch.empty(a.shape[:-1] + (m,), dtype=a.dtype, device=a.device)
    for r0 in range(0, m, block):
        r1 = min(r0 + block, m)
        rows = b[:, r0:r1].contiguous()  # contiguous: bf16 bmm is slow on row slices
        if c is None:
            col = torch.bmm(a[:, r0:], rows.mT)
            if alpha != 1.0:
                col.mul_(alpha)
        else:
            col = torch.baddbmm(c[:, r0:, r0:r1], a[:, r0:], rows.mT, beta=beta, alpha=alpha)
        out[:, r0:, r0:r1] = col
        if r1 < m:
            out[:, r0:r1, r1:] = col[:, r1 - r0:].mT
    return out


def _fold(x: Tensor, blocked: bool) -> bool:
    """Whether the blocked forms fold ``a X`` into the product as ``(a I + B) X`` (saving the
    pass that copies ``X`` into ``baddbmm``'s output): only with blocking active and in float32
    / float64. In bf16 the rounded ``a I + B`` (diagonal ~3) doubled the error against the
    float64 iteration (5e-3 instead of 3e-3 on 512x1376 Gaussian inputs)."""
    return (blocked and x.dtype in (torch.float32, torch.float64)
            and bool(_block_rows(x.shape[-2], x.device)))


def _polynomial_iterations(
    x: Tensor, coefficients: Sequence[tuple[float, float, float]], blocked: bool = False
) -> Tensor:
    """``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` for each ``(a, b, c)`` (X is wide).

    Unblocked: torch.optim.Muon's products exactly (the ``"standard"`` form). ``blocked`` (the
    ``"symmetric"`` form): ``A`` and ``b A + c A^2`` as :func:`symmetric_product` s, and in
    float32 / float64 ``X <- (a I + b A + c A^2) X`` (:func:`_fold`).
    """
    fold = _fold(x, blocked)
    for a, b, c in coefficients:
        gram = symmetric_product(x, x, transpose_b=True, blocked=blocked)
        poly = symmetric_product(gram, gram, c=gram, alpha=c, beta=b, blocked=blocked)
        if fold:
            poly.diagonal(dim1=-2, dim2=-1).add_(a)
            x = torch.bmm(poly, x)
        else:
            x = torch.baddbmm(x, poly, x, beta=a)
    return x


def _gram_iterations(
    x: Tensor, coefficients: Sequence[tuple[float, float, float]], blocked: bool = False
) -> Tensor:
    """The same iterations on the Gram matrix: ``X_k = Q_k X_0`` (X is wide, ``m <= n``).

    With ``Z = b R + c R^2`` and ``P = a I + Z``: ``Q <- P Q``, ``R <- P R P``
    (``= X_{k+1} X_{k+1}^T``: ``P`` and ``R`` commute). Rounding noise in ``R`` sits at
    ``sqrt(eps)`` in singular-value terms and grows by ``a^2`` per iteration, so ``X`` and
    ``R`` are re-formed every :data:`GRAM_RESTART` iterations (in bf16 / fp16 every
    :data:`GRAM_RESTART_16BIT` after the first: :func:`_gram_restarts`), as Dao-AILab's version
    restarts; without that, float32 diverges after ~7 iterations. Every product but the two
    ``Q X`` is symmetric (``P``, ``Q``, ``R`` are polynomials in ``R_0``), so ``blocked``
    computes them as :func:`symmetric_product` s. In float32 / float64 ``P`` is formed and
    multiplied; in lower precisions (where the rounded ``P``, diagonal ~3, costs accuracy:
    :func:`_fold`) ``a`` stays out of the products, ``Q <- a Q + Z Q``,
    ``R <- a (a R + R Z) + Z (a R + R Z)``, as Dao-AILab's version computes them.
    """
    fold = x.dtype in (torch.float32, torch.float64)
    last = len(coefficients) - 1
    restarts = _gram_restarts(last + 1, x.element_size() >= 4)
    q = r = None
    for k, (a, b, c) in enumerate(coefficients):
        if k in restarts:
            if q is not None:
                x = q @ x
            r, q = symmetric_product(x, x, transpose_b=True, blocked=blocked), None
        z = symmetric_product(r, r, c=r, alpha=c, beta=b, blocked=blocked)
        if fold or q is None:
            p = z if fold else z.clone()
            p.diagonal(dim1=-2, dim2=-1).add_(a)
        if q is None:
            q = p
        elif fold:
            q = symmetric_product(p, q, blocked=blocked)
        else:
            q = symmetric_product(z, q, c=q, beta=a, blocked=blocked)
        if k < last and k + 1 not in restarts:
            if fold:
                r = symmetric_product(symmetric_product(p, r, blocked=blocked), p,
                                      blocked=blocked)
            else:
                rz = symmetric_product(r, z, c=r, beta=a, blocked=blocked)
                r = symmetric_product(z, rz, c=rz, beta=a, blocked=blocked)
    return q @ x


def _gram_restarts(steps: int, wide_dtype: bool) -> set[int]:
    """Iterations at which the Gram form starts from a re-formed ``X`` and ``R`` (0 included):
    every :data:`GRAM_RESTART`, or for 16-bit dtypes (not ``wide_dtype``) at
    :data:`GRAM_RESTART` and every :data:`GRAM_RESTART_16BIT` after it."""
    if wide_dtype:
        return set(range(0, steps, GRAM_RESTART))
    return {0} | set(range(GRAM_RESTART, steps, GRAM_RESTART_16BIT))


def resolve_form(form: str, shape: Sequence[int], dtype: torch.dtype) -> str:
    """The Newton-Schulz evaluation (``"standard"``, ``"symmetric"`` or ``"gram"``) that
    ``ns_form=form`` takes for a ``shape`` matrix of ``dtype``: ``"auto"`` is ``"gram"`` for
    matrices at least :data:`GRAM_MIN_ASPECT` times as wide as tall (either orientation),
    ``"symmetric"`` otherwise."""
    if form != "auto":
        return form
    m, n = sorted(shape[-2:])
    return "gram" if n >= GRAM_MIN_ASPECT * m else "symmetric"


def newton_schulz(
    g: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    eps_form: str = "clamp",
    form: str = "standard",
) -> Tensor:
    """Keller Jordan's quintic Newton-Schulz on a batch ``(B, m, n)``; returns ``dtype``.

    With ``form="standard"`` the same operation order as ``torch.optim.Muon`` (normalise by
    ``max(||X||_F, eps)``, then ``addmm`` forms), so the two agree bit for bit in bf16.
    ``eps_form="add"`` normalises by ``||X||_F + eps`` instead, as Keller Jordan's original
    code and the references that copy it (HybridAuON, COSMOS) do. ``form`` is one of
    :data:`NS_FORMS` (module docstring). On CPU the batch runs in chunks of
    :func:`_chunk_size` matrices.
    """
    x = g.to(dtype or g.dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    form = resolve_form(form, x.shape, x.dtype)
    coeffs = [tuple(coefficients)] * steps
    chunk = _chunk_size(x.shape[0], x.shape[-2] * x.shape[-1], x.dtype, x.device)
    if chunk >= x.shape[0]:
        out = _normalized_iterations(x, coeffs, eps, eps_form, form, owned=False)
    else:
        out = torch.cat([_normalized_iterations(part, coeffs, eps, eps_form, form, owned=False)
                         for part in x.split(chunk)])
    return out.mT if tall else out


def _normalized_iterations(
    x: Tensor, coefficients: Sequence[tuple[float, float, float]], eps: float, eps_form: str,
    form: str, owned: bool,
) -> Tensor:
    """Newton-Schulz of a wide batch (a view of a tall one's transpose with the standard
    form): normalise (in place when ``owned``), then iterate in ``form`` (not ``"auto"``)."""
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    denominator = norm + eps if eps_form == "add" else norm.clamp_min(eps)
    x = x.div_(denominator) if owned else x / denominator
    if form == "standard":
        return _polynomial_iterations(x, coefficients)
    # contiguous: a tall input's transpose would have its row blocks copied in every product
    iterate = _gram_iterations if form == "gram" else _polynomial_iterations
    return iterate(x.contiguous(), coefficients, blocked=True)


def _chunk_size(count: int, numel: int, dtype: torch.dtype, device: torch.device) -> int:
    """Matrices per batched Newton-Schulz call, for ``count`` matrices of ``numel`` elements:
    on CPU, enough for about :data:`NS_CHUNK_BYTES` of ``X`` (at least 2: a batch of one runs
    bf16 ``bmm`` 1.2x slower), so the iterates stay in cache (16 512x512 bf16 matrices at once
    ran 1.2x slower than chunks of 2-8); all of them elsewhere."""
    if device.type != "cpu":
        return count
    return max(2, NS_CHUNK_BYTES // max(1, numel * dtype.itemsize))


def _newton_schulz_matrices(
    mats: Sequence[Tensor], dtype: torch.dtype, steps: int,
    coefficients: tuple[float, float, float], eps: float, eps_form: str, form: str,
) -> list[Tensor]:
    """:func:`newton_schulz` of each matrix, each cast back to its dtype: batched by shape in
    :func:`_chunk_size` chunks, each stacked in one casting copy, in the wide orientation
    (transposing a tall matrix on the way) for the blocked forms and as it is for the
    standard one (whose normalisation then sums in torch.optim.Muon's order)."""
    coeffs = [tuple(coefficients)] * steps
    out: list[Tensor | None] = [None] * len(mats)
    for (shape, _, device), idx in shape_groups(mats).items():
        tall = shape[0] > shape[1]
        wide = (shape[1], shape[0]) if tall else shape
        concrete = resolve_form(form, wide, dtype)
        stack_shape = shape if concrete == "standard" else wide
        chunk = _chunk_size(len(idx), math.prod(shape), dtype, device)
        for start in range(0, len(idx), chunk):
            part = idx[start:start + chunk]
            x = torch.empty((len(part),) + tuple(stack_shape), dtype=dtype, device=device)
            for j, i in enumerate(part):
                x[j].copy_(mats[i].mT if tall and concrete != "standard" else mats[i])
            if tall and concrete == "standard":
                x = x.mT
            result = _normalized_iterations(x, coeffs, eps, eps_form, concrete, owned=True)
            for j, i in enumerate(part):
                out[i] = (result[j].mT if tall else result[j]).to(mats[i].dtype)
    return out  # type: ignore[return-value]


def polar_express(
    g: Tensor, steps: int = 5, eps: float = 1e-6, dtype: torch.dtype | None = None
) -> Tensor:
    """Polar Express (arXiv 2505.16932) on a batch ``(B, m, n)``: ``X / (1.02 ||X||_F + eps)``
    then one tuned quintic per iteration (at most 5)."""
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFICIENTS):
        raise ValueError(
            f"invalid ns_steps={steps} for polar_express: the schedule has "
            f"{len(POLAR_EXPRESS_COEFFICIENTS)} iterations"
        )
    x = g.to(dtype or g.dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / (norm * 1.02 + eps)
    x = _polynomial_iterations(x, POLAR_EXPRESS_COEFFICIENTS[:steps])
    return x.mT if tall else x


def svd_polar(g: Tensor, dtype: torch.dtype | None = None, rtol: float | None = None) -> Tensor:
    """Exact polar factor ``U V^T`` of each matrix of a batch (thin SVD in ``dtype``).

    Singular values below ``rtol * sigma_max`` (default: the dtype's machine epsilon times
    ``max(m, n)``) are treated as zero, so rank-deficient inputs give a partial isometry.
    """
    x = g.to(dtype or g.dtype)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if rtol is None:
        rtol = torch.finfo(x.dtype).eps * max(x.shape[-2:])
    keep = (s > rtol * s.amax(dim=-1, keepdim=True)).to(x.dtype)
    return (u * keep.unsqueeze(-2)) @ vh


def orthogonalize(
    g: Tensor,
    method: str = "newton_schulz",
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    eps_form: str = "clamp",
    form: str = "standard",
) -> Tensor:
    """Approximate polar factor of a matrix or a batch of matrices, in ``dtype``.

    ``eps_form`` (Newton-Schulz only): ``"clamp"`` divides by ``max(||X||_F, eps)``
    (torch.optim.Muon), ``"add"`` by ``||X||_F + eps`` (Keller Jordan's original code).
    ``form`` (Newton-Schulz only): one of :data:`NS_FORMS`.
    """
    squeeze = g.ndim == 2
    x = g[None] if squeeze else g
    if method == "newton_schulz":
        out = newton_schulz(x, steps, coefficients, eps, dtype, eps_form, form)
    elif method == "polar_express":
        out = polar_express(x, steps, dtype=dtype)
    elif method == "svd":
        out = svd_polar(x, dtype).to(dtype or g.dtype)
    else:
        raise ValueError(f"unknown orthogonalizer {method!r}; expected one of {ORTHOGONALIZERS}")
    return out[0] if squeeze else out


def orthogonalize_matrices(mats: Sequence[Tensor], group: dict[str, Any],
                           method: str | None = None) -> list[Tensor]:
    """Each matrix's orthogonalization with a group's options, batched by shape (Newton-Schulz
    on CPU: in cache-sized chunks, :func:`_newton_schulz_matrices`) and cast back to each
    matrix's dtype.

    Options: ``orthogonalizer`` (or ``method``), ``ns_steps``, ``ns_coefficients``,
    ``ns_eps``, ``ns_dtype``, ``ns_eps_form`` (default ``"clamp"``) and ``ns_form`` (default
    ``"standard"``).
    """
    if not mats:
        return []
    dtype = resolve_dtype(group["ns_dtype"], mats[0].device, mats[0].dtype)
    method = method or group["orthogonalizer"]
    steps = int(group["ns_steps"])
    coeffs = tuple(group.get("ns_coefficients", NS_COEFFICIENTS))
    eps = float(group["ns_eps"])
    eps_form = group.get("ns_eps_form", "clamp")
    form = group.get("ns_form", "standard")
    if method == "newton_schulz":
        return _newton_schulz_matrices(mats, dtype, steps, coeffs, eps, eps_form, form)
    outs = map_by_shape(
        mats, lambda x: orthogonalize(x, method, steps, coeffs, eps, dtype, eps_form, form))
    return [o.to(x.dtype) for o, x in zip(outs, mats)]


def lapack_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for QR / SVD / Cholesky: at least float32 (no bf16/fp16 kernels)."""
    return torch.promote_types(dtype, torch.float32)


# ---- update-scale conventions -------------------------------------------------------------
#: multiplier of the learning rate for an ``m x n`` (d_out x d_in) matrix update; a >2-D kernel
#: uses its matrix view ``(out, in * kh * kw)`` (Keller's code takes ``kh / kw`` from the 4-D
#: gradient instead, which is 1 for square kernels; the two agree whenever out <= in * kh * kw)
SHAPE_SCALES: dict[str, Callable[[int, int], float]] = {
    "keller": lambda m, n: math.sqrt(max(1.0, m / n)),  # Keller Jordan; torch "original"
    "moonlight": lambda m, n: 0.2 * math.sqrt(max(m, n)),  # torch "match_rms_adamw"
    "dion": lambda m, n: math.sqrt(m / n),  # Dion; microsoft/dion "spectral_norm"
    "none": lambda m, n: 1.0,
}
SHAPE_SCALE_ALIASES = {"original": "keller", "match_rms_adamw": "moonlight",
                       "spectral_norm": "dion"}


def shape_scale(convention: str, shape: Shape) -> float:
    """LR multiplier of a convention in :data:`SHAPE_SCALES` (aliases accepted)."""
    key = SHAPE_SCALE_ALIASES.get(convention, convention)
    if key not in SHAPE_SCALES:
        raise ValueError(
            f"unknown shape_scale {convention!r}; expected one of "
            f"{sorted(SHAPE_SCALES) + sorted(SHAPE_SCALE_ALIASES)} or 'rms'"
        )
    return SHAPE_SCALES[key](*matrix_dims(shape))


def check_shape_scale(name: str, convention: Any, allow_rms: bool = True) -> None:
    """Raise ValueError unless ``convention`` names a scale convention."""
    known = set(SHAPE_SCALES) | set(SHAPE_SCALE_ALIASES) | ({"rms"} if allow_rms else set())
    if convention not in known:
        raise ValueError(f"{name}: invalid shape_scale={convention!r}: one of {sorted(known)}")


# ---- transforms ---------------------------------------------------------------------------
class MuonMomentum(Transform):
    """Keller Jordan's / torch.optim.Muon's momentum, in their exact ``lerp`` form.

    ``b.lerp_(g, 1 - momentum)``; output ``g.lerp(b, momentum)`` with ``nesterov`` (a fresh
    tensor: the gradient is not touched) and ``b`` otherwise. State ``momentum_buffer`` (the
    name torch.optim.Muon uses). Hyperparameters ``momentum``, ``nesterov``.
    """

    elementwise = True

    slot_names = ("momentum_buffer",)

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        return [SlotSpec("momentum_buffer", shape)]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        mu = float(ctx.hp("momentum"))
        bufs = ctx.slot("momentum_buffer")
        torch._foreach_lerp_(bufs, updates, 1 - mu)
        if ctx.hp("nesterov"):
            return torch._foreach_lerp(updates, bufs, mu)
        return bufs


class Orthogonalize(Transform):
    """Replace each update by its (approximate) polar factor, batched over same shapes.

    Hyperparameters: ``orthogonalizer`` (one of :data:`ORTHOGONALIZERS`), ``ns_steps``,
    ``ns_coefficients`` (Newton-Schulz only), ``ns_eps``, ``ns_dtype`` (module docstring) and,
    optionally, ``ns_eps_form`` (:data:`NS_EPS_FORMS`, default ``"clamp"``) and ``ns_form``
    (:data:`NS_FORMS`, default ``"standard"``).
    The result is cast back to the update's dtype and shape.
    """

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        mats = [matrix_view(u, ctx.name(i)) for i, u in enumerate(updates)]
        outs = orthogonalize_matrices(mats, ctx.group)
        return [o.reshape(u.shape) for o, u in zip(outs, updates)]


class ShapeScale(Transform):
    """The update-scale convention ``group[key]`` (:data:`SHAPE_SCALES`) as a step scale.

    The multiplier goes into the plan, so the shell folds it into the step size
    (``alpha = -lr * s``), as torch.optim.Muon's ``adjust_lr``: results match it bit for bit.
    ``"rms"`` instead rescales each update to RMS ``group["rms_target"]``
    (``u * target * sqrt(mn) / ||u||_F``).
    """

    row_shardable = True  # the whole shape from ctx.shapes; "rms" norms reduced over shards

    def __init__(self, key: str = "shape_scale") -> None:
        self.key = key

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        convention = ctx.hp(self.key)
        if convention == "rms":
            groups = [shard_group(s) for s in ctx.shapes]
            if any(g is not None for g in groups):
                return [rms_rescale_shard(u, float(ctx.hp("rms_target")), whole_shape(s), g)
                        for u, s, g in zip(updates, ctx.shapes, groups)]
            return rms_rescale(updates, float(ctx.hp("rms_target")))
        for i, u in enumerate(updates):
            s = ctx.shapes[i] if ctx.shapes else None
            shape = s.whole if isinstance(s, ShardedShape) else tuple(u.shape)
            ctx.plan.scale[i] = ctx.plan.scale[i] * shape_scale(convention, shape)
        return updates


def rms_rescale_shard(u: Tensor, target: float, whole: tuple[int, ...], group: Any) -> Tensor:
    """:func:`rms_rescale` of one shard, its norm completed over ``group``."""
    sq = all_reduce_sum(u.square().sum().reshape(1), group)
    return u * (target * math.sqrt(math.prod(whole)) / sq.sqrt().clamp_min(1e-30))


def rms_rescale(updates: list[Tensor], target: float) -> list[Tensor]:
    """Each update times ``target * sqrt(numel) / ||u||_F`` (RMS ``target``; 0 stays 0)."""
    norms = torch._foreach_norm(updates)
    factors = [target * math.sqrt(u.numel()) / n.clamp_min(1e-30) for u, n in
               zip(updates, norms)]
    return torch._foreach_mul(updates, factors)


class RMSRescale(Transform):
    """Rescale each update to RMS ``target`` (AdaMuon's ``0.2 sqrt(mn) / ||U||_F``)."""

    def __init__(self, target: float | None = None, key: str = "rms_target") -> None:
        self.target = target
        self.key = key

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        target = self.target if self.target is not None else float(ctx.hp(self.key))
        return rms_rescale(updates, target)


class ScaleByOrthoSecondMoment(Transform):
    """AdaMuon's element-wise variance adaptation of the orthogonalized update.

    ``v = beta * v + (1 - beta) * O^2`` with ``beta = group["momentum"]`` (AdaMuon reuses the
    momentum decay; no bias correction); output ``O / (sqrt(v) + eps)``. State ``exp_avg_sq``.
    """

    slot_names = ("exp_avg_sq",)

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        return [SlotSpec("exp_avg_sq", shape, "unsigned")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta = float(ctx.hp("momentum"))
        v = ctx.slot("exp_avg_sq")
        torch._foreach_mul_(v, beta)
        torch._foreach_addcmul_(v, updates, updates, value=1 - beta)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, float(ctx.hp("eps")))
        return torch._foreach_div(updates, denom)


def dion_rank(shape: Shape, rank_fraction: float) -> int:
    """Dion's rank ``r = ceil(rank_fraction * min(m, n))`` (at least 1) for a matrix view."""
    m, n = matrix_dims(shape)
    return max(1, min(m, n, math.ceil(rank_fraction * min(m, n))))


class DionUpdate(Transform):
    """Dion's low-rank orthonormal update with error feedback (Ahn et al., arXiv 2504.05295),
    single-process form of microsoft/dion ``dion_simple.py``.

    ``M += G``; ``P = QR(M Q)`` (Householder QR, at least float32); ``R = M^T P``;
    ``M -= (1 - momentum) P R^T``; ``Q = R / (||R||_col + eps)``; output ``P Q^T`` (the caller
    applies the ``sqrt(m / n)`` scale and weight decay). ``Q`` starts as ``randn(n, r)`` from
    torch's global generator, as the reference. State: ``momentum`` (m x n), ``Q`` (n x r).
    One QR per matrix, so this loops over parameters (the QR dominates the cost).

    On row shards of a sharded matrix (FSDP2), Dion's distributed form: each rank keeps its
    rows of ``M`` and the whole ``Q``, computes its rows of ``P = M Q``, and only low-rank
    matrices cross ranks: ``P`` is all-gathered (``m x r``) for its QR, which every rank takes
    alike (the paper's distributed orthogonalization is a Cholesky/randomized QR; a Householder
    QR of the gathered ``P`` moves the same ``O(m r)`` numbers and keeps the single-process
    result exactly, also where ``P`` is rank-deficient and its factor is not unique), and
    ``R = M^T P`` is all-reduced (``n x r``). No full ``m x n`` matrix is communicated.
    """

    slot_names = ("momentum", "Q")
    row_shardable = True
    replicated_slots = ("Q",)

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        m, n = matrix_dims(shape)
        r = dion_rank(whole_shape(shape), float(group["rank_fraction"]))
        return [SlotSpec("momentum", (m, n)), SlotSpec("Q", (n, r), "exact")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        mu, eps = float(ctx.hp("momentum")), float(ctx.hp("eps"))
        out = []
        moms, qs, fresh = ctx.slot("momentum"), ctx.slot("Q"), ctx.fresh("Q")
        for i, (g, m, q) in enumerate(zip(updates, moms, qs)):
            gm = matrix_view(g, ctx.name(i))
            if fresh[i]:  # Q starts as randn(n, r) from torch's global generator
                q.copy_(torch.randn(q.shape, device=g.device, dtype=g.dtype))
            m.add_(gm.to(m.dtype))
            p = m @ q.to(m.dtype)
            qr_dtype = lapack_dtype(p.dtype)
            shape = ctx.shapes[i]
            if isinstance(shape, ShardedShape):
                p = qr_of_rows(p, shape, qr_dtype).to(m.dtype)
            else:
                p = torch.linalg.qr(p.to(qr_dtype)).Q.to(m.dtype)
            r_mat = all_reduce_sum(m.T @ p, shard_group(shape))
            m.addmm_(p, r_mat.T, alpha=-(1 - mu))
            r32 = r_mat.to(qr_dtype)
            q.copy_(r32 / (r32.norm(dim=0, keepdim=True) + eps))
            out.append((p @ q.T.to(p.dtype)).to(g.dtype).reshape(g.shape))
        return out


def qr_of_rows(p: Tensor, shape: ShardedShape, dtype: torch.dtype) -> Tensor:
    """This rank's rows of the orthonormal factor of the ``m x r`` matrix whose rows are split
    over ``shape.group``: the rows are all-gathered (``m r`` numbers) and every rank takes the
    same Householder QR of the whole, so the result is the single-process one exactly (even
    for a rank-deficient ``P``, where the factor is not unique)."""
    whole_rows = matrix_dims(shape.whole)[0]
    world = dist.get_world_size(shape.group)
    sizes = chunk_sizes(whole_rows, world)
    step = sizes[0]
    padded = torch.zeros(step, p.shape[1], dtype=p.dtype, device=p.device)
    padded[:p.shape[0]] = p
    parts = torch.empty(world * step, p.shape[1], dtype=p.dtype, device=p.device)
    dist.all_gather_into_tensor(parts, padded, group=shape.group)
    whole = torch.cat([parts[r * step:r * step + n] for r, n in enumerate(sizes)])
    q = torch.linalg.qr(whole.to(dtype)).Q
    me = dist.get_rank(shape.group)
    start = sum(sizes[:me])
    return q[start:start + sizes[me]]


class NAMOUpdate(Transform):
    """NAMO / NAMO-D's direction and adaptive step (Zhang et al., "Adam Improves Muon", arXiv
    2602.17080), as minxin-zhg/namo ``src/namo.py``.

    ``M`` is Muon's EMA momentum (``momentum``, Nesterov look-ahead ``M~`` with ``nesterov``),
    ``O = orth(M~)`` (the :class:`Orthogonalize` options), ``bc1 = 1 - momentum^t``,
    ``bc2 = 1 - mu2^t``, ``s = scale_coeff * sqrt(max(m, n))``. The direction is ``O``; the
    step size and the weight-decay rate are adaptive, so they go into the plan (absolute: the
    learning rate is inside them):

    - NAMO (scalar): ``v = mu2 v + (1 - mu2) ||G||_F^2`` (raw gradient);
      ``a = lr sqrt(bc2) / (bc1 + 1e-12) * ||M~||_F / (sqrt(v) + eps)``;
      ``W <- W (1 - wd min(a, 1)) - min(a s, 1) O``. State ``momentum_buffer``, ``v_squared``.
    - NAMO-D (``columnwise``): ``V = mu2 V + (1 - mu2) ||G_:,j||^2`` per column;
      ``c_j = ||M~_:,j|| / (sqrt(V_j) + eps)`` clamped to ``[c mean, mean / c]`` with
      ``c = col_clamp`` when ``0 < c <= 1``; ``b = lr sqrt(bc2) / (bc1 + 1e-12)``;
      column ``j`` decays by ``max(1 - wd min(c_j b, 1), 0)`` and moves by
      ``min(c_j b s, 1) O_:,j``. State ``momentum_buffer``, ``V`` (n).
    """

    def __init__(self, columnwise: bool) -> None:
        self.columnwise = columnwise
        self.stat = "V" if columnwise else "v_squared"
        self.slot_names = ("momentum_buffer", self.stat)
        self.orthogonalize = Orthogonalize()

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        stat = (matrix_dims(shape)[1],) if self.columnwise else ()
        return [SlotSpec("momentum_buffer", shape), SlotSpec(self.stat, stat, "unsigned")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        group = ctx.group
        mu, mu2, eps = float(group["momentum"]), float(group["mu2"]), float(group["eps"])
        lr, wd, coeff = float(group["lr"]), float(group["weight_decay"]), float(
            group["scale_coeff"])
        # second-moment statistics of the raw gradient
        stats = ctx.slot(self.stat)
        for g, stat in zip(updates, stats):
            g2 = matrix_view(g)
            stat.mul_(mu2).add_(g2.square().sum(dim=0) if self.columnwise else g2.square().sum(),
                                alpha=1 - mu2)
        bufs = ctx.slot("momentum_buffer")
        torch._foreach_lerp_(bufs, updates, 1 - mu)
        looks = torch._foreach_lerp(updates, bufs, mu) if group["nesterov"] else bufs
        orth = self.orthogonalize(ctx, looks)
        for i, (o, look, stat, p, p2) in enumerate(zip(orth, looks, stats, ctx.powers(mu),
                                                       ctx.powers(mu2))):
            base = lr * root(1 - p2) / ((1 - p) + 1e-12)
            m, n = matrix_dims(tuple(o.shape))
            shape_factor = coeff * math.sqrt(max(m, n))
            look2 = matrix_view(look)
            if not self.columnwise:
                alpha = base * torch.linalg.vector_norm(look2) / (stat.sqrt() + eps)
                ctx.plan.decay_rate[i] = alpha.clamp(max=1.0)
                ctx.plan.scale[i] = (alpha * shape_factor).clamp(max=1.0)
                ctx.plan.absolute[i] = True
                continue
            scale = column_norms(look2, dim=0).squeeze(0) / (stat.sqrt() + eps)
            c = float(group["col_clamp"])
            if 0.0 < c <= 1.0:
                mean = scale.nanmean()
                ok = torch.isfinite(mean) & (mean > 0)
                lo = torch.where(ok, mean * c, torch.zeros_like(mean))
                hi = torch.where(ok, mean / c, torch.full_like(mean, math.inf))
                scale = torch.clamp(scale, min=lo, max=hi)
            # the reference clamps the decay factor at 0: a rate of at most 1 / wd
            cap = min(1.0, 1.0 / wd) if wd > 0 else 1.0
            ctx.plan.decay_rate[i] = (scale * base).clamp(max=cap)
            ctx.plan.scale[i] = (scale * base * shape_factor).clamp(max=1.0)
            ctx.plan.absolute[i] = True
        return orth


class CoshBrake(Transform):
    """AuON's cosh-based normalization (ryyzn9/AuON ``auon/optimizer.py``):
    ``u / (sqrt(mean(cosh(gamma * u / (||u||_F + 1e-7))^2)) + 1e-8)`` (``gamma`` = γ)."""

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        gamma = float(ctx.hp("gamma"))
        norms = torch._foreach_norm(updates)
        out = []
        for u, nrm in zip(updates, norms):
            r = torch.cosh(u * (gamma / (nrm + 1e-7))).square().mean().sqrt()
            out.append(u / (r + 1e-8))
        return out
