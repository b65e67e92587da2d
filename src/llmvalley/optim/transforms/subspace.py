"""Subspace and compressed-state transforms: Subset-Norm / Subspace-Momentum, DCT column
selection, and SMMF's square-matricized factored moments.

- :class:`ScaleBySubsetNorm` (Nguyen et al., ICML'25, timmytonga/sn-sm): Adam's denominator
  with one second moment per *subset* of coordinates (the sum of the squared gradient over the
  subset), so it keeps ``max(m, n)`` numbers for an ``m x n`` matrix.
- :class:`MomentumSubspace` + :class:`SubspaceEMA` (the same paper's Subspace-Momentum): the
  first moment lives in a rank-``r`` subspace (SVD, top-k rows/columns or uniformly sampled
  rows/columns) and is reset when the subspace changes; the complement passes through as plain
  SGD (:class:`PassThrough` as the residual of an :class:`~.combine.InBasis`).
- :class:`DCTColumns` + :class:`RotatingBasis` (Modoranu et al., arXiv 2505.17967,
  ista-daslab-optimizers ``fft_low_rank``): ``r`` columns of a fixed orthogonal DCT matrix
  chosen by their alignment with the gradient; only the ``r`` indices are state, and the inner
  chain's moments are rotated into the new subspace when the selection changes.
- :class:`ScaleBySMMF` (Park et al., AAAI'25, eai-lab/SMMF): both moments of a tensor
  reshaped to a near-square matrix, kept as rank-1 non-negative factors (row and column sums),
  the first moment's signs as one bit per element.

Projectors see tensors as ``(out, -1)`` matrices (:func:`~.orthogonalize.matrix_view`) and
raise ``ValueError`` naming the parameter when the rank is not below the matrix's smaller side.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import (
    Shape,
    SlotSpec,
    StepContext,
    Transform,
    add_scaled_,
    numel,
    root,
)
from llmvalley.optim.transforms.combine import InBasis, Projector
from llmvalley.optim.transforms.orthogonalize import lapack_dtype, matrix_dims, matrix_view

Group = Mapping[str, Any]

SM_PROJ_TYPES = ("svd", "topk", "uniform")
DCT_SIM_TYPES = ("matmul", "makhoul")


# ---- small pieces ---------------------------------------------------------------------------
class PassThrough(Transform):
    """The identity: as the residual of an :class:`~.combine.InBasis` it adds back what the
    projection leaves out, unchanged (Subspace-Momentum's SGD on the complement)."""

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        return updates


class BiasCorrection(Transform):
    """Divide by ``1 - beta1**t`` (``beta1 = betas[0]``): the first-moment bias correction that
    the sn-sm reference applies to its whole numerator (subspace momentum plus complement)."""

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1 = ctx.hp("betas")[0]
        return [u / (1 - p) for u, p in zip(updates, ctx.powers(beta1))]


def check_rank(shape: Shape, group: Group, name: str = "") -> int:
    """``group["rank"]``, after checking it is below the smaller side of the matrix view of
    ``shape`` (a ``ValueError`` naming the parameter otherwise)."""
    rank = int(group["rank"])
    m, n = matrix_dims(shape)
    if rank >= min(m, n):
        method = group.get("optimizer", "this optimizer")
        raise ValueError(
            f"{method}: rank={rank} must be smaller than the smaller side of "
            f"{name or 'a parameter'} (matrix view {m} x {n}): a rank-{rank} subspace would "
            "not compress it; lower rank, or route this parameter to another optimizer")
    return rank


class CheckedBasis(InBasis):
    """An :class:`~.combine.InBasis` whose declared state first checks the rank against each
    parameter's shape, so a bad rank is reported with the parameter's name (at the first step,
    or by ``state_bytes`` before it)."""

    def slots(self, shape, group, name=""):
        check_rank(shape, group, name)
        return super().slots(shape, group, name)

    def inner_slots(self, shape, group, name=""):
        check_rank(shape, group, name)
        return super().inner_slots(shape, group, name)


def _due(ctx: StepContext, i: int, fresh: bool) -> bool:
    """Whether tensor ``i`` takes a new subspace now: at its first step (or when its basis
    state is new) and every ``update_proj_gap`` steps (``t % gap == 0``, as sn-sm and DCT)."""
    return fresh or ctx.steps[i] % int(ctx.hp("update_proj_gap")) == 0


# ---- Subset-Norm -----------------------------------------------------------------------------
def closest_divisor_below(n: int, k: int) -> int:
    """The largest divisor of ``n`` that is at most ``k`` (sn-sm's subset size rule)."""
    for d in range(min(k, n), 0, -1):
        if n % d == 0:
            return d
    return 1


def subset_layout(shape: Shape, subset_size: Any) -> tuple[Shape, int]:
    """How Subset-Norm groups a tensor: ``(view shape, dim summed over)``.

    ``"heuristics"`` (the paper's rule for a ``m x n`` matrix view): one subset per row when
    ``m >= n`` (the sum runs over the short side), else one per column, so the state has
    ``max(m, n)`` entries. An int ``k > 0``: subsets of ``d`` consecutive elements of the
    flattened tensor, ``d`` the largest divisor of its size that is ``<= k``; ``k < 0``: the
    same with ``k = int(sqrt(numel) / |k|)``.
    """
    if subset_size == "heuristics":
        m, n = matrix_dims(shape)
        return (m, n), (1 if m >= n else 0)
    total = numel(shape)
    k = int(subset_size)
    if k < 0:
        k = int(math.sqrt(total) / abs(k))
    if k < 1:
        raise ValueError(f"invalid subset_size={subset_size!r}: gives subsets of {k} elements "
                         f"for a tensor of {total}")
    d = closest_divisor_below(total, k)
    return (total // d, d), 1


class ScaleBySubsetNorm(Transform):
    """Subset-Norm's adaptive step (Nguyen et al., ICML'25), as sn-sm ``subset_norm.py``.

    ``v = beta2 v + (1 - beta2) sum_{subset} g**2`` (the *sum*, not the mean, of the squared
    gradient ``ctx.grads`` over each subset, see :func:`subset_layout`); the direction is
    ``u * sqrt(1 - beta2**t) / (sqrt(v) + eps)`` broadcast over each subset. The input ``u``
    is the already debiased numerator (``m / (1 - beta1**t)``), so with an EMA in front this is
    the reference's HF-style step ``lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps)``.
    State ``exp_avg_sq`` (``(rows, 1)`` or ``(1, cols)`` for the heuristic rule).
    """

    per_tensor = True

    slot_names = ("exp_avg_sq",)

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        view, dim = subset_layout(shape, group["subset_size"])
        kept = (view[0], 1) if dim == 1 else (1, view[1])
        return [SlotSpec("exp_avg_sq", kept, "unsigned")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta2, eps = ctx.hp("betas")[1], ctx.hp("eps")
        size = ctx.hp("subset_size")
        out = []
        for i, (u, g, v, p) in enumerate(zip(updates, ctx.grads, ctx.slot("exp_avg_sq"),
                                            ctx.powers(beta2))):
            view, dim = subset_layout(ctx.shapes[i], size)
            v.mul_(beta2).add_(g.reshape(view).square().sum(dim=dim, keepdim=True),
                               alpha=1 - beta2)
            denom = v.sqrt().add_(eps)
            out.append((u.reshape(view) / denom).mul_(root(1 - p))
                       .reshape(u.shape))
        return out


# ---- Subspace-Momentum -----------------------------------------------------------------------
def sm_layout(shape: Shape, group: Group) -> tuple[str, Shape]:
    """Subspace-Momentum's projection of a ``m x n`` matrix: ``(kind, projected shape)``.

    ``proj_type="svd"``: ``"right"`` (``X B^T``, ``B`` the top-``r`` right singular vectors,
    ``m >= n``) or ``"left"`` (``A^T X``, ``A`` the top-``r`` left ones); ``"topk"`` /
    ``"uniform"``: ``r`` of the ``m`` rows when ``m >= n`` (``"rows"``), else ``r`` of the
    ``n`` columns (``"cols"``), as sn-sm's projectors.
    """
    m, n = matrix_dims(shape)
    r = int(group["rank"])
    if group["proj_type"] == "svd":
        return ("right", (m, r)) if m >= n else ("left", (r, n))
    return ("rows", (r, n)) if m >= n else ("cols", (m, r))


def stream_seed(seed: int, name: str, step: int) -> int:
    """The seed of one random draw: a function of the group's ``seed``, the parameter's name
    and its step, so a resumed run draws the same subspaces without stored generator state."""
    return zlib.crc32(f"{seed}/{name}/{step}".encode())


class MomentumSubspace(Projector):
    """Subspace-Momentum's projector (timmytonga/sn-sm ``projectors/``).

    At the first step and every ``update_proj_gap`` steps the subspace is recomputed from the
    update: the SVD's top ``rank`` singular vectors on the short side (``"svd"``, state
    ``ortho``: ``(r, n)`` or ``(m, r)``, as the reference's ``ortho_matrix``), the ``rank``
    rows/columns of largest norm (``"topk"``) or ``rank`` uniformly drawn ones (``"uniform"``,
    drawn from :func:`stream_seed`); the last two keep ``indices`` (``rank`` numbers).
    Projection and back are the reference's (selection back-maps into zeros).
    """

    slot_names = ("ortho", "indices")

    def slots(self, shape: Shape, group: Group) -> list[SlotSpec]:
        kind, low = sm_layout(shape, group)
        if kind == "right":
            return [SlotSpec("ortho", (low[1], shape[1]), "exact")]
        if kind == "left":
            return [SlotSpec("ortho", (shape[0], low[0]), "exact")]
        return [SlotSpec("indices", (int(group["rank"]),), "exact")]

    def projected_shape(self, shape: Shape, group: Group) -> Shape:
        return sm_layout(shape, group)[1]

    def refresh(self, ctx: StepContext, i: int, source: Tensor) -> None:
        kind, _ = sm_layout(tuple(source.shape), ctx.group)
        r = int(ctx.hp("rank"))
        if kind in ("right", "left"):
            if not _due(ctx, i, ctx.fresh("ortho")[i]):
                return
            u, _, vh = torch.linalg.svd(source.to(lapack_dtype(source.dtype)),
                                        full_matrices=False)
            ctx.slot("ortho", [i])[0].copy_(vh[:r] if kind == "right" else u[:, :r])
            return
        if not _due(ctx, i, ctx.fresh("indices")[i]):
            return
        dim = 0 if kind == "rows" else 1
        if ctx.hp("proj_type") == "topk":
            chosen = torch.topk(torch.linalg.vector_norm(source, dim=1 - dim), r).indices
        else:
            gen = torch.Generator(device=source.device)
            gen.manual_seed(stream_seed(int(ctx.hp("seed")), ctx.name(i), ctx.steps[i]))
            chosen = torch.randperm(source.shape[dim], generator=gen,
                                    device=source.device)[:r]
        ctx.slot("indices", [i])[0].copy_(chosen)

    def _kind(self, ctx: StepContext, i: int) -> str:
        return sm_layout(matrix_dims(ctx.shapes[i]), ctx.group)[0]

    def project(self, ctx: StepContext, i: int, x: Tensor) -> Tensor:
        kind = self._kind(ctx, i)
        if kind == "right":
            return x @ ctx.slot("ortho", [i])[0].T
        if kind == "left":
            return ctx.slot("ortho", [i])[0].T @ x
        idx = ctx.slot("indices", [i])[0].long()
        return x[idx] if kind == "rows" else x[:, idx]

    def back(self, ctx: StepContext, i: int, y: Tensor) -> Tensor:
        kind = self._kind(ctx, i)
        if kind == "right":
            return y @ ctx.slot("ortho", [i])[0]
        if kind == "left":
            return ctx.slot("ortho", [i])[0] @ y
        idx = ctx.slot("indices", [i])[0].long()
        full = y.new_zeros(matrix_dims(ctx.shapes[i]))
        if kind == "rows":
            full[idx] = y
        else:
            full[:, idx] = y
        return full


class SubspaceEMA(Transform):
    """The first moment inside a :class:`MomentumSubspace`: ``m = beta1 m + (1 - beta1) g``
    (``beta1 = betas[0]``), set to zero first whenever the subspace was just recomputed
    (``t > 1`` and ``t % update_proj_gap == 0``), as the paper says. State ``exp_avg``."""

    slot_names = ("exp_avg",)

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("exp_avg", shape)]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1 = ctx.hp("betas")[0]
        gap = int(ctx.hp("update_proj_gap"))
        bufs = ctx.slot("exp_avg")
        for m, t in zip(bufs, ctx.steps):
            if t > 1 and t % gap == 0:
                m.zero_()
        torch._foreach_lerp_(bufs, updates, 1 - beta1)
        return bufs


# ---- DCT column selection --------------------------------------------------------------------
@lru_cache(maxsize=16)
def _dct_matrix_f64(n: int) -> Tensor:
    """The orthonormal DCT-II matrix ``C`` (``C[k, j] = sqrt(2/n) cos(pi k (2j + 1) / 2n)``,
    row 0 times ``sqrt(1/2)``) in float64 on the CPU."""
    k = torch.arange(n, dtype=torch.float64)
    c = math.sqrt(2.0 / n) * torch.cos(math.pi * k[:, None] * (2.0 * k[None, :] + 1) / (2.0 * n))
    c[0] *= math.sqrt(0.5)
    return c


_DCT_CACHE: dict[tuple, Tensor] = {}


def dct_basis(n: int, sim_type: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The fixed basis ``Q`` (``n x n``) whose columns DCT-AdamW selects, shared by every
    layer with that side: ``C`` for ``sim_type="matmul"`` (the reference's default, which it
    calls DCT-3) and ``C^T`` (the DCT-II basis Makhoul's FFT computes) for ``"makhoul"``."""
    key = (n, sim_type, dtype, str(device))
    if key not in _DCT_CACHE:
        c = _dct_matrix_f64(n)
        _DCT_CACHE[key] = (c if sim_type == "matmul" else c.T).to(device=device, dtype=dtype)
    return _DCT_CACHE[key]


def dct_side(shape: Shape) -> str:
    """``"right"`` (``X Q``, the columns, ``m >= n``) or ``"left"`` (``Q^T X``, the rows)."""
    m, n = matrix_dims(shape)
    return "right" if m >= n else "left"


class DCTColumns(Projector):
    """DCT-AdamW's projector (ista-daslab-optimizers ``fft_low_rank/fft_projector.py``).

    ``Q`` is the fixed orthogonal DCT matrix of the short side ``s`` (:func:`dct_basis`). At
    the first step and every ``update_proj_gap`` steps, ``S = X Q`` (``m >= n``) or
    ``S = Q^T X`` and the ``rank`` columns (rows) of ``S`` with the largest ``ell_norm``-norm
    are selected; the projection is ``X Q[:, I]`` (or ``Q[:, I]^T X``), back ``Y Q[:, I]^T``
    (or ``Q[:, I] Y``). State ``indices`` (``rank`` numbers). The selection is made by
    :meth:`select`, which :class:`RotatingBasis` calls so that it can rotate the inner state;
    :meth:`refresh` does nothing.
    """

    slot_names = ("indices",)

    def slots(self, shape: Shape, group: Group) -> list[SlotSpec]:
        return [SlotSpec("indices", (int(group["rank"]),), "exact")]

    def projected_shape(self, shape: Shape, group: Group) -> Shape:
        m, n = matrix_dims(shape)
        r = int(group["rank"])
        return (m, r) if dct_side(shape) == "right" else (r, n)

    def _basis(self, ctx: StepContext, x: Tensor, shape: Shape) -> Tensor:
        return dct_basis(min(matrix_dims(shape)), ctx.hp("sim_type"), x.dtype, x.device)

    def select(self, ctx: StepContext, i: int, x: Tensor) -> Tensor | None:
        """Choose tensor ``i``'s columns when due; the rotation ``R`` carrying the inner state
        from the old subspace to the new one (``m R`` on the right, ``R m`` on the left), or
        None when there is nothing to rotate."""
        fresh = ctx.fresh("indices")[i]
        if not _due(ctx, i, fresh):
            return None
        shape = matrix_dims(ctx.shapes[i])
        q = self._basis(ctx, x, shape)
        right = dct_side(shape) == "right"
        s = x @ q if right else q.T @ x
        norms = torch.linalg.vector_norm(s, ord=float(ctx.hp("ell_norm")), dim=0 if right else 1)
        chosen = torch.topk(norms, int(ctx.hp("rank")), sorted=False).indices
        slot = ctx.slot("indices", [i])[0]
        old = slot.long()
        slot.copy_(chosen)
        if fresh or not ctx.hp("rotate_subspace"):
            return None
        return q[:, old].T @ q[:, chosen] if right else q[:, chosen].T @ q[:, old]

    def project(self, ctx: StepContext, i: int, x: Tensor) -> Tensor:
        q = self._basis(ctx, x, ctx.shapes[i])[:, ctx.slot("indices", [i])[0].long()]
        return x @ q if dct_side(ctx.shapes[i]) == "right" else q.T @ x

    def back(self, ctx: StepContext, i: int, y: Tensor) -> Tensor:
        q = self._basis(ctx, y, ctx.shapes[i])[:, ctx.slot("indices", [i])[0].long()]
        return y @ q.T if dct_side(ctx.shapes[i]) == "right" else q @ y


class RotatingBasis(CheckedBasis):
    """An :class:`~.combine.InBasis` over a :class:`DCTColumns` that carries the inner chain's
    state into each new subspace (the reference's ``rotate_subspace``): every tensor slot of
    the inner transforms becomes ``x R`` (right) or ``R x`` (left), and second moments (slots
    with the ``unsigned`` role) take the absolute value afterwards, as the reference does."""

    def __init__(self, projector: DCTColumns, inner: list[Transform]) -> None:
        super().__init__(projector, inner)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        proj: DCTColumns = self.projector  # type: ignore[assignment]
        sources = ([matrix_view(u, ctx.name(i)) for i, u in enumerate(updates)]
                   if proj.source == "update" else [matrix_view(g) for g in ctx.grads])
        rotations = {i: r for i, src in enumerate(sources)
                     if (r := proj.select(ctx, i, src)) is not None}
        if rotations:
            self._rotate(ctx, rotations)
        return super().__call__(ctx, updates)

    def _rotate(self, ctx: StepContext, rotations: dict[int, Tensor]) -> None:
        low = [self.projector.projected_shape(matrix_dims(s), ctx.group) for s in ctx.shapes]
        sub = ctx.subset(list(range(len(ctx.shapes))), shapes=low)
        for t in self.inner:
            bound = sub.bind(t, ctx.keymap.get(id(t), {}))
            for i, rot in rotations.items():
                right = dct_side(ctx.shapes[i]) == "right"
                for spec in t.slots(low[i], ctx.group, ctx.name(i)):
                    if spec.shape is None:
                        continue
                    x = bound.slot(spec.name, [i])[0]
                    y = x @ rot if right else rot @ x
                    x.copy_(y.abs_() if spec.role == "unsigned" else y)
            bound.flush()


# ---- SMMF ------------------------------------------------------------------------------------
def square_shape(n: int) -> tuple[int, int]:
    """SMMF's square-matricization of ``n`` elements: ``(n / b, b)`` with ``b`` the largest
    divisor of ``n`` not above ``sqrt(n)`` (so ``n / b >= b``)."""
    root = math.isqrt(n)
    for b in range(root, 0, -1):
        if n % b == 0:
            return n // b, b
    return n, 1


SIGN_BITS = 32


def sign_words(n: int) -> int:
    """Slot elements holding ``n`` sign bits (32 per element)."""
    return -(-n // SIGN_BITS)


def pack_signs(positive: Tensor, words: Tensor) -> None:
    """Write the bools ``positive`` into ``words`` (a float slot reinterpreted as int32), 32 to
    a word, bit ``k`` of word ``w`` holding element ``32 w + k``."""
    n = positive.numel()
    count = sign_words(n)
    bits = torch.zeros(count * SIGN_BITS, dtype=torch.int64, device=positive.device)
    bits[:n] = positive.reshape(-1)
    weights = torch.bitwise_left_shift(
        torch.ones(SIGN_BITS, dtype=torch.int64, device=bits.device),
        torch.arange(SIGN_BITS, dtype=torch.int64, device=bits.device))
    packed = (bits.view(count, SIGN_BITS) * weights).sum(dim=1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # as two's-complement int32
    words.view(torch.int32)[:count].copy_(packed)


def unpack_signs(words: Tensor, n: int) -> Tensor:
    """The ``n`` bools stored by :func:`pack_signs`."""
    count = sign_words(n)
    w = words.view(torch.int32)[:count].to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(SIGN_BITS, dtype=torch.int64, device=w.device)
    return ((w[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


def smmf_factored(shape: Shape, group: Group) -> bool:
    """Whether SMMF factorizes a tensor: always, except squeezed 1-D tensors when
    ``vector_reshape`` is False (the reference's rule)."""
    squeezed = [s for s in shape if s != 1]
    return not (len(squeezed) == 1 and not group["vector_reshape"])


class ScaleBySMMF(Transform):
    """SMMF (Park et al., AAAI'25, arXiv 2412.08894), as eai-lab/SMMF ``SMMF.py``.

    The gradient is viewed as an ``a x b`` matrix (:func:`square_shape`). Each step the moments
    are decompressed (``M = sign * r_m c_m^T``, ``V = r_v c_v^T``), updated with
    ``beta_m = beta1 * growth_rate**(t - 1)`` and ``beta_v = 1 - t**decay_rate``
    (``M = beta_m M + (1 - beta_m) G``, ``V = beta_v V + (1 - beta_v) G**2``) and compressed
    again by the reference's rank-1 NNMF (``r`` = row sums, ``c`` = column sums, the shorter
    vector divided by its sum when non-zero) with the signs of ``M`` kept apart. The direction
    is ``M / (sqrt(V) + eps)`` from the uncompressed ``M`` and ``V``; no bias correction.
    State ``momentum_m_row``/``_col`` and ``momentum_v_row``/``_col`` (``a`` and ``b``
    numbers) and ``sign``: the signs packed 32 to an element (one bit each, as the paper
    counts; the reference stores one bool byte each). Tensors left unfactorized
    (:func:`smmf_factored`) keep full ``momentum_m`` and ``momentum_v``.
    """

    per_tensor = True

    slot_names = ("momentum_m_row", "momentum_m_col", "sign", "momentum_v_row",
                  "momentum_v_col", "momentum_m", "momentum_v")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        if not smmf_factored(shape, group):
            return [SlotSpec("momentum_m", shape), SlotSpec("momentum_v", shape, "unsigned")]
        a, b = square_shape(numel(shape))
        return [SlotSpec("momentum_m_row", (a,), "unsigned"),
                SlotSpec("momentum_m_col", (b,), "unsigned"),
                SlotSpec("sign", (sign_words(a * b),), "exact"),
                SlotSpec("momentum_v_row", (a,), "unsigned"),
                SlotSpec("momentum_v_col", (b,), "unsigned")]

    @staticmethod
    def _compress(x: Tensor, row: Tensor, col: Tensor) -> None:
        """Rank-1 NNMF of the non-negative ``x`` into ``row`` and ``col`` (in place)."""
        torch.sum(x, dim=1, out=row)
        torch.sum(x, dim=0, out=col)
        short = row if x.shape[0] < x.shape[1] else col
        total = short.sum()
        short.div_(torch.where(total != 0, total, torch.ones_like(total)))

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """Each tensor's ``beta_m`` and ``beta_v`` (computed before a compiled kernel, which
        would otherwise evaluate the powers of the step in its loop)."""
        beta1 = ctx.hp("betas")[0]
        decay, growth = ctx.hp("decay_rate"), ctx.hp("growth_rate")
        return {"beta_m": [beta1 * growth ** (t - 1.0) for t in ctx.steps],
                "beta_v": [1.0 - t**decay for t in ctx.steps]}

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        eps = ctx.hp("eps")
        numbers = ctx.prelude()
        out = []
        for i, (g, beta_m, beta_v) in enumerate(zip(updates, numbers["beta_m"],
                                                    numbers["beta_v"])):
            if not smmf_factored(ctx.shapes[i], ctx.group):
                m, v = ctx.slot("momentum_m", [i])[0], ctx.slot("momentum_v", [i])[0]
                add_scaled_(m.mul_(beta_m), g, 1.0 - beta_m)
                add_scaled_(v.mul_(beta_v), g * g, 1.0 - beta_v)
                out.append(m / (v.sqrt() + eps))
                continue
            a, b = square_shape(numel(ctx.shapes[i]))  # static ints, also when traced
            mat = g.reshape(a, b)
            rm, cm, rv, cv, sign = (ctx.slot(k, [i])[0] for k in (
                "momentum_m_row", "momentum_m_col", "momentum_v_row", "momentum_v_col",
                "sign"))
            m = torch.outer(rm, cm)
            m = torch.where(unpack_signs(sign, a * b).view(a, b), m, -m)
            v = torch.outer(rv, cv)
            add_scaled_(m.mul_(beta_m), mat, 1.0 - beta_m)
            add_scaled_(v.mul_(beta_v), mat * mat, 1.0 - beta_v)
            pack_signs(m > 0, sign)
            self._compress(m.abs(), rm, cm)
            self._compress(v, rv, cv)
            out.append((m / (v.sqrt() + eps)).reshape(g.shape))
        return out
