"""Low-rank subspaces for GaLore, Fira, APOLLO, FRUGAL and Online Subspace Descent.

Projectors (:class:`~.combine.Projector` s owning their basis, its refresh schedule and, for the
random ones, a checkpointed seed):

- :class:`SVDProjector`: GaLore's ``"std"`` projector, the top-``r`` singular vectors of the
  update on the matrix's short side, refreshed every ``update_proj_gap`` steps.
- :class:`RandomProjector`: a random basis on the short side, drawn from a per-parameter seed
  stream: APOLLO's Gaussian ``N(0, 1/r)`` sketch, FRUGAL's random semi-orthogonal matrix or
  random coordinate permutation.
- :class:`CoordinateProjector`: FRUGAL's random columns, rows or single entries (RandK).
- :class:`OnlineProjector`: Online Subspace Descent's basis, initialised by an SVD and then
  moved by one AdamW step per step on the online-PCA loss.

Combinators (:class:`Subspace` and its subclasses, :class:`~.combine.InBasis` with the hooks
these methods need): the back-projection scale, the state reset and restarted step count of
FRUGAL's re-selection, the projector step after the update (OSD), and the norm-scaled residual
of Fira (:class:`FiraSubspace`) and APOLLO (:class:`ApolloSubspace`), both with the norm-growth
limiter :class:`NormGrowthLimiter`.

Every projector works on 2-D tensors. With ``m x n`` the shape, the ``"std"`` side is the
right one (``P`` is ``r x n``, ``R = G P^T``, back ``Y P``) when ``m >= n`` and the left one
(``P`` is ``m x r``, ``R = P^T G``, back ``P Y``) otherwise, so the rank is taken on the short
side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.state import ABSMAX
from llmvalley.optim.transforms.adaptive import ScaleByAdam
from llmvalley.optim.transforms.base import (
    Shape,
    SlotSpec,
    StepContext,
    StepPlan,
    Transform,
    shifted_power_table,
    shifted_powers,
)
from llmvalley.optim.transforms.combine import (
    GroupView,
    InBasis,
    Projector,
    chain_slots,
    run_chain,
)
from llmvalley.optim.transforms.orthogonalize import lapack_dtype

Group = Mapping[str, Any]

#: how many integers APOLLO's ``next_seed`` draws to advance a seed (its ``ADV_DEFAULT``)
SEED_ADVANCE = 0xF
#: the guard in the denominators of Fira's and APOLLO's norm ratios and limiter (the references')
RATIO_EPS = 1e-8
COORDINATE_CHOICES = ("columns", "rows", "randk")
RANDOM_KINDS = ("gaussian", "orthogonal", "permutation")


# ---- shapes and ranks ----------------------------------------------------------------------
def std_side(shape: Shape) -> str:
    """GaLore's ``"std"`` side: ``"right"`` for a tall-or-square matrix, else ``"left"``."""
    return "right" if shape[0] >= shape[1] else "left"


def subspace_rank(shape: Shape, group: Group, rank_from: str = "rank") -> int:
    """The rank for a matrix of ``shape``: ``group["rank"]`` (``rank_from="rank"``), or
    ``round(short side * group["density"])`` (``"density"``, FRUGAL's rule)."""
    side = min(int(shape[0]), int(shape[1]))
    if rank_from == "density":
        return round(side * float(group["density"]))
    return int(group["rank"])


def check_matrix_shape(optimizer: str, shape: Shape, name: str) -> None:
    """``ValueError`` unless ``shape`` is a matrix (the projections are 2-D products)."""
    if len(shape) != 2:
        raise ValueError(
            f"{optimizer}: {name} has shape {tuple(shape)}; only 2-D weight matrices are "
            "supported (the reference projects 2-D gradients): route it to another optimizer")


def check_rank(optimizer: str, rank: int, side: int, name: str, what: str = "rank") -> None:
    """``ValueError`` unless ``1 <= rank < side`` (a proper subspace of the short side)."""
    if not 1 <= rank < side:
        raise ValueError(
            f"{optimizer}: invalid {what}={rank} for {name}: it must lie in [1, {side}), below "
            f"the matrix's smaller side ({side}); a rank at or above it projects nothing away")


