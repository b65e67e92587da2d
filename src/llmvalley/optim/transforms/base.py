"""The transform protocol: the unit every optimizer is built from.

A transform turns a list of *updates* (one tensor per parameter, initially the gradients) into
new updates: a *direction*. Transforms never write parameters; the shell
(:class:`~llmvalley.optim.shell.ChainOptimizer`) applies the learning rate, the weight decay
and the step once, after the chain. A transform may attach per-tensor, per-row or per-column
step scales to its direction through :attr:`StepContext.plan` (NAMO-D's column rates).

State is declared, not created ad hoc: :meth:`Transform.slots` lists the slots a transform
keeps for a tensor of a given shape (the shape it works on, which need not be the
parameter's: a projected or matrix-viewed one). The shell creates them, gives each transform
private keys (see :func:`~llmvalley.optim.transforms.combine.assign_keys`) and stores each slot
through the codec the user chose (``state_precision``). Transforms read and update their slots
through :meth:`StepContext.slot`, which hands out working tensors in the compute dtype and
writes them back through the codec when the transform returns.

Transforms run over whole lists of tensors (``torch._foreach_*`` style). Numeric
hyperparameters are read from ``ctx.group`` at every step, so editing ``param_groups`` (or an
LR scheduler doing so) takes effect as in ``torch.optim``.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.stored import stored_scalars

Shape = tuple[int, ...]

#: how a tensor slot may be stored: ``signed`` and ``unsigned`` values can be quantized with a
#: signed / unsigned map (first / second moments); ``exact`` slots (bases, frozen statistics)
#: always keep the compute precision
ROLES = ("signed", "unsigned", "exact")


@dataclass(frozen=True)
class SlotSpec:
    """One piece of state a transform keeps for one tensor.

    Attributes:
        name: the slot's name inside its transform (the checkpoint key unless two transforms
            of one chain declare the same name; then it is qualified).
        shape: the tensor's shape; ``None`` for a Python float slot (no tensor memory).
        role: ``"signed"``, ``"unsigned"`` or ``"exact"`` (see :data:`ROLES`).
        init: the value a float slot starts at (tensor slots start at zero).
    """

    name: str
    shape: Shape | None
    role: str = "signed"
    init: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"slot {self.name!r}: role must be one of {ROLES}")

    @property
    def numel(self) -> int:
        return 0 if self.shape is None else numel(self.shape)


@dataclass
class StepPlan:
    """How the shell turns each direction into a parameter change (one entry per tensor).

    ``p -= rate * scale * u`` with ``rate = lr * lr_mult`` (or 1 when ``absolute``: the
    direction already includes the learning rate, as Adafactor's relative step). Decoupled
    weight decay shrinks by ``decay_rate * weight_decay`` where ``decay_rate`` defaults to
    ``lr * lr_mult`` (or 1 for decay forms not scaled by the learning rate). ``scale`` and
    ``decay_rate`` may be floats, 0-d tensors, or row ``(m, 1)`` / column ``(1, n)`` tensors
    on the parameter's matrix view.
    """

    scale: list[Any]
    lr_mult: list[float]
    weight_decay: list[float]
    absolute: list[bool]
    decay_rate: list[Any]

    @classmethod
    def default(cls, n: int, weight_decay: float = 0.0) -> StepPlan:
        return cls([1.0] * n, [1.0] * n, [weight_decay] * n, [False] * n, [None] * n)

    def take(self, idx: list[int]) -> StepPlan:
        """The entries of ``idx`` (a sub-plan, merged back with :meth:`put`)."""
        return StepPlan(*([getattr(self, f)[i] for i in idx] for f in PLAN_FIELDS))

    def put(self, idx: list[int], sub: StepPlan) -> None:
        for f in PLAN_FIELDS:
            mine, theirs = getattr(self, f), getattr(sub, f)
            for j, i in enumerate(idx):
                mine[i] = theirs[j]


PLAN_FIELDS = ("scale", "lr_mult", "weight_decay", "absolute", "decay_rate")


@dataclass
class StepContext:
    """Everything a transform may need for one parameter group at one step.

    Attributes:
        params: the tensors being optimised, in the compute dtype (read them; the shell
            writes them).
        grads: the gradients in the compute dtype (sign-flipped when ``maximize``), in the
            space the transform works in (projected inside a basis).
        states: one state dict per parameter (``optimizer.state[p]``).
        steps: the step number of each parameter, counted from 1 for this step.
        group: the parameter group (hyperparameters; a view with aliases in a partition).
        names: parameter names for error messages and name-based rules.
        shapes: the shape each tensor is worked on (the parameter's, or a projected one).
        plan: the step scales the shell applies (see :class:`StepPlan`).
        dtypes: the compute dtype of each tensor.
        codec: stores and loads slots (set by the shell).
        keys: the calling transform's slot keys (set by the chain runner).
        transform: the calling transform (set by the chain runner).
        loss: the loss of this step when the caller gave one (``step(closure)`` or
            ``step(loss=...)``), as a 0-d tensor; ``None`` otherwise. Methods with model-based
            step sizes (MoMo) set :attr:`Transform.needs_loss`.
        global_grad_norm: returns the 2-norm of all gradients of this step, over every
            parameter group (float32, computed once per step on first call), for methods
            that clip by the model's global norm (AdaGC's warm-up).
        totals: for a transform with :attr:`Transform.shared_stats`, the sums over every
            parameter group of what its :meth:`Transform.gather` returned this step; None
            when it runs alone (then it gathers its own tensors).
        stash: a dict the shell keeps for one group between :meth:`Transform.gather` and the
            call that follows it in the same step (what the second pass reuses).
        positions: each tensor's index among the tensors its group steps, as one process
            sees them. Seeds that depend on a tensor's ordinal (APOLLO, PSGD) use it, so that
            a rank stepping only the tensors it owns (:mod:`llmvalley.optim.sharded`) draws
            what one process would.
        power_table: what :meth:`powers` asks before computing ``base**t`` itself: in a
            compiled segment a :class:`PowerTable` of 0-d tensors computed outside the kernel
            (see :mod:`llmvalley.optim.compiled`); ``None`` elsewhere.
        preludes: in a compiled segment, each top-level transform's :meth:`Transform.prelude`
            of this step as 0-d tensors (by ``id`` of the transform); ``None`` elsewhere.
    """

    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Any]]
    steps: list[int]
    group: Mapping[str, Any]
    names: list[str] = field(default_factory=list)
    shapes: list[Shape] = field(default_factory=list)
    plan: StepPlan | None = None
    dtypes: list[torch.dtype] = field(default_factory=list)
    codec: Any = None
    keys: dict[str, str] = field(default_factory=dict)
    transform: Transform | None = None
    created: set[tuple[int, str]] = field(default_factory=set)
    keymap: dict[int, dict[str, str]] = field(default_factory=dict)
    _loaded: list[tuple[str, list[int], list[Tensor]]] = field(default_factory=list)
    loss: Tensor | None = None
    global_grad_norm: Any = None
    totals: dict[str, Any] | None = None
    stash: dict[str, Any] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    power_table: Any = None
    preludes: dict[Any, dict[str, list[Any]]] | None = None

    def __post_init__(self) -> None:
        if not self.positions:
            self.positions = list(range(len(self.grads)))
        if not self.shapes:
            self.shapes = [tuple(g.shape) for g in self.grads]
        if not self.dtypes:
            self.dtypes = [g.dtype for g in self.grads]
        if self.plan is None:
            self.plan = StepPlan.default(len(self.grads))

    # ---- views ---------------------------------------------------------------------------
    def bind(self, transform: Transform, keys: dict[str, str]) -> StepContext:
        """The context as ``transform`` sees it (its own slot keys)."""
        bound = copy.copy(self)
        bound.keys, bound.transform, bound._loaded = keys, transform, []
        return bound

    def subset(self, idx: list[int], **changes: Any) -> StepContext:
        """The context of the tensors ``idx`` (a partition branch); its plan is a sub-plan."""
        steps = [self.steps[i] for i in idx]
        table = self.power_table
        fields = dict(
            params=[self.params[i] for i in idx] if self.params else [],
            grads=[self.grads[i] for i in idx], states=[self.states[i] for i in idx],
            steps=steps, names=[self.names[i] for i in idx] if self.names else [],
            shapes=[self.shapes[i] for i in idx], dtypes=[self.dtypes[i] for i in idx],
            plan=self.plan.take(idx), positions=[self.positions[i] for i in idx],
            power_table=table.take(idx, steps) if isinstance(table, PowerTable) else table,
            preludes=None,
        )
        fields.update(changes)
        return replace(self, **fields, _loaded=[])

    # ---- hyperparameters and names --------------------------------------------------------
    def hp(self, key: str) -> Any:
        """A hyperparameter of this group."""
        return self.group[key]

    def prelude(self, gather: bool = False) -> dict[str, list[Any]]:
        """What the calling transform's :meth:`Transform.prelude` (``gather``:
        :meth:`Transform.gather_prelude`) gives this step: computed now (advancing its float
        state), or, in a compiled segment, the 0-d tensors the compiled tier computed before
        the kernel (equal values share one tensor)."""
        key = prelude_key(self.transform, gather)
        if self.preludes is not None and key in self.preludes:
            return self.preludes[key]
        assert self.transform is not None
        t = self.transform
        out = t.gather_prelude(self) if gather else t.prelude(self)
        assert out is not None, f"{t!r} has no {'gather_' if gather else ''}prelude"
        return out

    def powers(self, base: float) -> list[Any]:
        """``base**t`` for each tensor's step ``t`` (bias corrections are ``1 - powers``).

        Python floats in the eager tiers. In a compiled segment they are 0-d tensors the
        compiled tier computed before the kernel: a power of the symbolic step count would
        be evaluated inside the kernel's loop, once per vector of elements. Use
        :func:`root` rather than ``math.sqrt`` on what is derived from them.
        """
        table = self.power_table
        if table is not None:
            found = table.lookup(base, self.steps)
            if found is not None:
                return found
        return [base**t for t in self.steps]

    def name(self, i: int) -> str:
        """Parameter ``i``'s name for error messages (``"parameter"`` when unnamed)."""
        return self.names[i] if self.names else "parameter"

    # ---- state -----------------------------------------------------------------------------
    def _spec(self, i: int, name: str) -> SlotSpec:
        assert self.transform is not None, "slot() outside a chain"
        for s in self.transform.slots(self.shapes[i], self.group, self.name(i)):
            if s.name == name:
                return s
        raise KeyError(f"{self.transform!r} declares no slot {name!r} for shape "
                       f"{self.shapes[i]}")

    def key(self, name: str) -> str:
        """The checkpoint key of the calling transform's slot ``name``."""
        return self.keys.get(name, name)

    def ensure(self, i: int, name: str) -> str:
        """Create slot ``name`` of tensor ``i`` if missing (it is then *fresh*); its key."""
        key = self.key(name)
        st = self.states[i]
        if key not in st:
            self.codec.create(st, key, self._spec(i, name), self.dtypes[i], self.device(i))
            self.created.add((id(st), key))
        return key

    def device(self, i: int) -> torch.device:
        return self.grads[i].device

    def slot(self, name: str, idx: list[int] | None = None) -> list[Tensor]:
        """The working tensors of slot ``name`` (of tensors ``idx``, default all).

        They are in the compute dtype and may be updated in place: slots stored in another
        precision are decoded here and encoded back when the transform returns.
        """
        idx = range(len(self.states)) if idx is None else idx
        key = self.keys.get(name, name)
        out, decoded = [], []
        for i in idx:
            st = self.states[i]
            value = st.get(key)
            if value is None:
                self.ensure(i, name)
                value = st[key]
            if isinstance(value, Tensor) and value.dtype == self.dtypes[i] \
                    and key + ".absmax" not in st:
                out.append(value)  # stored as computed: updated in place
                continue
            value, _ = self.codec.load(st, key, self._spec(i, name), self.dtypes[i])
            out.append(value)
            decoded.append((i, value))
        if decoded:
            self._loaded.append((name, [i for i, _ in decoded], [v for _, v in decoded]))
        return out

    def fresh(self, name: str) -> list[bool]:
        """Whether slot ``name`` of each tensor was created during this step (so a transform
        can initialise it from data: a first gradient, a first basis)."""
        return [(id(st), self.ensure(i, name)) in self.created
                for i, st in enumerate(self.states)]

    def scalar(self, name: str, i: int) -> float:
        """Float slot ``name`` of tensor ``i``."""
        return self.states[i][self.ensure(i, name)]

    def set_scalar(self, name: str, i: int, value: float) -> None:
        self.states[i][self.ensure(i, name)] = value

    def flush(self) -> None:
        """Encode the slots decoded by :meth:`slot` back into their stored form."""
        for name, idx, values in self._loaded:
            for i, value in zip(idx, values):
                self.codec.store(self.states[i], self.key(name), self._spec(i, name), value)
        self._loaded.clear()


