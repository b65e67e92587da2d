"""Combinators: running chains, private slot keys, partitions and bases.

- :func:`run_chain` runs transforms in order, each with its own slot keys.
- :func:`assign_keys` gives every transform of a chain private checkpoint keys: a slot's key is
  its name (``exp_avg``, as torch.optim names it) unless another transform that a tensor passes
  through declares the same name; then both are qualified with the transform's label
  (``ema.exp_avg`` and ``scale_by_adam.exp_avg``), so two transforms never share a buffer.
- :class:`Partition` sends each tensor through one of several branches (as optax's
  ``multi_transform``), with hyperparameter aliases and a learning-rate multiplier per branch
  (MARS's and SCALE's separate settings for vectors).
- :class:`InBasis` runs an inner chain in a projected or rotated space owned by a
  :class:`Projector` (its basis, its state, its refresh schedule) and maps the result back,
  optionally adding a residual chain on what the projection leaves out: Adam in a singular
  basis (Conda), in a tracked subspace (COSMOS), in a low-rank subspace (GaLore) or in a
  Kronecker eigenbasis (SOAP) is one :class:`~.adaptive.ScaleByAdam` inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform
from llmvalley.optim.transforms.orthogonalize import matrix_dims, matrix_view

KeyMap = dict[int, dict[str, str]]


def chain_paths(chain: Sequence[Transform]) -> list[list[Transform]]:
    """Every sequence of transforms one tensor can pass through."""
    result: list[list[Transform]] = [[]]
    for t in chain:
        result = [r + alt for r in result for alt in t.paths()]
    return result


def assign_keys(chain: Sequence[Transform]) -> KeyMap:
    """Private slot keys for every transform of ``chain`` (module docstring)."""
    keys: KeyMap = {}
    for path in chain_paths(chain):
        owners: dict[str, list[Transform]] = {}
        for t in path:
            for name in t.slot_names:
                owners.setdefault(name, []).append(t)
        for t in path:
            own = keys.setdefault(id(t), {})
            for name in t.slot_names:
                rivals = owners[name]
                if len(rivals) == 1:
                    own.setdefault(name, name)
                    continue
                labels = [r.label for r in rivals]
                label = t.label if labels.count(t.label) == 1 else f"{t.label}{path.index(t)}"
                own[name] = f"{label}.{name}"
    return keys


def call_bound(transform: Transform, ctx: StepContext, keys: KeyMap,
               method: Callable[..., Any], *args: Any) -> Any:
    """``method(bound_ctx, *args)`` with the context bound to ``transform``'s slot keys, its
    decoded slots written back afterwards (a step, or a hook: ``gather``, ``set_mode``,
    ``update_curvature``)."""
    bound = ctx.bind(transform, keys.get(id(transform), {}))
    bound.keymap = keys  # combinators run inner chains with the same map
    out = method(bound, *args)
    bound.flush()
    return out


def run_chain(chain: Sequence[Transform], ctx: StepContext, updates: list[Tensor],
              keys: KeyMap) -> list[Tensor]:
    """Run ``chain`` on ``updates``; each transform sees its own slot keys."""
    for t in chain:
        updates = call_bound(t, ctx, keys, t, updates)
    return updates


def chain_slots(chain: Sequence[Transform], shape: Shape, group: Mapping[str, Any],
                name: str = "") -> list[tuple[Transform, SlotSpec]]:
    """The slots a tensor of ``shape`` gets from ``chain``, with their owners."""
    out = []
    for t in chain:
        for spec in t.slots(shape, group, name):
            out.append((t, spec))
        if isinstance(t, Combinator):
            out.extend(t.inner_slots(shape, group, name))
    return out


class Combinator(Transform):
    """A transform that runs inner chains (their slots are declared through it)."""

    def inner_slots(self, shape: Shape, group: Mapping[str, Any],
                    name: str = "") -> list[tuple[Transform, SlotSpec]]:
        raise NotImplementedError


# ---- partitions ----------------------------------------------------------------------------
class GroupView(Mapping):
    """A parameter group seen through aliases: ``view["betas"]`` reads ``group["betas_1d"]``."""

    def __init__(self, group: Mapping[str, Any], aliases: Mapping[str, str]) -> None:
        self.group, self.aliases = group, aliases

    def __getitem__(self, key: str) -> Any:
        return self.group[self.aliases.get(key, key)]

    def __iter__(self):
        return iter(self.group)

    def __len__(self) -> int:
        return len(self.group)


@dataclass
class Branch:
    """One branch of a :class:`Partition`.

    Attributes:
        chain: its transforms.
        aliases: hyperparameters read under other names (``{"betas": "betas_1d"}``); an alias
            of ``weight_decay`` also sets the decay the shell applies to these tensors.
        lr_mult: the learning-rate multiplier of these tensors (a function of the group), for
            their step and for their lr-scaled weight decay.
    """

    chain: list[Transform]
    aliases: dict[str, str] = field(default_factory=dict)
    lr_mult: Callable[[Mapping[str, Any]], float] | None = None


class Partition(Combinator):
    """Send each tensor through one branch, chosen by ``select(shape, group, name)``."""

    per_tensor = True

    def __init__(self, select: Callable[[Shape, Mapping[str, Any], str], str],
                 branches: Mapping[str, Branch | list[Transform]]) -> None:
        self.select = select
        self.branches = {k: b if isinstance(b, Branch) else Branch(list(b))
                         for k, b in branches.items()}

    def paths(self) -> list[list[Transform]]:
        return [[self, *p] for b in self.branches.values() for p in chain_paths(b.chain)]

    def branch(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> Branch:
        return self.branches[self.select(shape, group, name)]

    def inner_slots(self, shape, group, name=""):
        b = self.branch(shape, group, name)
        return chain_slots(b.chain, shape, GroupView(group, b.aliases), name)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        chosen: dict[str, list[int]] = {}
        for i, shape in enumerate(ctx.shapes):
            chosen.setdefault(self.select(shape, ctx.group, ctx.names[i] if ctx.names else ""),
                              []).append(i)
        out: list[Tensor | None] = [None] * len(updates)
        for label, idx in chosen.items():
            b = self.branches[label]
            view = GroupView(ctx.group, b.aliases) if b.aliases else ctx.group
            sub = ctx.subset(idx, group=view)
            if "weight_decay" in b.aliases:
                sub.plan.weight_decay = [float(view["weight_decay"])] * len(idx)
            if b.lr_mult is not None:
                mult = float(b.lr_mult(ctx.group))
                sub.plan.lr_mult = [m * mult for m in sub.plan.lr_mult]
            res = run_chain(b.chain, sub, [updates[i] for i in idx], ctx.keymap)
            ctx.plan.put(idx, sub.plan)
            for j, i in enumerate(idx):
                out[i] = res[j]
        return out  # type: ignore[return-value]


# ---- bases ---------------------------------------------------------------------------------
class Projector:
    """A basis an inner chain runs in: owns its state and refresh schedule.

    Tensors reach a projector as matrices (``(out, -1)`` views). Subclasses implement
    :meth:`slots`, :meth:`projected_shape`, :meth:`refresh`, :meth:`project` and :meth:`back`.
    """

    slot_names: tuple[str, ...] = ()
    #: what :meth:`refresh` looks at: ``"update"`` (the chain's input) or ``"grad"``
    source: str = "update"

    def slots(self, shape: Shape, group: Mapping[str, Any]) -> list[SlotSpec]:
        return []

    def projected_shape(self, shape: Shape, group: Mapping[str, Any]) -> Shape:
        raise NotImplementedError

    def complete(self, shape: Shape, group: Mapping[str, Any]) -> bool:
        """Whether the projection loses nothing (a rotation): no residual then."""
        return self.projected_shape(shape, group) == tuple(shape)

    def refresh(self, ctx: StepContext, i: int, source: Tensor) -> None:
        """Update tensor ``i``'s basis from ``source`` when its schedule says so."""

    def project(self, ctx: StepContext, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def back(self, ctx: StepContext, i: int, y: Tensor) -> Tensor:
        raise NotImplementedError


class InBasis(Combinator):
    """Run ``inner`` in the basis of ``projector`` and map its output back.

    The inner chain sees the projected updates and, as its gradients, the projected
    gradients; its slots have the projected shape. With ``residual``, the part of the update
    the projection leaves out (``x - back(project(x))``) goes through that chain and is added
    to the result (skipped when the projection is complete). Tensors are handled as
    ``(out, -1)`` matrices and returned in their own shape.
    """

    def __init__(self, projector: Projector, inner: list[Transform],
                 residual: list[Transform] | None = None) -> None:
        self.projector = projector
        self.inner = list(inner)
        self.residual = list(residual or [])
        self.slot_names = projector.slot_names

    @property
    def label(self) -> str:
        return f"in_{type(self.projector).__name__.lower()}"

    def slots(self, shape, group, name=""):
        return self.projector.slots(matrix_dims(shape), group)

    def paths(self) -> list[list[Transform]]:
        rest = chain_paths(self.residual) if self.residual else [[]]
        return [[self, *p, *q] for p in chain_paths(self.inner) for q in rest]

    def inner_slots(self, shape, group, name=""):
        mat = matrix_dims(shape)
        out = chain_slots(self.inner, self.projector.projected_shape(mat, group), group, name)
        if self.residual and not self.projector.complete(mat, group):
            out += chain_slots(self.residual, mat, group, name)
        return out

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        proj = self.projector
        mats = [matrix_view(u, ctx.name(i)) for i, u in enumerate(updates)]
        grads = [matrix_view(g) for g in ctx.grads]
        mshapes = [matrix_dims(s) for s in ctx.shapes]
        sources = mats if proj.source == "update" else grads
        for i, src in enumerate(sources):
            proj.refresh(ctx, i, src)
        low = [proj.project(ctx, i, x) for i, x in enumerate(mats)]
        low_grads = [proj.project(ctx, i, g) for i, g in enumerate(grads)]
        inner_ctx = ctx.subset(list(range(len(updates))), grads=low_grads,
                               shapes=[proj.projected_shape(s, ctx.group) for s in mshapes])
        inner_ctx.plan = ctx.plan
        out = run_chain(self.inner, inner_ctx, low, ctx.keymap)
        result = [proj.back(ctx, i, y) for i, y in enumerate(out)]
        if self.residual:
            self.add_residual(ctx, result, mats, lambda i: proj.back(ctx, i, low[i]), grads,
                              mshapes)
        return [r.reshape(u.shape) for r, u in zip(result, updates)]

    def add_residual(self, ctx: StepContext, result: list[Tensor], mats: list[Tensor],
                     kept: Callable[[int], Tensor], grads: list[Tensor],
                     shapes: list[Shape]) -> None:
        """``result[i] += residual(mats[i] - kept(i))`` for every matrix the projection does
        not cover (``kept(i)``: what the basis keeps of ``mats[i]``); the residual chain sees
        ``grads`` as its gradients."""
        idx = [i for i, s in enumerate(shapes) if not self.projector.complete(s, ctx.group)]
        if not idx:
            return
        rest = [mats[i] - kept(i) for i in idx]
        res_ctx = ctx.subset(idx, grads=[grads[i] for i in idx], shapes=[shapes[i] for i in idx])
        res_out = run_chain(self.residual, res_ctx, rest, ctx.keymap)
        ctx.plan.put(idx, res_ctx.plan)
        for j, i in enumerate(idx):
            result[i] = result[i] + res_out[j]