# ---- random streams ------------------------------------------------------------------------
def next_seed(seed: int, advance: int = SEED_ADVANCE) -> int:
    """The seed after ``seed`` in APOLLO's stream: the last of ``advance`` int64 draws of a CPU
    generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, torch.iinfo(torch.int64).max, (advance,), generator=gen)
    return int(draws[-1])


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (one basis draw)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def refresh_due(ctx: StepContext, i: int) -> bool:
    """GaLore's schedule: at steps ``t`` with ``(t - 1) % update_proj_gap == 0`` (the
    reference's pre-increment count ``step % gap == 0``: steps 1, 1 + gap, ...)."""
    return (ctx.steps[i] - 1) % int(ctx.hp("update_proj_gap")) == 0


# ---- projectors ----------------------------------------------------------------------------
class LowRankProjector(Projector):
    """A rank-``r`` basis ``P`` on the ``"std"`` side, stored as ``ortho_matrix`` (the
    reference's name): ``r x n`` (right) or ``m x r`` (left). Subclasses implement
    :meth:`draw`; :meth:`refresh` calls it on GaLore's schedule and says whether it did.

    Args:
        optimizer: the method's name, for error messages.
        rank_from: ``"rank"`` or ``"density"`` (see :func:`subspace_rank`).
    """

    slot_names: tuple[str, ...] = ("ortho_matrix",)

    def __init__(self, optimizer: str, rank_from: str = "rank") -> None:
        self.optimizer = optimizer
        self.rank_from = rank_from

    def rank(self, shape: Shape, group: Group) -> int:
        """The declared rank, kept within ``[0, short side]`` (declarations never raise;
        construction and :meth:`refresh` refuse a rank outside ``[1, short side)``)."""
        r = subspace_rank(shape, group, self.rank_from)
        return max(0, min(r, int(shape[0]), int(shape[1])))

    def checked_rank(self, shape: Shape, group: Group, name: str) -> int:
        r = subspace_rank(shape, group, self.rank_from)
        check_rank(self.optimizer, r, min(int(shape[0]), int(shape[1])), name)
        return r

    def basis_shape(self, shape: Shape, group: Group) -> Shape:
        r = self.rank(shape, group)
        return (r, int(shape[1])) if std_side(shape) == "right" else (int(shape[0]), r)

    def slots(self, shape: Shape, group: Group) -> list[SlotSpec]:
        return [SlotSpec("ortho_matrix", self.basis_shape(shape, group), "exact")]

    def projected_shape(self, shape: Shape, group: Group) -> Shape:
        r = self.rank(shape, group)
        return (int(shape[0]), r) if std_side(shape) == "right" else (r, int(shape[1]))

    def complete(self, shape: Shape, group: Group) -> bool:
        return self.rank(shape, group) >= min(int(shape[0]), int(shape[1]))

    def due(self, ctx: StepContext, i: int) -> bool:
        return refresh_due(ctx, i) or ctx.fresh("ortho_matrix")[i]

    def refresh(self, ctx: StepContext, i: int, source: Tensor) -> bool:
        """Redraw the basis when due; whether it did."""
        if not self.due(ctx, i):
            return False
        shape = tuple(source.shape)
        check_matrix_shape(self.optimizer, shape, ctx.name(i))
        r = self.checked_rank(shape, ctx.group, ctx.name(i))
        basis = ctx.slot("ortho_matrix", [i])[0]
        basis.copy_(self.draw(ctx, i, source, r, std_side(shape)))
        return True

    def draw(self, ctx: StepContext, i: int, source: Tensor, rank: int, side: str) -> Tensor:
        raise NotImplementedError

    def project(self, ctx: StepContext, i: int, x: Tensor) -> Tensor:
        p = ctx.slot("ortho_matrix", [i])[0]
        return x @ p.T if std_side(tuple(x.shape)) == "right" else p.T @ x

    def back(self, ctx: StepContext, i: int, y: Tensor, shape: Shape) -> Tensor:
        """``y`` (projected) mapped back into a matrix of ``shape``."""
        p = ctx.slot("ortho_matrix", [i])[0]
        return y @ p if std_side(shape) == "right" else p @ y

    def after(self, ctx: StepContext, i: int, source: Tensor) -> None:
        """Called once the step's direction is computed (OSD moves its basis here)."""