class Transform:
    """Base class of all transforms.

    Subclasses implement :meth:`__call__` (updates in, direction out) and, when they keep
    state, declare it: :attr:`slot_names` (every name the transform may use, for key
    assignment) and :meth:`slots` (the slots for one tensor).
    """

    #: every slot name this transform may declare (part of the checkpoint format)
    slot_names: tuple[str, ...] = ()
    #: the transform reads :attr:`StepContext.loss`: ``step()`` without a loss raises
    needs_loss: bool = False
    #: the transform keeps train/eval iterates (schedule-free): the shell calls
    #: :meth:`set_mode` from ``optimizer.train()`` / ``optimizer.eval()``
    has_modes: bool = False
    #: the curvature estimate the transform consumes, if any: ``"gauss_newton"`` (a backward
    #: of the loss on labels sampled from the model, *after* the step; Sophia-G) or
    #: ``"hessian_vector"`` (the step's own backward taken with ``create_graph=True``, *before*
    #: the step; AdaHessian, Sophia-H). See :meth:`curvature_due`, :meth:`update_curvature`.
    curvature: str | None = None
    #: the transform's statistics are sums over *all* parameter groups (Prodigy's and
    #: D-Adaptation's d, MoMo's model terms): the shell calls :meth:`gather` on every group
    #: first, sums the results and hands them over as ``ctx.totals`` (top-level transforms)
    shared_stats: bool = False
    #: a :attr:`shared_stats` transform whose :meth:`gather` and ``__call__`` trace without a
    #: host sync (their sums stay 0-d tensors, the numbers from float state come through
    #: :meth:`gather_prelude` and :meth:`prelude`, the latter reading ``ctx.totals``): the
    #: compiled tier then compiles both passes of the shell's two-pass step
    compiled_gather: bool = False
    #: each output element depends only on the same element of the inputs and of the state
    #: (no reduction over a tensor, no shape rule, no random stream), so a rank can run the
    #: transform on its own shard of a sharded parameter; chains with any other transform get
    #: whole tensors (:mod:`llmvalley.optim.sharded`). Subclasses must re-declare it.
    elementwise: bool = False
    #: each tensor's output reads only that tensor's update, gradient, parameter and state
    #: (reductions over the tensor, such as norms, are fine): the shell may run the chain on
    #: some of a group's tensors at a time (``"auto"``'s blocks of whole tensors on CPU,
    #: :mod:`llmvalley.optim.blocked`). Element-wise transforms are per-tensor by definition;
    #: leave it False for a transform that batches or compares tensors
    per_tensor: bool = False
    #: ``implementation="auto"`` may move a chain holding the transform to the compiled tier
    #: (:mod:`llmvalley.optim.auto_tier`). False where the CPU's cache-blocked eager step is
    #: the faster one: many passes over each tensor run in cache there, from memory in the
    #: compiled kernels (SinkGD's alternating normalizations)
    auto_compile: bool = True
    #: the transform's statistics sum over all tensors of its group (DoG's distance and
    #: gradient sums): when the group's tensors are sharded, one rank owns all of them
    whole_group: bool = False
    #: the transform runs on row shards (dim 0 of the matrix view) of a sharded matrix: it
    #: reads the whole shape from ``ctx.shapes[i].whole`` and completes its reductions over
    #: ``ctx.shapes[i].group`` (:class:`llmvalley.optim.sharded.ShardedShape`; Dion)
    row_shardable: bool = False
    #: slot names kept whole and identical on every rank when running on row shards
    replicated_slots: tuple[str, ...] = ()

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]] | None:
        """The per-tensor numbers of this step that come from Python-float state (NAdam's
        momentum product, LaProp's learning-rate average), with that state advanced; ``None``
        when the transform keeps no such state. ``__call__`` reads them through
        :meth:`StepContext.prelude`. The compiled tier calls this eagerly before the kernel
        and hands the floats over as 0-d tensors, so that a transform with float state still
        compiles without recompiling at every step."""
        return None

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        """The state kept for a tensor of ``shape`` (the shape this transform works on)."""
        return []

    def set_mode(self, ctx: StepContext, train: bool) -> list[Tensor] | None:
        """Switch between the training iterate and the evaluation iterate (schedule-free).

        ``ctx.params`` hold the current parameter values and ``ctx.grads`` the same tensors
        (there is no gradient in a mode switch). Returns the values the parameters must take in
        the new mode (the shell writes them), or ``None`` to leave them.
        """
        return None

    def gather(self, ctx: StepContext, updates: list[Tensor]) -> dict[str, Any]:
        """This group's contributions to the shared sums (:attr:`shared_stats`), computed from
        the updates that reach the transform; it may update per-tensor slots. The shell sums
        each key over the groups and sets ``ctx.totals`` (tensors as Python floats) before
        calling the transform."""
        raise NotImplementedError

    def gather_prelude(self, ctx: StepContext) -> dict[str, list[Any]] | None:
        """The numbers :meth:`gather` reads from Python-float state (Prodigy's ``d``), as
        :meth:`prelude` gives them to ``__call__``; read through
        ``ctx.prelude(gather=True)``. With :attr:`compiled_gather`, the compiled tier runs
        it eagerly before the gathering kernel."""
        return None

    def curvature_due(self, step: int, group: Mapping[str, Any]) -> bool:
        """Whether the curvature estimate is wanted at ``step`` (counted from 1, the step
        about to be taken, or, for ``"gauss_newton"``, the one just taken)."""
        return False

    def update_curvature(self, ctx: StepContext) -> None:
        """Fold a curvature estimate into the transform's slots. ``ctx.grads`` are the
        parameters' ``.grad``: the sampled-label gradients (``"gauss_newton"``) or the step's
        gradients with their graph (``"hessian_vector"``; ``ctx.params`` are then the
        parameters themselves and autograd is enabled, for Hessian-vector products)."""
        raise NotImplementedError

    def paths(self) -> list[list[Transform]]:
        """The transforms a single tensor can pass through, from this one on (combinators
        with branches return one list per branch)."""
        return [[self]]

    @property
    def label(self) -> str:
        """Short snake-case name, used to qualify colliding slot keys."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_",
                      type(self).__name__).lower()

    def __repr__(self) -> str:
        return type(self).__name__


def float_totals(totals: Mapping[str, Any]) -> dict[str, Any]:
    """Shared sums (:meth:`Transform.gather`'s, summed over the groups) with 0-d tensors
    read as Python floats: one host sync per sum and step, not one per tensor."""
    return {k: float(v) if isinstance(v, Tensor) else v for k, v in totals.items()}


def prelude_key(transform: Transform | None, gather: bool = False) -> Any:
    """The key of a transform's numbers in :attr:`StepContext.preludes`."""
    return (id(transform), "gather") if gather else id(transform)


def numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def bias_corrections(beta: float, steps: list[int]) -> list[float]:
    """``1 - beta**t`` for each step ``t``."""
    return [1.0 - beta**t for t in steps]


def scalars(values: list[Any]) -> Any:
    """One scalar when every tensor shares it (the common case), else the list. Values
    derived from :meth:`StepContext.powers` in a compiled segment are 0-d tensors (one when
    every tensor holds the same one), stored by
    :func:`~llmvalley.optim.transforms.stored.stored_scalars` so that the kernel loads them
    instead of recomputing their arithmetic for every vector of elements."""
    first = values[0]
    if isinstance(first, Tensor):
        if all(v is first for v in values):
            return stored_scalars([first])[0]
        return stored_scalars(values)
    return first if all(v == first for v in values) else values


def add_scaled_(dst: Tensor | list[Tensor], src: Tensor | list[Tensor], coef: Any
                ) -> Tensor | list[Tensor]:
    """``dst += coef * src`` in place, for one tensor or a list: a float goes through ``alpha``
    (one fused multiply-add, as eager steps always computed it); a 0-d tensor (a prelude's or
    :meth:`StepContext.powers`' number in a compiled segment, which ``alpha`` cannot take) as a
    product, so that changing it does not recompile."""
    if isinstance(dst, Tensor):
        return dst.add_(src * coef) if isinstance(coef, Tensor) else dst.add_(src, alpha=coef)
    if isinstance(coef, Tensor):
        torch._foreach_add_(dst, torch._foreach_mul(src, coef))
    else:
        torch._foreach_add_(dst, src, alpha=coef)
    return dst


def add_each_(tensors: list[Tensor], value: Any) -> None:
    """``t += value`` for each tensor; a 0-d tensor ``value`` (a prelude's number in a compiled
    step, such as Prodigy's ``d * eps``) tensor by tensor: given to ``torch._foreach_add_``,
    dynamo specialises it and recompiles at every new value."""
    if isinstance(value, Tensor):
        for t in tensors:
            t.add_(value)
    else:
        torch._foreach_add_(tensors, value)


def root(x: Any) -> Any:
    """``math.sqrt`` of a float, or the square root of a 0-d tensor (what
    :meth:`StepContext.powers` gives in a compiled segment)."""
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def shifted_powers(ctx: StepContext, steps: list[int]) -> dict[str, list[float]]:
    """A :meth:`Transform.prelude`'s numbers for an inner chain that counts ``steps`` instead
    of the group's steps (SOAP's inner Adam one step behind, FRUGAL's restarted count):
    ``beta**s`` for each of the group's ``betas`` and each tensor's ``s``. The compiled tier's
    table of step powers answers only the group's own counts, so without these the inner
    chain would evaluate its powers inside the kernel (see :func:`shifted_power_table`)."""
    betas = ctx.group.get("betas") or ()
    return {f"power_{k}": [float(b)**s for s in steps] for k, b in enumerate(betas)}


def shifted_power_table(ctx: StepContext, steps: list[Any], idx: list[int] | None = None
                        ) -> dict[str, Any]:
    """The ``power_table`` change for :meth:`StepContext.subset` of an inner chain counting
    ``steps`` (of the tensors ``idx``, default all): in a compiled segment whose transform's
    prelude gave :func:`shifted_powers`, a :class:`PowerTable` of those 0-d tensors; else
    nothing (eager steps compute their floats as before)."""
    numbers = ctx.preludes.get(id(ctx.transform)) if ctx.preludes is not None else None
    if not numbers or not isinstance(ctx.power_table, PowerTable):
        return {}
    values: dict[float, list[Any]] = {}
    for k, b in enumerate(ctx.group.get("betas") or ()):
        row = numbers.get(f"power_{k}")
        if row is None:
            return {}
        values[float(b)] = row if idx is None else [row[i] for i in idx]
    return {"power_table": PowerTable(steps, values)}


@dataclass
class PowerTable:
    """``base**t`` at the step counts ``steps``, as 0-d tensors (one per tensor; tensors at
    the same step share one). It answers only a context whose ``steps`` is this very list:
    code that counts other steps (a restarted count, a projector one step behind) gets
    ``None`` and computes its own powers."""

    steps: list[Any]
    values: dict[float, list[Tensor]]

    def lookup(self, base: float, steps: list[Any]) -> list[Tensor] | None:
        return self.values.get(base) if steps is self.steps else None

    def take(self, idx: list[int], steps: list[Any]) -> PowerTable:
        """The table of the tensors ``idx``, answering the list ``steps`` (theirs)."""
        return PowerTable(steps, {b: [v[i] for i in idx] for b, v in self.values.items()})


class StepScale(Transform):
    """Multiply the step by the hyperparameter ``group[key]`` (Conda's ``scale``), through the
    plan: the shell folds it into the step size."""

    elementwise = True

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        factor = float(ctx.hp(self.key))
        ctx.plan.scale = [s * factor for s in ctx.plan.scale]
        return updates
