"""Kronecker-factored preconditioners: Shampoo, SOAP's eigenbasis, PSGD Kron and ASGO.

Every method here keeps, per tensor, one small statistic per tensor dimension ("mode") instead
of one per element:

- :class:`KroneckerEigenbasis` + :class:`InKroneckerBasis` (SOAP, nikhilvyas/SOAP): the
  eigenbasis of the mode Gram EMAs ``L_k = EMA(G_(k) G_(k)^T)``; any inner chain (SOAP runs
  :class:`~.adaptive.ScaleByAdam`) sees the gradient rotated into it. Unlike
  :class:`~.combine.InBasis` it keeps every tensor in its own shape (one factor per dimension,
  not a matrix view), delays the inner chain by one step (the first step only builds the
  basis) and, when the basis changes, carries the inner chain's state into the new one.
- :class:`ScaleByShampoo` (facebookresearch/optimizers, Distributed Shampoo): inverse roots of
  the mode factors, per block of at most ``max_preconditioner_dim`` per dimension, with
  learning-rate grafting from Adam or SGD.
- :class:`ScaleByKron` (PSGD Kron, PyPI ``kron-torch``): Lie-group triangular (or diagonal)
  factors ``Q_k`` fitted by noisy Hessian-vector-free whitening, ``P = Q^T Q``.
- :class:`ScaleByASGO` (infinity-stars/ASGO): the inverse square root of the smaller side's
  Gram EMA by a coupled Polar-Express iteration, applied to the momentum.

Factor state is declared as one flat ``exact`` slot per kind (all factors of a tensor
concatenated), so ``state_numel`` is exact for any shape and the checkpoint keys do not depend
on the number of dimensions.

Non-finite statistics. A factor that is not finite when its basis or root is recomputed
(overflowing outer products, a corrupted checkpoint, ``nonfinite="ignore"``) is *reset to
zero* (its accumulation restarts) and the previous basis / root is kept (identity before the
first one; ASGO: the identity, as its reference); an eigendecomposition that fails (also after
a float64 retry) keeps the previous basis / root. Each case emits a ``RuntimeWarning`` naming
the parameter, so state is never corrupted silently.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import (
    Shape,
    SlotSpec,
    StepContext,
    Transform,
    numel,
    shifted_power_table,
    shifted_powers,
)
from llmvalley.optim.transforms.combine import (
    Combinator,
    InBasis,
    Projector,
    chain_paths,
    chain_slots,
    run_chain,
)
from llmvalley.optim.transforms.orthogonalize import lapack_dtype, matrix_dims, matrix_view

Group = Mapping[str, Any]


# ---- shared tensor algebra -----------------------------------------------------------------
def mode_gram(x: Tensor, k: int) -> Tensor:
    """``X_(k) X_(k)^T``: the Gram matrix of mode ``k`` (contracts every other dimension)."""
    rest = [d for d in range(x.ndim) if d != k]
    return torch.tensordot(x, x, dims=(rest, rest))


def apply_modes(x: Tensor, mats: list[Tensor | None], transpose: bool = False) -> Tensor:
    """``x`` with mode ``k`` multiplied by ``mats[k]^T`` (``transpose``: by ``mats[k]``).

    Contracts dimension 0 each time and appends the result last, so after one pass over all
    dimensions they are back in order; ``None`` leaves a dimension as it is (a rotation of the
    axes only), as the references do.
    """
    for m in mats:
        if m is None:
            x = x.permute(*range(1, x.ndim), 0)
        else:
            x = torch.tensordot(x, m, dims=([0], [1 if transpose else 0]))
    return x


def flat_views(flat: Tensor | None, sizes: list[int | None]) -> list[Tensor | None]:
    """Square ``d x d`` views into a flat slot, one per entry of ``sizes`` (None: no factor)."""
    out: list[Tensor | None] = []
    offset = 0
    for d in sizes:
        if d is None:
            out.append(None)
            continue
        out.append(flat[offset:offset + d * d].view(d, d))
        offset += d * d
    return out


def square_numel(sizes: list[int | None]) -> int:
    return sum(d * d for d in sizes if d is not None)


def warn_factor(ctx: StepContext, i: int, what: str) -> None:
    """The warning of the non-finite / failed-decomposition fallback (module docstring)."""
    warnings.warn(f"{ctx.name(i)}: {what}", RuntimeWarning, stacklevel=3)


def safe_eigh(mat: Tensor) -> tuple[Tensor, Tensor] | None:
    """``eigh`` in at least float32, retried in float64 on failure (as both references);
    None when it fails anyway."""
    work = mat.to(lapack_dtype(mat.dtype))
    try:
        return torch.linalg.eigh(work)
    except RuntimeError:
        try:
            vals, vecs = torch.linalg.eigh(work.double())
            return vals.to(work.dtype), vecs.to(work.dtype)
        except RuntimeError:
            return None



def factor_eigh(ctx: StepContext, i: int, factor: Tensor, eps: float, method: str, kept: str,
                scale: float = 1.0) -> tuple[Tensor, Tensor] | None:
    """The eigendecomposition of ``factor / scale + eps I`` (:func:`safe_eigh`), or None after
    a warning naming the parameter: a non-finite factor is reset to zero, a failed (or
    non-finite) decomposition leaves it; either way the caller keeps ``kept``."""
    mat = factor / scale if scale != 1.0 else factor
    if not bool(torch.isfinite(mat).all()):
        warn_factor(ctx, i, f"non-finite {method} factor: reset to zero, {kept} kept")
        factor.zero_()
        return None
    eye = torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
    result = safe_eigh(mat + eps * eye)
    if result is None or not bool(torch.isfinite(result[1]).all()):
        warn_factor(ctx, i, f"{method} eigendecomposition failed: {kept} kept")
        return None
    return result

# ---- SOAP: the Kronecker eigenbasis ---------------------------------------------------------
def soap_merged_shape(shape: Shape, max_dim: int) -> Shape:
    """SOAP's ``merge_dims``: merge neighbouring dimensions while their product stays at most
    ``max_dim`` (nikhilvyas/SOAP ``SOAP.merge_dims``, channels-first)."""
    new: list[int] = []
    cur = 1
    for s in shape:
        if cur * s > max_dim:
            if cur > 1:
                new.append(cur)
                cur = s
            else:
                new.append(s)
                cur = 1
        else:
            cur *= s
    if cur > 1 or not new:
        new.append(cur)
    return tuple(new)


def soap_layout(shape: Shape, group: Group) -> tuple[Shape, list[int | None]]:
    """The shape SOAP works on and the factor size of each of its dimensions (None: that
    dimension is left unrotated: above ``max_precond_dim``, or 1-D without
    ``precondition_1d``)."""
    limit = int(group["max_precond_dim"])
    if len(shape) == 1:
        keep = bool(group["precondition_1d"]) and shape[0] <= limit
        return tuple(shape), [int(shape[0]) if keep else None]
    work = soap_merged_shape(tuple(shape), limit) if group["merge_dims"] else tuple(shape)
    return work, [int(d) if d <= limit else None for d in work]


class KroneckerEigenbasis(Projector):
    """SOAP's basis: the eigenvectors ``Q_k`` of ``GG_k = EMA_b(G_(k) G_(k)^T)`` per dimension.

    ``b = shampoo_beta`` (``betas[1]`` when negative). At the first step ``GG_k`` takes the
    gradient and ``Q_k = eigh(GG_k + 1e-30 I)`` with descending eigenvalues; after step ``t``
    of the inner chain (``t = 1, 2, ...``) ``GG_k`` takes that step's gradient and, when
    ``t % precondition_frequency == 0``, one power-iteration/QR step refreshes the basis:
    the columns of ``Q_k`` are sorted by the estimated eigenvalues ``diag(Q^T GG Q)``
    (descending) and ``Q_k = QR(GG_k Q_k)``. State ``GG`` and ``Q`` (the reference's names):
    the factors of all rotated dimensions, flattened. Projection ``G x_k Q_k^T``.
    """

    slot_names = ("GG", "Q")

    def slots(self, shape: Shape, group: Group) -> list[SlotSpec]:
        n = square_numel(soap_layout(tuple(shape), group)[1])
        if n == 0:
            return []
        return [SlotSpec("GG", (n,), "exact"), SlotSpec("Q", (n,), "exact")]

    def projected_shape(self, shape: Shape, group: Group) -> Shape:
        return tuple(shape)

    # -- state views
    def _factors(self, ctx: StepContext, i: int, name: str) -> list[Tensor | None]:
        sizes = soap_layout(ctx.shapes[i], ctx.group)[1]
        if square_numel(sizes) == 0:
            return [None] * len(sizes)
        return flat_views(ctx.slot(name, [i])[0], sizes)

    def _work(self, ctx: StepContext, i: int, x: Tensor) -> Tensor:
        return x.reshape(soap_layout(ctx.shapes[i], ctx.group)[0])

    def _beta(self, group: Group) -> float:
        beta = float(group["shampoo_beta"])
        return beta if beta >= 0 else float(group["betas"][1])

    # -- projections
    def project(self, ctx: StepContext, i: int, x: Tensor) -> Tensor:
        qs = self._factors(ctx, i, "Q")
        if all(q is None for q in qs):
            return x
        return apply_modes(self._work(ctx, i, x), qs).reshape(x.shape)

    def back(self, ctx: StepContext, i: int, y: Tensor) -> Tensor:
        qs = self._factors(ctx, i, "Q")
        if all(q is None for q in qs):
            return y
        return apply_modes(self._work(ctx, i, y), qs, transpose=True).reshape(y.shape)

    # -- statistics and refresh
    def accumulate(self, ctx: StepContext, i: int, g: Tensor) -> None:
        """``GG_k <- lerp(GG_k, G_(k) G_(k)^T, 1 - b)`` for each rotated dimension."""
        work = self._work(ctx, i, g)
        weight = 1.0 - self._beta(ctx.group)
        for k, f in enumerate(self._factors(ctx, i, "GG")):
            if f is not None:
                f.lerp_(mode_gram(work, k), weight)

    def initialize(self, ctx: StepContext, i: int, g: Tensor) -> None:
        """The first step: the factors take ``g`` and the basis their eigenvectors."""
        self.accumulate(ctx, i, g)
        for f, q in zip(self._factors(ctx, i, "GG"), self._factors(ctx, i, "Q")):
            if f is None:
                continue
            q.copy_(torch.eye(q.shape[0], dtype=q.dtype, device=q.device))  # fallback
            result = factor_eigh(ctx, i, f, 1e-30, "SOAP", "identity basis")
            if result is not None:
                q.copy_(result[1].flip(1))

    def due(self, ctx: StepContext, t: int) -> bool:
        return t > 0 and t % int(ctx.hp("precondition_frequency")) == 0

    def refresh_basis(self, ctx: StepContext, i: int) -> tuple[list[Tensor | None],
                                                               list[Tensor | None]] | None:
        """One power-iteration/QR step for every rotated dimension. Returns the old bases and
        the sort order of each dimension (for the inner state), or None when nothing
        changed."""
        old, orders, changed = [], [], False
        for f, q in zip(self._factors(ctx, i, "GG"), self._factors(ctx, i, "Q")):
            if f is None:
                old.append(None)
                orders.append(None)
                continue
            old.append(q.clone())
            if not bool(torch.isfinite(f).all()):
                warn_factor(ctx, i, "non-finite SOAP factor: reset to zero, previous basis "
                            "kept")
                f.zero_()
                orders.append(None)
                continue
            dtype = lapack_dtype(f.dtype)
            fw, qw = f.to(dtype), q.to(dtype)
            estimate = torch.diag(qw.T @ fw @ qw)
            order = torch.argsort(estimate, descending=True)
            try:
                new = torch.linalg.qr(fw @ qw[:, order]).Q
            except RuntimeError:
                warn_factor(ctx, i, "SOAP QR refresh failed: previous basis kept")
                orders.append(None)
                continue
            q.copy_(new)
            orders.append(order)
            changed = True
        return (old, orders) if changed else None


class InKroneckerBasis(InBasis):
    """Run ``inner`` in a :class:`KroneckerEigenbasis`, as SOAP does.

    Tensors keep their own shape. At a tensor's first step only the basis is built: the
    direction is zero and its weight decay is skipped (the reference ``continue``s before
    its step). From then on the inner chain sees step counts one lower (its step ``t`` is the
    optimizer's ``t + 1``), the rotated update and rotated gradient; after it ran, the factors
    take the update and, when due, the basis is refreshed. The inner chain's state then moves
    with the basis: tensor slots of role ``"signed"`` (first moments) are rotated back with
    the old basis and into the new one; ``"unsigned"`` slots (second moments, diagonal in the
    basis) are only re-ordered with the eigenvalue sort, as the reference does.
    """

    def __init__(self, projector: KroneckerEigenbasis, inner: list[Transform]) -> None:
        super().__init__(projector, inner)
        self.projector: KroneckerEigenbasis = projector

    @property
    def label(self) -> str:
        return "in_kronecker_eigenbasis"

    def slots(self, shape, group, name=""):
        return self.projector.slots(tuple(shape), group)

    def inner_slots(self, shape, group, name=""):
        return chain_slots(self.inner, tuple(shape), group, name)

    def paths(self) -> list[list[Transform]]:
        return [[self, *p] for p in chain_paths(self.inner)]

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """The step powers the inner chain reads at its count ``t - 1``
        (:func:`~.base.shifted_powers`)."""
        return shifted_powers(ctx, [t - 1 for t in ctx.steps])

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        proj = self.projector
        out: list[Tensor] = list(updates)
        started = []
        for i, u in enumerate(updates):
            if ctx.steps[i] == 1:
                proj.initialize(ctx, i, u)
                out[i] = torch.zeros_like(u)
                ctx.plan.weight_decay[i] = 0.0
            else:
                started.append(i)
        if not started:
            return out
        low = [proj.project(ctx, i, updates[i]) for i in started]
        steps = [ctx.steps[i] - 1 for i in started]
        sub = ctx.subset(started, grads=[proj.project(ctx, i, ctx.grads[i]) for i in started],
                         steps=steps, **shifted_power_table(ctx, steps, started))
        res = run_chain(self.inner, sub, low, ctx.keymap)
        ctx.plan.put(started, sub.plan)
        for j, i in enumerate(started):
            out[i] = proj.back(ctx, i, res[j])
        # after the step: the statistics take this update; a due refresh moves the state
        for j, i in enumerate(started):
            if not proj.slots(ctx.shapes[i], ctx.group):
                continue
            proj.accumulate(ctx, i, updates[i])
            if proj.due(ctx, sub.steps[j]):
                change = proj.refresh_basis(ctx, i)
                if change is not None:
                    self._carry(ctx, sub, j, i, *change)
        return out

    def _carry(self, ctx: StepContext, sub: StepContext, j: int, i: int,
               old: list[Tensor | None], orders: list[Tensor | None]) -> None:
        """Move the inner chain's slots of tensor ``i`` from the old basis to the new one."""
        proj = self.projector
        work_shape, _ = soap_layout(ctx.shapes[i], ctx.group)
        for t in self.inner:
            bound = sub.bind(t, ctx.keymap.get(id(t), {}))
            for spec in t.slots(sub.shapes[j], sub.group, sub.name(j)):
                if spec.shape is None or spec.role == "exact":
                    continue
                value = bound.slot(spec.name, [j])[0]
                work = value.reshape(work_shape)
                if spec.role == "signed":
                    moved = apply_modes(apply_modes(work, old, transpose=True),
                                        proj._factors(ctx, i, "Q"))
                else:
                    moved = work
                    for k, order in enumerate(orders):
                        if order is not None:
                            moved = moved.index_select(k, order)
                value.copy_(moved.reshape(value.shape))
            bound.flush()


# ---- Shampoo ---------------------------------------------------------------------------------
def shampoo_merged_shape(shape: Shape, max_dim: int) -> Shape:
    """Distributed Shampoo's ``merge_small_dims`` with ``target_parameter_dimensionality=1``
    (its default): drop dimensions of size 1 (a scalar becomes ``(1,)``) and, from the last
    dimension backwards, merge neighbours while their product stays at most ``max_dim``."""
    if 0 in shape:
        return (0,)
    rev = [s for s in reversed(shape) if s != 1] or [1]
    new = [rev[0]]
    for s in rev[1:]:
        if new[-1] * s <= max_dim:
            new[-1] *= s
        else:
            new.append(s)
    return tuple(reversed(new))


def shampoo_blocks(shape: Shape, max_dim: int) -> list[tuple[slice, ...]]:
    """The blocks of Distributed Shampoo's ``multi_dim_split`` of the merged tensor: every
    dimension cut into chunks of ``max_dim``, in row-major order of the block grid."""
    blocks: list[tuple[slice, ...]] = [()]
    for d in shape:
        cuts = [slice(a, min(a + max_dim, d)) for a in range(0, d, max_dim)] or [slice(0, 0)]
        blocks = [b + (c,) for b in blocks for c in cuts]
    return blocks


def shampoo_layout(shape: Shape, group: Group) -> tuple[Shape, list[tuple[slice, ...]]]:
    limit = int(group["max_preconditioner_dim"])
    work = shampoo_merged_shape(tuple(shape), limit)
    return work, shampoo_blocks(work, limit)


def shampoo_factor_sizes(shape: Shape, group: Group) -> list[int]:
    """One entry per factor (block by block, dimension by dimension): its size."""
    _, blocks = shampoo_layout(shape, group)
    return [s.stop - s.start for b in blocks for s in b]


class _GraftView(Mapping):
    """The group as the grafting Adam reads it: ``betas = (0, grafting_beta2)`` and
    ``eps = grafting_eps`` (its first moment is Shampoo's filtered gradient)."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def __getitem__(self, key: str) -> Any:
        if key == "betas":
            return (0.0, float(self.group["grafting_beta2"]))
        if key == "eps":
            return self.group["grafting_eps"]
        if key == "amsgrad":
            return False
        return self.group[key]

    def __iter__(self):
        return iter(self.group)

    def __len__(self) -> int:
        return len(self.group)


class ScaleByShampoo(Combinator):
    """Shampoo's preconditioner with learning-rate grafting (Distributed Shampoo's
    ``RootInvShampooPreconditionerConfig`` with its default eigendecomposition).

    The input is the (filtered) gradient ``G_bar``; ``ctx.grads`` (the raw gradient) feeds the
    statistics. Tensors are viewed in Distributed Shampoo's merged shape and cut into blocks
    (:func:`shampoo_layout`); each block ``B`` of order ``k`` has one factor per dimension:

    - every step ``F_j <- b F_j + w B_(j) B_(j)^T`` (``b = shampoo_beta``, ``w = 1`` when
      ``b == 1`` (AdaGrad sum) else ``1 - b``);
    - at step ``t`` when ``(t % precondition_frequency == 0 and t > s) or t == s`` (``s =
      start_preconditioning_step``, ``precondition_frequency`` when -1) the root
      ``R_j = (A + eps I)^(-e)`` with ``A = F_j / (1 - b^t)`` (bias correction when
      ``use_bias_correction`` and ``b < 1``), ``e = inverse_exponent`` or ``1 / (2 k)``,
      from ``eigh`` with the eigenvalues shifted so their minimum is at least ``eps``;
      roots start as the identity;
    - the direction ``P = G_bar x_1 R_1 ... x_k R_k``, grafted per block:
      ``P * ||P_graft|| / (||P|| + 1e-16)`` where ``P_graft`` is Adam's direction of ``G_bar``
      (``grafting="adam"``: ``G_bar / (sqrt(V / (1 - b2^t)) + grafting_eps)``,
      ``V = EMA_b2(G^2)``, ``b2 = grafting_beta2``) or ``G_bar`` (``"sgd"``); before step
      ``s`` a grafted method steps with ``P_graft`` alone.

    State ``factor_matrices`` and ``inv_factor_matrices`` (every factor of every block,
    flattened) plus the grafting Adam's ``exp_avg_sq``.
    """

    slot_names = ("factor_matrices", "inv_factor_matrices")

    def __init__(self, grafting: str = "none") -> None:
        if grafting not in ("adam", "sgd", "none"):
            raise ValueError(f"grafting must be 'adam', 'sgd' or 'none', got {grafting!r}")
        self.grafting = grafting
        from llmvalley.optim.transforms.adaptive import ScaleByAdam

        self.graft_chain: list[Transform] = (
            [ScaleByAdam(eps_form="torch", first_moment="input")] if grafting == "adam" else [])

    def slots(self, shape, group, name=""):
        n = sum(d * d for d in shampoo_factor_sizes(tuple(shape), group))
        if n == 0:
            return []
        return [SlotSpec("factor_matrices", (n,), "exact"),
                SlotSpec("inv_factor_matrices", (n,), "exact")]

    def inner_slots(self, shape, group, name=""):
        return chain_slots(self.graft_chain, tuple(shape), _GraftView(group), name)

    def paths(self) -> list[list[Transform]]:
        return [[self, *p] for p in chain_paths(self.graft_chain)]

    @staticmethod
    def start_step(group: Group) -> int:
        start = int(group["start_preconditioning_step"])
        return int(group["precondition_frequency"]) if start == -1 else start

    def _graft(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor] | None:
        if self.grafting == "none":
            return None
        if self.grafting == "sgd":
            return updates
        sub = ctx.subset(list(range(len(updates))), group=_GraftView(ctx.group))
        sub.plan = ctx.plan
        return run_chain(self.graft_chain, sub, updates, ctx.keymap)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        graft = self._graft(ctx, updates)
        start = self.start_step(ctx.group)
        freq = int(ctx.hp("precondition_frequency"))
        out = []
        for i, u in enumerate(updates):
            # a 0-d tensor's update promotes to float64 in a compiled segment (its bias
            # correction is a 0-d float64 tensor there); the roots are in the compute dtype
            u = u.to(ctx.dtypes[i])
            t = ctx.steps[i]
            sizes = shampoo_factor_sizes(ctx.shapes[i], ctx.group)
            if not sizes:  # zero-size tensor
                out.append(torch.zeros_like(u))
                continue
            factors = flat_views(ctx.slot("factor_matrices", [i])[0], sizes)
            roots = flat_views(ctx.slot("inv_factor_matrices", [i])[0], sizes)
            if t == 1:  # roots start as the identity
                for r in roots:
                    r.copy_(torch.eye(r.shape[0], dtype=r.dtype, device=r.device))
            work_shape, blocks = shampoo_layout(ctx.shapes[i], ctx.group)
            self._accumulate(ctx, ctx.grads[i].reshape(work_shape), blocks, factors)
            if (t % freq == 0 and t > start) or t == start:
                self._roots(ctx, i, t, blocks, factors, roots)
            if graft is not None and t < start:
                out.append(graft[i])
                continue
            out.append(self._precondition(u, work_shape, blocks, roots,
                                          None if graft is None else graft[i]))
        return out

    def _accumulate(self, ctx: StepContext, g: Tensor, blocks: list[tuple[slice, ...]],
                    factors: list[Tensor]) -> None:
        beta = float(ctx.hp("shampoo_beta"))
        weight = 1.0 if beta == 1.0 else 1.0 - beta
        it = iter(factors)
        for b in blocks:
            block = g[b]
            for k in range(block.ndim):
                f = next(it)
                if beta != 1.0:
                    f.mul_(beta)
                f.add_(mode_gram(block, k), alpha=weight)

    def _roots(self, ctx: StepContext, i: int, t: int, blocks: list[tuple[slice, ...]],
               factors: list[Tensor], roots: list[Tensor]) -> None:
        beta, eps = float(ctx.hp("shampoo_beta")), float(ctx.hp("eps"))
        bc = 1.0 - beta**t if ctx.hp("use_bias_correction") and beta < 1.0 else 1.0
        override = ctx.hp("inverse_exponent")
        it = zip(factors, roots)
        for b in blocks:
            exponent = float(override) if override is not None else 1.0 / (2 * len(b))
            for _ in b:
                f, r = next(it)
                result = factor_eigh(ctx, i, f, eps, "Shampoo", "previous root", scale=bc)
                if result is None:
                    continue
                vals, vecs = result
                low = float(vals.min())
                if low < eps:  # Distributed Shampoo's perturbation: min eigenvalue -> eps
                    vals = vals - low + eps
                r.copy_((vecs * vals.pow(-exponent).unsqueeze(0)) @ vecs.T)

    @staticmethod
    def _precondition(u: Tensor, work_shape: Shape, blocks: list[tuple[slice, ...]],
                      roots: list[Tensor], graft: Tensor | None) -> Tensor:
        g = u.reshape(work_shape)
        gr = None if graft is None else graft.reshape(work_shape)
        out = torch.empty_like(g)
        it = iter(roots)
        for b in blocks:
            p = apply_modes(g[b], [next(it) for _ in b])
            if gr is not None:
                p = p * (torch.linalg.vector_norm(gr[b])
                         / (torch.linalg.vector_norm(p) + 1e-16))
            out[b] = p
        return out.reshape(u.shape)


# ---- PSGD Kron -------------------------------------------------------------------------------
def kron_merged_shape(shape: Shape, merge: bool) -> Shape:
    """kron-torch's ``merge_dims`` for tensors of more than two dimensions: the matrix view
    ``(prod(shape[:-1]), shape[-1])`` or ``(shape[0], prod(shape[1:]))``, whichever has the
    smaller signed difference ``cols - rows`` (the reference's ``np.diff`` comparison)."""
    if len(shape) <= 2 or not merge:
        return tuple(shape)
    s1 = (numel(shape[:-1]), int(shape[-1]))
    s2 = (int(shape[0]), numel(shape[1:]))
    return s1 if s1[1] - s1[0] <= s2[1] - s2[0] else s2


def kron_diagonal(shape: Shape, group: Group) -> list[bool]:
    """Which dimensions get a diagonal factor (the rest a triangular one), as kron-torch."""
    shape = kron_merged_shape(shape, group["merge_dims"])
    mode = group["memory_save_mode"]
    if mode is None:
        diag = [False] * len(shape)
    elif mode == "all_diag":
        diag = [True] * len(shape)
    else:
        diag = [False] * len(shape)
        ranked = sorted(range(len(shape)), key=lambda d: shape[d])
        if shape and (mode == "one_diag" or (len(shape) > 1 and sorted(shape)[-1]
                                             > sorted(shape)[-2])):
            # the reference takes np.argsort(shape)[::-1][0]: the last index among the largest
            largest = max(shape)
            diag[max(d for d in ranked if shape[d] == largest)] = True
    return [d == 1 or d > int(group["max_size_triangular"])
            or len(shape) < int(group["min_ndim_triangular"]) or flag
            for d, flag in zip(shape, diag)]


def kron_sizes(shape: Shape, group: Group) -> list[int]:
    """The number of elements of each factor (``d`` diagonal, ``d^2`` triangular; a scalar
    has one factor of one element)."""
    work = kron_merged_shape(shape, group["merge_dims"])
    if len(work) == 0:
        return [1]
    return [d if flag else d * d for d, flag in zip(work, kron_diagonal(shape, group))]


def kron_update_probability(group: Group, n: int) -> float | Tensor:
    """The preconditioner-update probability at 0-based step ``n``: the constant
    ``preconditioner_update_probability``, or (when None) kron-torch's schedule
    ``clamp(max_prob * exp(-prob_decay * (n - flat_start)), min_prob, max_prob)``
    computed in float32 as the reference does."""
    fixed = group["preconditioner_update_probability"]
    if fixed is not None:
        return float(fixed)
    f32 = torch.float32
    hi, lo = torch.tensor(group["max_prob"], dtype=f32), torch.tensor(group["min_prob"], dtype=f32)
    decay, flat = torch.tensor(group["prob_decay"], dtype=f32), torch.tensor(group["flat_start"],
                                                                             dtype=f32)
    prob = hi * torch.exp(-decay * (torch.tensor(float(n), dtype=f32) - flat))
    return prob.clamp(min=lo, max=hi)


def kron_generator(seed: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The random stream of tensor ``index`` at ``step``: counter-based, so a resumed run
    draws exactly what an uninterrupted one does without storing generator state. Index -1
    is the group's stream (the balancing draw, shared by all its tensors)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + int(step) * 10_007 + int(index) + 1) % (2**63))
    return gen


def kron_probe(g: Tensor, gen: torch.Generator) -> Tensor:
    """The probe ``V ~ N(0, 1)`` of one preconditioner update."""
    return torch.randn(g.shape, generator=gen, dtype=g.dtype, device=g.device)


def kron_balance_draw(seed: int, step: int, device: torch.device) -> float:
    """The uniform draw that decides balancing at ``step`` (balance when below 0.01)."""
    gen = kron_generator(seed, step, -1, torch.device("cpu"))
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def _lower_bound_spectral(a: Tensor, max_abs: Tensor) -> Tensor:
    """kron-torch's cheap lower bound of ``||a||_2`` (one power step from the largest column)."""
    a = a / max_abs
    col = torch.argmax((a * a).sum(0))
    x = a[:, col]
    x = x @ a
    x = x / x.norm()
    x = a @ x
    return x.norm() * max_abs


class ScaleByKron(Transform):
    """PSGD Kron (Xi-Lin Li; kron-torch 0.3.3 ``Kron``) on the (debiased) momentum.

    Each tensor (merged to a matrix when it has more than two dimensions, ``merge_dims``) has
    one factor ``Q_k`` per dimension, upper triangular (or diagonal: 1-D tensors, dimensions of
    size 1 or above ``max_size_triangular``, ``memory_save_mode``), starting at
    ``precond_init_scale^(1/order) I``. The direction is ``Q^T Q m`` mode by mode, its RMS
    clipped to 1.1. With probability ``p(t)`` (:func:`kron_update_probability`; an update
    happens when a counter of steps reaches ``1 / p``, as the reference) the factors take one
    Lie-group step of size ``precond_lr`` on the pair ``(V, m + sqrt(eps32) mean|m| V)``
    (``V`` a fresh normal probe; ``m`` is the momentum, or the gradient without
    ``momentum_into_precond_update``). Before an update, with probability 0.01, the factors
    are balanced to a common infinity norm. Random draws come from :func:`kron_generator`
    (seed ``seed``), so resume is bit-exact. Weight decay applies to tensors of two or more
    dimensions only (the shell is told through the plan). State ``Q`` (all factors, flat)
    and the float ``update_counter``.
    """

    slot_names = ("Q", "update_counter")

    def slots(self, shape, group, name=""):
        return [SlotSpec("Q", (sum(kron_sizes(tuple(shape), group)),), "exact"),
                SlotSpec("update_counter", None)]

    def _factors(self, ctx: StepContext, i: int) -> tuple[list[Tensor], Shape]:
        shape = ctx.shapes[i]
        work = kron_merged_shape(shape, ctx.hp("merge_dims"))
        flat = ctx.slot("Q", [i])[0]
        if len(work) == 0:
            return [flat.view(())], work
        out, offset = [], 0
        for d, flag in zip(work, kron_diagonal(shape, ctx.group)):
            n = d if flag else d * d
            out.append(flat[offset:offset + n].view(d) if flag
                       else flat[offset:offset + n].view(d, d))
            offset += n
        return out, work

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        seed = int(ctx.hp("seed"))
        out = []
        for i, m in enumerate(updates):
            t = ctx.steps[i]
            if len(ctx.shapes[i]) < 2:
                ctx.plan.weight_decay[i] = 0.0  # the reference decays only p.dim() >= 2
            if m.numel() == 0:
                out.append(torch.zeros_like(m))
                continue
            qs, work = self._factors(ctx, i)
            if t == 1:
                scale = float(ctx.hp("precond_init_scale"))
                if len(work) == 0:
                    qs[0].fill_(scale)
                else:
                    scale = scale ** (1.0 / len(work))
                    for q in qs:
                        q.copy_(scale * (torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
                                         if q.ndim == 2 else torch.ones_like(q)))
            prob = kron_update_probability(ctx.group, t - 1)
            counter = ctx.scalar("update_counter", i) + 1
            do_update = bool(torch.tensor(counter, dtype=torch.int32) >= 1 / prob)
            ctx.set_scalar("update_counter", i, 0.0 if do_update else counter)
            g = m.reshape(work).clone()
            if do_update:
                if len(work) > 1 and kron_balance_draw(seed, t, m.device) < 0.01:
                    self._balance(qs)
                source = g if ctx.hp("momentum_into_precond_update") else \
                    ctx.grads[i].reshape(work).clone()
                self._update(qs, source, kron_generator(seed, t, ctx.positions[i], m.device),
                             float(ctx.hp("precond_lr")))
            pre = self._precondition(qs, g)
            rms = pre.square().mean().sqrt()
            pre = pre * torch.clamp(1.1 / (rms + 1e-12), max=1.0)
            out.append(pre.reshape(m.shape))
        return out

    @staticmethod
    def _balance(qs: list[Tensor]) -> None:
        norms = torch.stack([q.abs().max() for q in qs])
        mean = norms.log().mean().exp()
        for q, n in zip(qs, mean / norms):
            q.mul_(n)

    @staticmethod
    def _apply(qs: list[Tensor], x: Tensor, inverse_t: bool = False) -> Tensor:
        """``x`` with each mode multiplied by ``Q_k`` (``inverse_t``: by ``Q_k^{-T}``, i.e.
        ``x_(k)^T Q_k^{-1}`` on the trailing axis)."""
        if x.ndim == 0:
            return x / qs[0] if inverse_t else qs[0] * x
        for k, q in enumerate(qs):
            x = x.movedim(k, -1)
            if q.ndim == 1:
                x = x / q if inverse_t else x * q
            elif inverse_t:
                flat = x.reshape(-1, x.shape[-1])
                x = torch.linalg.solve_triangular(q, flat, upper=True, left=False).reshape(
                    x.shape)
            else:
                x = x @ q.T
            x = x.movedim(-1, k)
        return x

    def _update(self, qs: list[Tensor], g: Tensor, gen: torch.Generator, lr: float) -> None:
        """One Lie-group step of the factors on ``(V, g + sqrt(eps32) mean|g| V)``; ``g`` is
        perturbed in place (the reference preconditions the perturbed momentum)."""
        v = kron_probe(g, gen)
        g.add_(math.sqrt(torch.finfo(torch.float32).eps) * g.abs().mean() * v)
        a = self._apply(qs, g)
        conj_b = self._apply(qs, v, inverse_t=True)
        tiny = torch.finfo(g.dtype).tiny
        for k, q in enumerate(qs):
            if g.ndim == 0:
                ga, gb = a * a, conj_b * conj_b
            elif q.ndim == 1:
                rest = [d for d in range(g.ndim) if d != k]
                ga = (a * a).sum(rest) if rest else a * a
                gb = (conj_b * conj_b).sum(rest) if rest else conj_b * conj_b
            else:
                ga, gb = mode_gram(a, k), mode_gram(conj_b, k)
            diff, total = (ga - gb) * lr, ga + gb
            norm = total.abs().max()
            if q.ndim < 2:
                q.sub_(diff * q / norm.clamp(min=tiny))
            else:
                bound = _lower_bound_spectral(total, norm) if bool(norm > 0) else norm
                q.sub_(torch.triu(diff) / bound.clamp(min=tiny) @ q)

    def _precondition(self, qs: list[Tensor], g: Tensor) -> Tensor:
        """``Q^T Q g`` mode by mode."""
        if g.ndim == 0:
            return qs[0] * qs[0] * g
        x = g
        for k, q in enumerate(qs):
            x = x.movedim(k, -1)
            x = x * q * q if q.ndim == 1 else (x @ q.T) @ q
            x = x.movedim(-1, k)
        return x


# ---- ASGO ------------------------------------------------------------------------------------
#: the Polar-Express coefficients of ASGO's inverse square root (infinity-stars/ASGO,
#: ``_matrix_inverse_root_PolarExpress``); all but the last are divided by the safety factor
ASGO_PE_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)


def asgo_coefficients(steps: int) -> list[tuple[float, float, float]]:
    """The ``(a, b, c)`` of each of ``steps`` iterations: the safety factor 1.01 on all but
    the last listed tuple, which repeats."""
    scaled = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in ASGO_PE_COEFFICIENTS[:-1]]
    scaled.append(ASGO_PE_COEFFICIENTS[-1])
    return scaled[:steps] + [scaled[-1]] * max(0, steps - len(scaled))


def asgo_inverse_sqrt(v: Tensor, eps: float, steps: int) -> Tensor:
    """``V^{-1/2}`` by ASGO's coupled Polar-Express iteration: ``Y = V / s`` with
    ``s = 1.01 ||V + eps I||_F``, ``Z = I``; per step ``B = b ZY + c (ZY)^2``,
    ``Y <- a Y + Y B``, ``Z <- a Z + B Z``; result ``Z / sqrt(s)``. (The reference adds
    ``eps`` only inside the normaliser.)"""
    eye = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    scale = torch.linalg.matrix_norm(v + eps * eye) * 1.01
    y, z = v / scale, eye
    for a, b, c in asgo_coefficients(steps):
        zy = z @ y
        mix = b * zy + c * (zy @ zy)
        y = a * y + y @ mix
        z = a * z + mix @ z
    return z / scale.sqrt()


def asgo_left(shape: Shape) -> bool:
    """Whether ASGO preconditions the rows (``m < n``: ``V = EMA(G G^T)``, ``U = V^{-1/2} M``);
    otherwise the columns (``V = EMA(G^T G)``, ``U = M V^{-1/2}``)."""
    m, n = matrix_dims(shape)
    return m < n


class ScaleByASGO(Transform):
    """ASGO's one-sided preconditioner (infinity-stars/ASGO ``asgo``) on the momentum.

    ``V <- lerp(V, G G^T or G^T G, 1 - beta2)`` on the smaller side of the raw gradient
    (``ctx.grads``); ``Lambda = V^{-1/2}`` by :func:`asgo_inverse_sqrt` (``eps``,
    ``matalg_steps``); ``U = Lambda M`` (or ``M Lambda``) for the input momentum ``M``,
    rescaled to ``0.2 sqrt(m n) / ||U||_F``. A non-finite ``Lambda`` falls back to the
    identity, as the reference; a non-finite ``V`` is also reset to zero (module docstring).
    State ``precond``. >2-D tensors use their ``(out, -1)`` matrix view.
    """

    slot_names = ("precond",)

    def slots(self, shape, group, name=""):
        side = min(matrix_dims(shape))
        return [SlotSpec("precond", (side, side), "exact")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta2, eps = float(ctx.hp("beta2")), float(ctx.hp("eps"))
        steps = int(ctx.hp("matalg_steps"))
        out = []
        for i, u in enumerate(updates):
            mom, g = matrix_view(u, ctx.name(i)), matrix_view(ctx.grads[i])
            v = ctx.slot("precond", [i])[0]
            left = asgo_left(ctx.shapes[i])
            v.lerp_(g @ g.T if left else g.T @ g, 1 - beta2)
            if not bool(torch.isfinite(v).all()):
                warn_factor(ctx, i, "non-finite ASGO preconditioner: reset to zero, identity "
                            "root used")
                v.zero_()
                root = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
            else:
                root = asgo_inverse_sqrt(v, eps, steps)
                if not bool(torch.isfinite(root).all()):
                    warn_factor(ctx, i, "non-finite ASGO inverse root: identity used")
                    root = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
            upd = root @ mom if left else mom @ root
            m, n = mom.shape
            norm = torch.linalg.matrix_norm(upd).clamp(min=torch.finfo(upd.dtype).tiny)
            out.append((upd * (0.2 * math.sqrt(m * n) / norm)).reshape(u.shape))
        return out