class SVDProjector(LowRankProjector):
    """GaLore's projector (galore-torch ``GaLoreProjector``, ``proj_type="std"``): the top-``r``
    right singular vectors ``Vh[:r]`` of the update (``m >= n``) or left ones ``U[:, :r]``
    (``m < n``). The SVD runs in at least float32 (float64 for float64 tensors)."""

    def draw(self, ctx, i, source, rank, side):
        u, _, vh = torch.linalg.svd(source.to(lapack_dtype(source.dtype)), full_matrices=False)
        return vh[:rank] if side == "right" else u[:, :rank]


class RandomProjector(LowRankProjector):
    """A random basis drawn from a per-parameter seed stream (state ``seed``, an int).

    The first seed of a tensor is its 1-based position in the step's tensor list (APOLLO
    seeds by parameter ordinal); every draw seeds a generator on the tensor's device with
    the current seed, draws, and advances the seed with :func:`next_seed`. The seed and the
    basis are checkpointed, so a resumed run draws the same bases. Kinds:

    - ``"gaussian"`` (APOLLO, apollo-torch ``GradientProjector``): ``randn(shape) / sqrt(r)``
      drawn in float32 (as the reference, for every dtype), then cast;
    - ``"orthogonal"`` (FRUGAL ``proj_type="random"``): a random semi-orthogonal matrix
      (``torch.nn.init.orthogonal_``, float32);
    - ``"permutation"`` (FRUGAL ``"randperm"``): ``r`` rows (left: columns) of a random
      permutation matrix: a random subset of the short side's coordinates.
    """

    slot_names = ("ortho_matrix", "seed")

    def __init__(self, optimizer: str, kind: str = "gaussian", rank_from: str = "rank") -> None:
        if kind not in RANDOM_KINDS:
            raise ValueError(f"random projector kind must be one of {RANDOM_KINDS}, got {kind!r}")
        super().__init__(optimizer, rank_from)
        self.kind = kind

    def slots(self, shape: Shape, group: Group) -> list[SlotSpec]:
        return [*super().slots(shape, group), SlotSpec("seed", None)]

    def draw(self, ctx, i, source, rank, side):
        if ctx.fresh("seed")[i]:
            ctx.set_scalar("seed", i, ctx.positions[i] + 1)
        seed = int(ctx.scalar("seed", i))
        ctx.set_scalar("seed", i, next_seed(seed))
        gen = seeded_generator(seed, source.device)
        m, n = source.shape
        shape = (rank, n) if side == "right" else (m, rank)
        if self.kind == "gaussian":
            basis = torch.randn(shape, generator=gen, device=source.device,
                                dtype=torch.float32) / math.sqrt(rank)
        elif self.kind == "orthogonal":
            basis = torch.nn.init.orthogonal_(
                torch.empty(shape, device=source.device, dtype=torch.float32), generator=gen)
        else:
            size = n if side == "right" else m
            perm = torch.randperm(size, generator=gen, device=source.device)
            full = torch.zeros(size, size, device=source.device, dtype=torch.float32)
            full[torch.arange(size, device=source.device), perm] = 1.0
            basis = full[:rank] if side == "right" else full[:, :rank]
        return basis.to(source.dtype)


class OnlineProjector(SVDProjector):
    """Online Subspace Descent's basis (Liang et al., arXiv 2408.12857;
    kyleliang919/Online-Subspace-Descent, ``proj_type="continuous"``).

    ``P`` is the SVD basis of the first update (as GaLore's), then after every later step it
    takes one torch-AdamW step on the online-PCA loss of the normalised update
    ``Gh = G / ||G||_F``: ``||Gh P^T P - Gh||^2`` (right side) or ``||P P^T Gh - Gh||^2``
    (left), whose gradient is ``2 P (E^T Gh + Gh^T E)`` resp. ``2 (E Gh^T + Gh E^T) P`` with
    ``E`` the residual inside the norm. The gradient is taken at the ``P`` this step used, and
    the step is applied after the weight update (the reference's ``project_back``); ``P`` is
    never re-orthonormalised. The AdamW step has learning rate
    ``(1 / update_proj_gap) * lr / initial_lr`` (the reference's ratio to the constructor's
    rate, which torch schedulers record as ``initial_lr``; 1 without a scheduler),
    ``proj_betas``, ``proj_eps`` and decoupled ``proj_weight_decay``; it is
    :class:`~.adaptive.ScaleByAdam` with its moments in ``proj_exp_avg`` and
    ``proj_exp_avg_sq`` (``P``'s shape); its step count is ``t - 1``.
    """

    slot_names = ("ortho_matrix", "proj_exp_avg", "proj_exp_avg_sq")

    def __init__(self, optimizer: str) -> None:
        super().__init__(optimizer)
        self.adam = ScaleByAdam(eps_form="torch")
        self.adam_keys = {id(self.adam): {"exp_avg": "proj_exp_avg",
                                          "exp_avg_sq": "proj_exp_avg_sq"}}

    def slots(self, shape: Shape, group: Group) -> list[SlotSpec]:
        basis = self.basis_shape(shape, group)
        return [SlotSpec("ortho_matrix", basis, "exact"), SlotSpec("proj_exp_avg", basis),
                SlotSpec("proj_exp_avg_sq", basis, "unsigned")]

    def due(self, ctx: StepContext, i: int) -> bool:
        return ctx.fresh("ortho_matrix")[i]

    def after(self, ctx: StepContext, i: int, source: Tensor) -> None:
        t = ctx.steps[i]
        if t < 2:  # the reference's projector optimizer has no gradient at the first step
            return
        p = ctx.slot("ortho_matrix", [i])[0]
        g = source / torch.linalg.vector_norm(source).clamp_min(torch.finfo(source.dtype).tiny)
        if std_side(tuple(g.shape)) == "right":
            err = g @ p.T @ p - g
            grad = 2 * p @ (err.T @ g + g.T @ err)
        else:
            err = p @ (p.T @ g) - g
            grad = 2 * (err @ g.T + g @ err.T) @ p
        lr = float(ctx.hp("lr"))
        initial = float(ctx.group.get("initial_lr", lr) or lr)
        rate = (1.0 / int(ctx.hp("update_proj_gap"))) * (lr / initial if initial else 1.0)
        view = GroupView(ctx.group, {"betas": "proj_betas", "eps": "proj_eps"})
        keys = {k: ctx.key(v) for k, v in self.adam_keys[id(self.adam)].items()}
        sub = ctx.subset([i], grads=[grad], shapes=[tuple(p.shape)], steps=[t - 1], group=view)
        sub.plan = StepPlan.default(1)
        direction = run_chain([self.adam], sub, [grad], {id(self.adam): keys})[0]
        wd = float(ctx.hp("proj_weight_decay"))
        if wd != 0:
            p.mul_(1 - rate * wd)
        p.add_(direction, alpha=-rate)


class CoordinateProjector(Projector):
    """FRUGAL's coordinate subspaces (``CoordinateProjector``): ``k = int(total * density)``
    random columns (``"columns"``, total ``n``), rows (``"rows"``, total ``m``) or entries
    (``"randk"``, total ``m n``), redrawn on GaLore's schedule from a per-parameter seed
    stream as :class:`RandomProjector`. The chosen indices are stored as floats in
    ``indices`` (``(k,)``, or ``(2, k)`` row / column pairs for ``"randk"``; exact below
    ``2**24`` per side). ``project`` gathers them (``"randk"`` gives a vector), ``back``
    scatters into zeros.
    """

    slot_names = ("indices", "seed")

    def __init__(self, optimizer: str, choice: str = "columns") -> None:
        if choice not in COORDINATE_CHOICES:
            raise ValueError(f"coordinate choice must be one of {COORDINATE_CHOICES}, "
                             f"got {choice!r}")
        self.optimizer = optimizer
        self.choice = choice

    def total(self, shape: Shape) -> int:
        m, n = int(shape[0]), int(shape[1])
        return {"columns": n, "rows": m, "randk": m * n}[self.choice]

    def count(self, shape: Shape, group: Group) -> int:
        return max(0, min(int(self.total(shape) * float(group["density"])), self.total(shape)))

    def slots(self, shape: Shape, group: Group) -> list[SlotSpec]:
        k = self.count(shape, group)
        idx = (2, k) if self.choice == "randk" else (k,)
        return [SlotSpec("indices", idx, "exact"), SlotSpec("seed", None)]

    def projected_shape(self, shape: Shape, group: Group) -> Shape:
        k = self.count(shape, group)
        return {"columns": (int(shape[0]), k), "rows": (k, int(shape[1])),
                "randk": (k,)}[self.choice]

    def complete(self, shape: Shape, group: Group) -> bool:
        return self.count(shape, group) >= self.total(shape)

    def refresh(self, ctx: StepContext, i: int, source: Tensor) -> bool:
        if not (refresh_due(ctx, i) or ctx.fresh("indices")[i]):
            return False
        shape = tuple(source.shape)
        check_matrix_shape(self.optimizer, shape, ctx.name(i))
        k = int(self.total(shape) * float(ctx.hp("density")))
        check_rank(self.optimizer, k, self.total(shape), ctx.name(i),
                   what=f"number of {self.choice} k")
        if ctx.fresh("seed")[i]:
            ctx.set_scalar("seed", i, ctx.positions[i] + 1)
        seed = int(ctx.scalar("seed", i))
        ctx.set_scalar("seed", i, next_seed(seed))
        gen = seeded_generator(seed, source.device)
        chosen = torch.randperm(self.total(shape), generator=gen, device=source.device)[:k]
        idx = ctx.slot("indices", [i])[0]
        if self.choice == "randk":
            n = shape[1]
            idx.copy_(torch.stack([chosen // n, chosen % n]))
        else:
            idx.copy_(chosen)
        return True

    def _index(self, ctx: StepContext, i: int) -> Tensor:
        return ctx.slot("indices", [i])[0].long()

    def project(self, ctx: StepContext, i: int, x: Tensor) -> Tensor:
        idx = self._index(ctx, i)
        if self.choice == "columns":
            return x[:, idx]
        if self.choice == "rows":
            return x[idx]
        return x[idx[0], idx[1]]

    def back(self, ctx: StepContext, i: int, y: Tensor, shape: Shape) -> Tensor:
        idx = self._index(ctx, i)
        full = torch.zeros(shape, dtype=y.dtype, device=y.device)
        if self.choice == "columns":
            full[:, idx] = y
        elif self.choice == "rows":
            full[idx] = y
        else:
            full[idx[0], idx[1]] = y
        return full

    def after(self, ctx: StepContext, i: int, source: Tensor) -> None:
        """No post-step move."""


# ---- transforms ----------------------------------------------------------------------------
class ScaleBy(Transform):
    """``u * group[key]``: a hyperparameter factor on one branch's direction (FRUGAL's
    ``inactive_lr_scale`` on its state-free part)."""

    elementwise = True

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        factor = float(ctx.hp(self.key))
        return updates if factor == 1.0 else torch._foreach_mul(updates, factor)


class NormGrowthLimiter(Transform):
    """Fira's norm-growth limiter (Chen et al., arXiv 2410.01623), also used by APOLLO.

    At the first step the norm ``||S||_F`` is recorded; afterwards, when
    ``||S_t|| > gamma ||S_{t-1}||`` the tensor is scaled down to ``gamma ||S_{t-1}||``:
    ``S_t / l`` with ``l = max(||S_t|| / (||S_{t-1}|| + 1e-8), gamma) / gamma``, and the
    *limited* norm ``||S_t|| / l`` is stored. ``gamma = group[gamma_key]``. State: one 0-d
    tensor named ``slot`` (the reference's key: Fira ``scaling_grad``, APOLLO ``scaled_grad``).
    """

    def __init__(self, slot: str = "scaling_grad", gamma_key: str = "gamma") -> None:
        self.slot = slot
        self.gamma_key = gamma_key
        self.slot_names = (slot,)

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec(self.slot, (), "exact")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        gamma = float(ctx.hp(self.gamma_key))
        previous = ctx.slot(self.slot)
        out = []
        for u, prev, fresh in zip(updates, previous, ctx.fresh(self.slot)):
            norm = torch.linalg.vector_norm(u)
            if fresh:
                prev.copy_(norm)
                out.append(u)
                continue
            limiter = torch.clamp(norm / (prev + RATIO_EPS), min=gamma) / gamma
            out.append(u / limiter)
            prev.copy_(norm / limiter)
        return out


# ---- combinators ---------------------------------------------------------------------------
class Subspace(InBasis):
    """:class:`~.combine.InBasis` for the low-rank methods: runs ``inner`` on the projected
    update ``R`` and returns ``scale * back(inner(R))`` (``scale = group[scale_key]``, 1
    without a key), plus ``residual`` run on ``G - back(R)`` when given (FRUGAL's state-free
    part).

    With ``reset_key`` (FRUGAL's ``reset_statistics``) and that hyperparameter true, the inner
    chain's state is dropped (recreated as zeros) whenever the projector re-selects its basis
    after the first step, and the inner chain counts its steps from the last re-selection
    (``(t - 1) % update_proj_gap + 1``), as the reference restarts Adam's step and bias
    correction. The projector's ``after`` hook runs once the direction is computed (OSD's
    basis step). Inner chains see the projected update as their gradient.
    """

    def __init__(self, projector: Projector, inner: list[Transform],
                 residual: list[Transform] | None = None, *, scale_key: str | None = None,
                 reset_key: str | None = None) -> None:
        super().__init__(projector, inner, residual)
        self.scale_key = scale_key
        self.reset_key = reset_key

    @property
    def label(self) -> str:
        return f"subspace_{type(self.projector).__name__.lower()}"

    def back(self, ctx: StepContext, i: int, y: Tensor, shape: Shape) -> Tensor:
        return self.projector.back(ctx, i, y, shape)

    def _reset_inner(self, ctx: StepContext, i: int, shape: Shape) -> None:
        pshape = self.projector.projected_shape(shape, ctx.group)
        st = ctx.states[i]
        for owner, spec in chain_slots(self.inner, pshape, ctx.group, ctx.name(i)):
            key = ctx.keymap.get(id(owner), {}).get(spec.name, spec.name)
            st.pop(key, None)
            st.pop(key + ABSMAX, None)

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """With the inner chain's count restarted, the step powers it reads at that count
        (:func:`~.base.shifted_powers`); nothing otherwise."""
        if self.reset_key is None or not ctx.hp(self.reset_key):
            return {}
        gap = int(ctx.hp("update_proj_gap"))
        return shifted_powers(ctx, [(t - 1) % gap + 1 for t in ctx.steps])

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        proj = self.projector
        mats = [u if u.ndim == 2 else u.reshape(u.shape[0], -1) for u in updates]
        shapes = [tuple(x.shape) for x in mats]
        refreshed = [proj.refresh(ctx, i, x) for i, x in enumerate(mats)]
        steps = ctx.steps
        restarted = {}
        if self.reset_key is not None and ctx.hp(self.reset_key):
            for i, done in enumerate(refreshed):
                if done and steps[i] > 1:
                    self._reset_inner(ctx, i, shapes[i])
            gap = int(ctx.hp("update_proj_gap"))
            steps = restarted["steps"] = [(t - 1) % gap + 1 for t in steps]
            restarted.update(shifted_power_table(ctx, steps))
        low = [proj.project(ctx, i, x) for i, x in enumerate(mats)]
        # the group's own step counts unless restarted: the inner chain then reads the
        # compiled tier's precomputed step powers (StepContext.powers)
        inner_ctx = ctx.subset(list(range(len(mats))), grads=low,
                               shapes=[proj.projected_shape(s, ctx.group) for s in shapes],
                               **restarted)
        inner_ctx.plan = ctx.plan
        out = run_chain(self.inner, inner_ctx, low, ctx.keymap)
        result = self.combine(ctx, mats, shapes, low, out, steps)
        for i, x in enumerate(mats):
            proj.after(ctx, i, x)
        return [r.reshape(u.shape) for r, u in zip(result, updates)]

    def combine(self, ctx: StepContext, mats: list[Tensor], shapes: list[Shape],
                low: list[Tensor], out: list[Tensor], steps: list[int]) -> list[Tensor]:
        """The direction from the inner output ``out`` and the projected updates ``low``."""
        scale = float(ctx.hp(self.scale_key)) if self.scale_key else 1.0
        result = [self.back(ctx, i, y, shapes[i]) for i, y in enumerate(out)]
        if scale != 1.0:
            result = [r * scale for r in result]
        if self.residual:
            self.add_residual(ctx, result, mats, lambda i: self.back(ctx, i, low[i], shapes[i]),
                              mats, shapes)
        return result


def hf_step_factor(ctx: StepContext, steps: list[int]) -> list[float]:
    """``sqrt(1 - beta2^t) / (1 - beta1^t)``: the factor HF-style Adam
    (``ScaleByAdam(eps_form="hf")``) folds into its output."""
    beta1, beta2 = ctx.hp("betas")[:2]
    return [math.sqrt(1 - beta2**t) / (1 - beta1**t) for t in steps]


def norm_ratio(psi: Tensor, low: Tensor, dim: int | None) -> Tensor:
    """``||psi|| / (||low|| + 1e-8)`` along ``dim`` (kept as a broadcastable row / column),
    or of the whole tensors when ``dim`` is None."""
    if dim is None:
        return torch.linalg.vector_norm(psi) / (torch.linalg.vector_norm(low) + RATIO_EPS)
    return (torch.linalg.vector_norm(psi, dim=dim, keepdim=True)
            / (torch.linalg.vector_norm(low, dim=dim, keepdim=True) + RATIO_EPS))


def channel_dim(shape: Shape) -> int:
    """The references' ``norm_dim``: 0 (norms of columns) for a wide matrix, 1 (of rows)
    otherwise; the scale is per channel of the long side."""
    return 0 if shape[0] < shape[1] else 1


class FiraSubspace(Subspace):
    """Fira (Chen et al., arXiv 2410.01623; PyPI ``fira`` 1.0.2): GaLore's low-rank Adam plus
    the norm-scaled residual.

    With ``psi = m / (sqrt(v) + eps)`` (the inner HF Adam output without its step factor
    ``c_t``, see :func:`hf_step_factor`) and ``R`` the projected update, the direction is
    ``c_t * (scale * back(psi) + limit((G - scale * back(R)) * phi))`` with
    ``phi = ||psi|| / (||R|| + 1e-8)`` per channel (:func:`channel_dim`) and ``limit`` the
    ``residual`` chain (the norm-growth limiter). The residual subtracts ``scale * back(R)``,
    not ``back(R)``: the reference's ``project_back`` already multiplies by the scale.
    """

    def combine(self, ctx, mats, shapes, low, out, steps):
        scale = float(ctx.hp(self.scale_key))
        factors = hf_step_factor(ctx, steps)
        scaled = []
        for i, (g, r, y) in enumerate(zip(mats, low, out)):
            psi = y / factors[i]
            phi = norm_ratio(psi, r, channel_dim(tuple(psi.shape)))
            scaled.append((g - self.back(ctx, i, r, shapes[i]) * scale) * phi)
        res_ctx = ctx.subset(list(range(len(mats))), grads=mats, shapes=shapes)
        limited = run_chain(self.residual, res_ctx, scaled, ctx.keymap)
        ctx.plan.put(list(range(len(mats))), res_ctx.plan)
        return [self.back(ctx, i, y, shapes[i]) * scale + s * factors[i]
                for i, (y, s) in enumerate(zip(out, limited))]


class ApolloSubspace(Subspace):
    """APOLLO / APOLLO-Mini (Zhu et al., arXiv 2412.05270; PyPI ``apollo-torch`` 1.0.3):
    the low-rank Adam only estimates a scale for the raw update.

    With ``psi`` and ``R`` as in :class:`FiraSubspace`, ``phi = ||psi|| / (||R|| + 1e-8)``
    per channel (``scale_type="channel"``) or for the whole tensor (``"tensor"``); the
    direction is ``c_t * sqrt(scale) * limit(G * phi)`` (the limiter is the ``residual`` chain,
    skipped with ``norm_growth_limiter=False``); with ``scale_front`` the factor
    ``sqrt(scale)`` is applied before the limiter, as the reference's flag.
    """

    def combine(self, ctx, mats, shapes, low, out, steps):
        root = math.sqrt(float(ctx.hp(self.scale_key)))
        front = bool(ctx.hp("scale_front"))
        channel = ctx.hp("scale_type") == "channel"
        factors = hf_step_factor(ctx, steps)
        scaled = []
        for i, (g, r, y) in enumerate(zip(mats, low, out)):
            phi = norm_ratio(y / factors[i], r, channel_dim(shapes[i]) if channel else None)
            s = g * phi
            scaled.append(s * root if front else s)
        if ctx.hp("norm_growth_limiter"):
            res_ctx = ctx.subset(list(range(len(mats))), grads=mats, shapes=shapes)
            scaled = run_chain(self.residual, res_ctx, scaled, ctx.keymap)
            ctx.plan.put(list(range(len(mats))), res_ctx.plan)
        return [s * (factors[i] if front else factors[i] * root)
                for i, s in enumerate(scaled)]
