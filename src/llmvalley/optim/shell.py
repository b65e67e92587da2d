"""The one ``torch.optim.Optimizer`` that runs every llmvalley recipe, and the one place that
writes parameters.

Each parameter group names its recipe under ``"optimizer"``, so a single optimizer can hold,
say, Muon for hidden matrices and AdamW for the rest, with standard ``param_groups``, LR
schedulers and ``state_dict()`` / ``load_state_dict()``.

A step, per group: the gradients (negated with ``maximize``) go through the group's full chain
(:func:`~llmvalley.optim.options.chain_and_keys`: shell options plus the recipe), which
returns a direction and a :class:`~llmvalley.optim.transforms.base.StepPlan`; the shell then
applies the weight decay in the form the spec declares and ``p -= lr * scale * direction``.

Shell options, accepted by every recipe and given to every group (fallback groups included)
unless a group sets its own:

- ``nonfinite``: ``"raise"`` (default) raises ``FloatingPointError`` naming the parameter
  before any state changes; ``"skip"`` skips the whole step (every group, nothing touched) and
  counts it in ``optimizer.skipped_steps``; ``"ignore"`` does no check (no host sync). The
  check is one screening pass over all groups' gradients per step, with one host sync
  (:func:`find_nonfinite`). ``step(grad_norm=...)`` hands it the global gradient norm the
  training loop already has (``clip_grad_norm_``'s return value): a finite norm proves every
  gradient finite, so the step makes no extra pass at all.
- ``maximize``; ``cautious`` and ``mars`` (:mod:`llmvalley.optim.options`);
- ``state_precision`` / ``state_dtype``: how slots are stored (:mod:`llmvalley.optim.state`);
- ``master_weights`` (bf16/fp16 parameters): ``None`` (default) updates through a float32
  working copy rounded to nearest, as torch.optim does; ``True`` keeps a float32 master copy in
  the state (``master_weight``); ``False`` rounds stochastically, with no copy.
- ``implementation``, the execution tier (:func:`~llmvalley.optim.spec.execution_tier`):
  ``"foreach"`` (the transform chain, ``torch._foreach_*`` calls), ``"compiled"`` (the chain
  and the write compiled with ``torch.compile``, :mod:`llmvalley.optim.compiled`),
  ``"fused"`` (a kernel computing the same math: torch's fused Adam for adam/adamw; other
  recipes raise) and ``"auto"`` (default): fused where the recipe has a kernel and no shell
  option changes the chain, else foreach (on CPU in cache-sized blocks where the chain allows,
  bit for bit the same: :mod:`llmvalley.optim.blocked`), moving to the compiled tier on CPU
  once the group has run long enough for a compile to pay (never on the first steps;
  :mod:`llmvalley.optim.auto_tier`). adam/adamw's ``fused=False`` means foreach,
  ``fused=True`` fused.

On the CPU, the first step makes glibc keep the memory it frees, so the temporaries of each
step reuse mapped pages (:mod:`llmvalley.optim.allocator`; opt out with
``LLMVALLEY_RETAIN_CPU_MEMORY=0``).

State is declared by the transforms and created at a parameter's first step (the skipped
steps of ``nonfinite="skip"`` create nothing); :meth:`ChainOptimizer.init_state` creates it
at once, and :func:`~llmvalley.optim.memory.state_bytes` counts declared state that does not
exist yet, so it is right before training starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim import blocked
from llmvalley.optim.allocator import retain_freed_cpu_memory
from llmvalley.optim.auto_tier import AutoTier
from llmvalley.optim.options import chain_and_keys, is_plain
from llmvalley.optim.sharded import (
    OwnerPlan,
    chain_is_elementwise,
    chain_runs_on_rows,
    is_dtensor,
    is_sharded,
    local,
    local_state,
    replicated_keys,
    sharded_shape,
    store_local_state,
    sum_over_shards,
)
from llmvalley.optim.spec import SHELL_DEFAULTS, SHELL_KEYS, OptimizerSpec, spec_from_chain
from llmvalley.optim.state import ABSMAX, Codec, stochastic_round
from llmvalley.optim.transforms.base import StepContext, StepPlan, Transform, float_totals
from llmvalley.optim.transforms.combine import call_bound, chain_paths, chain_slots, run_chain
from llmvalley.optim.transforms.orthogonalize import matrix_view

LOW_PRECISION = (torch.float16, torch.bfloat16)
#: options that say how state is stored: when given to the constructor they win over a loaded
#: checkpoint's (whose state is converted); every other hyperparameter comes from the checkpoint
STORAGE_KEYS = ("state_precision", "state_dtype", "master_weights")
MASTER = "master_weight"


def compute_dtype(param: Tensor) -> torch.dtype:
    """The dtype a parameter's update is computed in (float32 for bf16/fp16)."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def lookup_spec(optimizer: str | OptimizerSpec | list[Transform]) -> OptimizerSpec:
    """A spec from a registry name, a spec, or a list of transforms."""
    if isinstance(optimizer, OptimizerSpec):
        return optimizer
    if isinstance(optimizer, (list, tuple)):
        return spec_from_chain(list(optimizer))
    from llmvalley.optim.registry import get_spec

    return get_spec(optimizer)


class ChainOptimizer(torch.optim.Optimizer):
    """Runs the transform chain of each group's recipe and applies the steps.

    Args:
        params: parameters or parameter-group dicts, as for any torch optimizer. A group may
            name another recipe (or spec) under ``"optimizer"``; missing keys come from that
            recipe's defaults, and shell options from this constructor's.
        optimizer: the default recipe: a registry name, an :class:`OptimizerSpec` (registered
            or not), or a list of transforms (a custom optimizer, see
            ``docs/custom-optimizer.md``).
        **hparams: hyperparameters of the default recipe, plus the shell options
            (:data:`~llmvalley.optim.spec.SHELL_DEFAULTS`).
    """

    def __init__(self, params: Iterable[Any], optimizer: str | OptimizerSpec | list[Transform],
                 **hparams: Any) -> None:
        if isinstance(optimizer, (list, tuple)):  # a chain: its hyperparameters are given here
            spec = spec_from_chain(list(optimizer), {k: v for k, v in hparams.items()
                                                     if k not in SHELL_KEYS})
        else:
            spec = lookup_spec(optimizer)
        self._specs: dict[str, OptimizerSpec] = {spec.name: spec}
        defaults = spec.resolve(hparams)
        defaults["optimizer"] = spec.name
        self._shell = {k: hparams[k] for k in SHELL_KEYS if k in hparams}
        self.skipped_steps = 0
        self._names: dict[int, str] = {}
        # sharded parameters (llmvalley.optim.sharded): the whole tensors of an owner-plan
        # step, the local state views to store back, and the cached owner plan
        self._views: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._shard_views: list[tuple[Tensor, dict[str, Any], dict[str, Any], set[str]]] = []
        self._plan: tuple[tuple[int, ...], OwnerPlan] | None = None
        self._positions: dict[int, int] = {}
        self._kinds: dict[int, tuple[list[Transform], tuple[bool, bool, set[str]]]] = {}
        self.compile_seconds = 0.0  # time spent compiling (implementation="compiled")
        self._auto = AutoTier()  # when implementation="auto" compiles (auto_tier)
        super().__init__(params, defaults)

    # ---- groups -------------------------------------------------------------------------
    def spec(self, group: Mapping[str, Any]) -> OptimizerSpec:
        """The spec a group runs."""
        return self._specs[group["optimizer"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        wanted = param_group.get("optimizer", self.defaults["optimizer"])
        spec = self._specs.get(wanted) if isinstance(wanted, str) else None
        spec = spec or lookup_spec(wanted)
        held = self._specs.get(spec.name)
        if held is not None and held is not spec:
            if spec.about is not None:
                raise ValueError(f"two different optimizers named {spec.name!r} in one "
                                 "ChainOptimizer: give them distinct names")
            k = 2  # an unregistered spec or chain under a name in use: number it
            while f"{spec.name}-{k}" in self._specs:
                k += 1
            spec = replace(spec, name=f"{spec.name}-{k}", _chains={}, _full_chains={})
        self._specs.setdefault(spec.name, spec)
        if spec.name == self.defaults["optimizer"]:
            base = dict(self.defaults)
        else:
            base = {**spec.resolve({}), **self._shell, "optimizer": spec.name}
        param_group["optimizer"] = spec.name
        saved, self.defaults = self.defaults, base
        try:
            super().add_param_group(param_group)
        finally:
            self.defaults = saved
        group = self.param_groups[-1]
        spec.validate(group)
        if any(t.has_modes for t in self._chain(group)):
            group.setdefault("train_mode", True)
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            label = names[i] if names else f"group {len(self.param_groups) - 1} param {i}"
            self._names[id(p)] = f"{label} (shape {tuple(p.shape)})"
        if spec.applies_to == "matrix":
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"{spec.name} applies to weight matrices only, and "
                        f"{self.param_name(p)} has {p.ndim} dimension(s): put it in a group "
                        "with another optimizer (e.g. {'params': [...], 'optimizer': 'adamw'}), "
                        f"or pass the model itself to create_optimizer('{spec.name}', model) "
                        "to route embeddings, head, norms and biases to a fallback"
                    )

    def param_name(self, p: Tensor) -> str:
        name = self._names.get(id(p))
        return name if name is not None else f"parameter of shape {tuple(p.shape)}"

    # ---- state ----------------------------------------------------------------------------
    def _declared(self, group: Mapping[str, Any], p: Tensor, shape: tuple[int, ...] | None = None):
        """``(key, slot)`` of every slot declared for ``p`` (worked on in ``shape``, by default
        its own) by its group's full chain."""
        spec = self.spec(group)
        chain, keys = chain_and_keys(spec, group)
        name = self._names.get(id(p), "")
        out = []
        if p.numel() == 0:
            return out
        shape = tuple(p.shape) if shape is None else shape  # a ShardedShape stays one
        for owner, slot in chain_slots(chain, shape, group, name):
            out.append((keys.get(id(owner), {}).get(slot.name, slot.name), slot))
        return out

    def _materialize(self, group: Mapping[str, Any], p: Tensor, codec: Codec,
                     created: set | None = None, value: Tensor | None = None,
                     shape: tuple[int, ...] | None = None) -> dict[str, Any]:
        """The state of ``p``, its declared slots created (as zeros) when missing. ``value``
        is the tensor the step works on (a local shard, or the whole tensor on its owner),
        whose shape the slots take (``shape``: a :class:`ShardedShape` for a shard). State
        created ahead of the first step
        (:meth:`init_state`) still counts as fresh at that step."""
        st = self.state[p]
        value = local(p) if value is None else value
        if "step" in st:
            if st["step"] == 0 and created is not None:
                created.update((id(st), k) for k in st if k != "step")
            return st
        st["step"] = 0
        dtype = compute_dtype(p)
        for key, slot in self._declared(group, p, value.shape if shape is None else shape):
            if key not in st:
                codec.create(st, key, slot, dtype, value.device)
                if created is not None:
                    created.add((id(st), key))
        if self._uses_master(group, p):
            st[MASTER] = value.detach().to(torch.float32, copy=True)
        return st

    @staticmethod
    def _uses_master(group: Mapping[str, Any], p: Tensor) -> bool:
        return group.get("master_weights") is True and p.dtype in LOW_PRECISION

    def init_state(self) -> None:
        """Create every parameter's declared state now (zeros, step 0), e.g. before a
        distributed checkpoint is loaded into it. Otherwise it is created at the first step."""
        plan = self.owner_plan()
        wholes: dict[int, list[Tensor]] = {}
        if plan is not None:  # collective: the owners get the whole values (master weights)
            moving = [p for g in self.param_groups for p in g["params"]
                      if p.numel() > 0 and self._needs_owner(g, p)]
            wholes = plan.gather(moving, [moving])
        for group in self.param_groups:
            codec = _codec(group)
            for p in group["params"]:
                shape = self._stored_shape(group, p, plan)
                if shape is None:  # another rank owns it: this one only counts its steps
                    self.state[p].setdefault("step", 0)
                    continue
                whole = wholes.get(id(p))
                st = self._materialize(group, p, codec, value=whole[0] if whole else None,
                                       shape=None if whole else shape)
                if is_dtensor(p) and whole is None:
                    store_local_state(st, dict(st), p, self._replicated(group))

    def _stored_shape(self, group: Mapping[str, Any], p: Tensor, plan: OwnerPlan | None
                      ) -> torch.Size | None:
        """The shape this rank keeps ``p``'s state in: the whole tensor's on its owner, the
        local shard's for element-wise groups, None when another rank owns it."""
        if p.numel() > 0 and self._needs_owner(group, p):
            assert plan is not None
            return p.shape if plan.owns(p) else None
        return sharded_shape(p, self.param_name(p))

    def planned_state_bytes(self) -> int:
        """Bytes of declared state that does not exist yet (see :func:`state_bytes`)."""
        total = 0
        plan = self.owner_plan()
        for group in self.param_groups:
            codec = _codec(group)
            for p in group["params"]:
                shape = self._stored_shape(group, p, plan)
                if "step" in self.state.get(p, {}) or shape is None:
                    continue
                dtype = compute_dtype(p)
                total += sum(codec.nbytes(k, s, dtype)
                             for k, s in self._declared(group, p, shape))
                if self._uses_master(group, p):
                    total += 4 * math.prod(shape)
        return total

    # ---- checkpoints ----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, but keep each state tensor's saved dtype.

        ``torch.optim.Optimizer`` casts floating state to the parameter's dtype, which would
        round the float32 state of bf16 parameters to bf16 and break bit-exact resume.
        Tensors are moved to their parameter's device. A state_dict of another method raises,
        naming both; one written by llmvalley 0.1 is migrated (its state keys renamed as each
        spec's ``legacy_keys`` says, new group options filled with their defaults). Storage
        options given to this optimizer's constructor (:data:`STORAGE_KEYS`) win over the
        checkpoint's, and the loaded state is converted to them.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            for i, (mine, theirs) in enumerate(zip(self.param_groups, saved_groups)):
                if theirs.get("optimizer", mine["optimizer"]) != mine["optimizer"]:
                    raise ValueError(
                        f"cannot load a state_dict of {theirs['optimizer']!r} into "
                        f"{mine['optimizer']!r} (parameter group {i}): the checkpoint was "
                        f"written by another method; create the optimizer as "
                        f"{theirs['optimizer']!r} to resume it"
                    )
        current = [dict(g) for g in self.param_groups]
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        for group, before in zip(self.param_groups, current):
            legacy = self.spec(group).legacy_defaults
            for k, v in before.items():
                group.setdefault(k, legacy.get(k, v))
            for k in STORAGE_KEYS:  # how to store state: this optimizer's choice, if it made one
                if k in self._shell:
                    group[k] = before[k]
        saved_ids = [i for g in saved_groups for i in g["params"]]
        owners = [(p, g) for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, owners))
        for pid, st in saved_state.items():
            if pid not in id_to_param:
                continue
            p, group = id_to_param[pid]
            state = {k: v.detach().to(device=p.device, copy=True) if isinstance(v, Tensor)
                     else v for k, v in st.items()}
            for old, new in self.spec(group).legacy_keys.items():
                if old in state and new not in state:
                    state[new] = state.pop(old)
            codec = _codec(group)
            for key, slot in self._declared(group, p):
                value = state.get(key)
                if not isinstance(value, Tensor) or slot.shape is None:
                    continue
                if key + ABSMAX not in state and value.shape != slot.shape \
                        and value.numel() == slot.numel:  # 0.1 kept some in the matrix view
                    state[key] = value.reshape(slot.shape)
                codec.convert(state, key, slot, compute_dtype(p))
            self.state[p] = state
        self._settle_owned_state()

    def _settle_owned_state(self) -> None:
        """State loaded as DTensors (a full state dict set by ``set_state_dict``) for sharded
        parameters that are stepped whole: the owner rank keeps whole tensors, the others drop
        them. Collective when there is any (every rank loads the same keys then)."""
        plan = None
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st or not (p.numel() > 0 and self._needs_owner(group, p)):
                    continue
                plan = plan or self.owner_plan()
                assert plan is not None
                for k in sorted(k for k, v in st.items() if is_dtensor(v)):
                    whole = st[k].full_tensor()
                    if plan.owns(p):
                        st[k] = whole
                    else:
                        del st[k]

    # ---- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None,
             grad_norm: Tensor | float | None = None) -> Any:
        """Perform one optimisation step (see the module docstring for the NaN policy).

        ``closure`` (re-evaluates the model and returns the loss) or ``loss`` (the loss of the
        batch whose gradients are in ``.grad``) give the loss to methods that need it (MoMo);
        the others ignore it. ``grad_norm``: the 2-norm of (at least) every gradient this
        step reads, as ``torch.nn.utils.clip_grad_norm_`` returns it (a DTensor under FSDP2
        is fine; pass it on every rank or none). When it is finite, every gradient is, so the
        non-finite screen is skipped; when it is not, the gradients are screened as without
        it. Returns the loss.
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.training:
            raise RuntimeError(
                "the optimizer is in eval mode (optimizer.eval() was called): call "
                "optimizer.train() before step()")
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{group['optimizer']}: sparse gradients are not supported "
                        f"({self.param_name(p)})"
                    )
            if params:
                work.append((group, params))
        for group, _ in work:
            if loss is None and any(t.needs_loss for t in self._chain(group)):
                raise ValueError(
                    f"{group['optimizer']} needs the loss: call step(closure) or "
                    "step(loss=loss)")
        flat = [p for _, params in work for p in params]
        if flat and flat[0].device.type == "cpu":
            retain_freed_cpu_memory()  # once per process: no page faults on temporaries
        norms = GradNorms([p.grad for p in flat], flat)
        checked = [(g, ps) for g, ps in work if g["nonfinite"] != "ignore"]
        sharded = any(is_sharded(p) for p in flat)
        proven = bool(checked) and grad_norm is not None and _finite_norm(grad_norm)
        found = None if proven else find_nonfinite(checked)
        if sharded and not proven:  # every rank takes the same decision on the same parameter
            found = _agree(checked, found)
        if found is not None:
            group, params, bad = found
            if group["nonfinite"] == "skip":
                self.skipped_steps += 1
                return loss
            raise FloatingPointError(
                f"{group['optimizer']}: non-finite gradient in {self.param_name(params[bad])}; "
                "no parameter or state was changed. Pass nonfinite='skip' to skip such steps."
            )
        loss_tensor = None
        if loss is not None:
            loss_tensor = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        shared = any(self._barrier(group) is not None for group, _ in work)
        moving = self._gather_owned(work) if sharded else []
        if moving:  # each rank steps the whole tensors it owns, plus its local shards
            kept = []
            for g, ps in work:
                mine = [(i, p) for i, p in enumerate(ps)
                        if id(p) in self._views or not self._needs_owner(g, p)]
                self._positions.update((id(p), i) for i, p in mine)
                kept.append((g, [p for _, p in mine]))
            work = kept
        try:
            if shared:
                self._step_shared(work, loss_tensor, norms, reduce=sharded)
            else:
                for group, params in work:
                    if params:
                        self._step_group(group, params, loss_tensor, norms)
            self._store_shard_views()
            if moving:
                assert self._plan is not None
                self._plan[1].scatter(moving, {k: v[0] for k, v in self._views.items()})
        finally:
            self._views.clear()
            self._shard_views.clear()
            self._positions.clear()
        return loss

    # ---- sharded parameters (llmvalley.optim.sharded) -------------------------------------
    def _needs_owner(self, group: Mapping[str, Any], p: Tensor) -> bool:
        """Whether sharded ``p`` is stepped whole on an owner rank: its group's chain is not
        element-wise, or its state or parameter is rounded in ways tied to whole tensors."""
        if not is_sharded(p):
            return False
        codec = _codec(group)
        elementwise, rows, _ = self._chain_kinds(group)
        on_shards = elementwise or (rows and getattr(sharded_shape(p), "dim", None) == 0)
        return (not on_shards or codec.default is not None or bool(codec.by_slot)
                or (group.get("master_weights") is False and p.dtype in LOW_PRECISION))

    def sharding_problem(self) -> str | None:
        """Why this optimizer cannot step its sharded parameters, or None when it can (every
        method but the Hessian-vector ones: AdaHessian, Sophia-H)."""
        for g in self.param_groups:
            if any(t.curvature == "hessian_vector" for t in self._chain(g)) \
                    and any(is_sharded(p) for p in g["params"]):
                return (f"{g['optimizer']}: Hessian-vector curvature is not supported on "
                        "sharded parameters (FSDP2's reduce-scattered gradients carry no graph "
                        "to differentiate); use Sophia-G, or run unsharded")
        return None

    def owner_plan(self) -> OwnerPlan | None:
        """The plan that assigns each sharded parameter needing whole tensors to an owner
        rank (None when there is none); rebuilt when the parameter groups change."""
        members, bundles = [], []
        for k, g in enumerate(self.param_groups):
            whole = any(t.whole_group for path in chain_paths(self._chain(g)) for t in path)
            for p in g["params"]:
                if p.numel() > 0 and self._needs_owner(g, p):
                    members.append(p)
                    bundles.append(k if whole else None)
        if not members:
            return None
        key = tuple(id(p) for p in members)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, OwnerPlan(members, [self.param_name(p) for p in members],
                                         bundles))
        return self._plan[1]

    def _gather_owned(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> list[Tensor]:
        """Send the shards of the parameters needing whole tensors (and their gradients) to
        their owners; the owners' whole tensors become this step's views. Non-owners only
        count the step. Returns the parameters moved (for the scatter after the step)."""
        plan = self.owner_plan()
        if plan is None:
            return []
        moving = [p for g, ps in work for p in ps if self._needs_owner(g, p)]
        unsupported = self.sharding_problem()
        if unsupported is not None:
            raise NotImplementedError(unsupported)
        wholes = plan.gather(moving, [[p.grad for p in moving], moving])
        for p in moving:
            if id(p) in wholes:
                grad, value = wholes[id(p)]
                self._views[id(p)] = (value, grad)
            else:
                st = self.state[p]
                st["step"] = st.get("step", 0) + 1
        return moving

    def _chain(self, group: Mapping[str, Any]) -> list[Transform]:
        return chain_and_keys(self.spec(group), group)[0]

    def _context(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor] | None,
                 *, count: bool, created: set | None = None) -> tuple[StepContext, list[Tensor]]:
        """The step context of ``params`` (their state created if missing, steps advanced when
        ``count``) and the working tensors (master weights, or compute-dtype copies) the
        shell writes back. ``grads=None`` uses the parameters' ``.grad``."""
        codec = _codec(group)
        created = created if created is not None else set()
        working, gs, states, steps, dtypes, shapes = [], [], [], [], [], []
        for i, p in enumerate(params):
            value, g = self._view(p, None if grads is None else grads[i])
            shard = is_dtensor(p) and value is not self._views.get(id(p), (None,))[0]
            shape = sharded_shape(p, self.param_name(p)) if shard else value.shape
            st = self._materialize(group, p, codec, created, value, shape)
            if count:
                st["step"] += 1
            if shard:
                view = local_state(st)  # transforms work on this rank's shards of the state
                created.update((id(view), k) for k in st if (id(st), k) in created)
                self._shard_views.append((p, st, view, self._replicated(group)))
                st = view
            shapes.append(shape)
            dtype = compute_dtype(p)
            if MASTER in st:
                working.append(st[MASTER])
            else:
                working.append(value if value.dtype == dtype else value.detach().to(dtype))
            gs.append(g if g.dtype == dtype else g.to(dtype))
            states.append(st)
            steps.append(st["step"])
            dtypes.append(dtype)
        codec.step = max(steps)
        if group["maximize"] and grads is None:
            gs = list(torch._foreach_neg(gs))  # a list: AdaGC replaces its items
        decay = self.spec(group).decay_for(group)
        ctx = StepContext(
            params=working, grads=gs, states=states, steps=steps, group=group, shapes=shapes,
            names=[self.param_name(p) for p in params], dtypes=dtypes, codec=codec,
            plan=StepPlan.default(len(params), float(group.get(decay.key, 0.0) or 0.0)),
            created=created,
            keymap=chain_and_keys(self.spec(group), group)[1],
            positions=[self._positions.get(id(p), i) for i, p in enumerate(params)],
        )
        return ctx, working

    def _view(self, p: Tensor, grad: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The tensor a step works on for ``p`` and its gradient: the whole tensor on its
        owner rank during an owner-plan step, this rank's shard of a sharded parameter, or
        the parameter itself."""
        view = self._views.get(id(p))
        if view is not None:
            return view
        g = p.grad if grad is None else grad
        return local(p), (local(g) if g is not None else g)

    def _store_shard_views(self) -> None:
        """Put the state that transforms updated through local views back as DTensors."""
        for p, st, view, replicated in self._shard_views:
            store_local_state(st, view, p, replicated)
        self._shard_views.clear()

    def _replicated(self, group: Mapping[str, Any]) -> set[str]:
        return self._chain_kinds(group)[2]

    def _chain_kinds(self, group: Mapping[str, Any]) -> tuple[bool, bool, set[str]]:
        """Whether the group's chain is element-wise, whether it runs on row shards, and its
        replicated state keys: walked once per chain (chains are cached on their spec), not
        per parameter and step."""
        chain, keys = chain_and_keys(self.spec(group), group)
        held = self._kinds.get(id(chain))
        if held is None or held[0] is not chain:
            held = self._kinds[id(chain)] = (chain, (
                chain_is_elementwise(chain), chain_runs_on_rows(chain),
                replicated_keys(chain, keys)))
        return held[1]

    def _write_back(self, group: Mapping[str, Any], params: list[Tensor],
                    working: list[Tensor], codec: Codec) -> None:
        for i, (p, w) in enumerate(zip(params, working)):
            p = self._view(p)[0]
            if w is p:
                continue
            if group.get("master_weights") is False and p.dtype == torch.bfloat16:
                p.copy_(stochastic_round(w, p.dtype, codec.seed(f"param{i}", tuple(p.shape))))
            else:
                p.copy_(w)

    def _begin(self, group: dict[str, Any], params: list[Tensor], loss: Tensor | None,
               norms: GradNorms | None) -> tuple[StepContext, list[Tensor]]:
        """The context of a step (steps advanced, state created) with the step's loss and
        global gradient norm."""
        ctx, working = self._context(group, params, None, count=True, created=set())
        ctx.loss, ctx.global_grad_norm = loss, norms
        return ctx, working

    def _step_group(self, group: dict[str, Any], params: list[Tensor],
                    loss: Tensor | None = None, norms: GradNorms | None = None) -> None:
        spec = self.spec(group)
        ctx, working = self._begin(group, params, loss, norms)
        # the compiled tier (llmvalley.optim.compiled): chain and write compiled
        if group.get("implementation") == "compiled":
            from llmvalley.optim.compiled import compiled_step

            compiled_step(self, group, ctx, working)
        elif not self._fused_step(spec, group, params, ctx, working) \
                and not self._auto_compiled_step(group, params, ctx, working) \
                and not self._blocked_step(group, params, ctx):
            self._apply(group, ctx, working, run_chain(self._chain(group), ctx, ctx.grads,
                                                       ctx.keymap))
        self._write_back(group, params, working, ctx.codec)

    def _fused_step(self, spec: OptimizerSpec, group: dict[str, Any], params: list[Tensor],
                    ctx: StepContext, working: list[Tensor]) -> bool:
        """The spec's fused kernel, where it computes the group's whole chain (no other shell
        option); a kernel that only bridges the eager phase (``fused_until_compiled``) gives
        way to ``"auto"``'s compiled step once that compiles. Returns whether a step ran."""
        if spec.fused is None or not is_plain(spec, group):
            return False
        if spec.fused_until_compiled and self._auto_compiled_step(group, params, ctx, working):
            return True
        return spec.fused(ctx)

    def _auto_compiled_step(self, group: dict[str, Any], params: list[Tensor],
                            ctx: StepContext, working: list[Tensor]) -> bool:
        """``implementation="auto"`` on the foreach tier: the compiled step once the group
        has run long enough (:mod:`llmvalley.optim.auto_tier`). Returns whether it ran."""
        if not self._auto_compiles(group, params, ctx):
            return False
        from llmvalley.optim.compiled import compiled_step

        ran, _ = self._guarded(group, ctx, compiled_step, self, group, ctx, working)
        return ran

    def _auto_compiles(self, group: dict[str, Any], params: list[Tensor],
                       ctx: StepContext) -> bool:
        """Whether an ``"auto"`` group (not adam's ``fused=...``) runs compiled this step."""
        if group.get("implementation", "auto") != "auto" or group.get("fused") is not None:
            return False
        auto = self.__dict__.get("_auto")
        if auto is None:  # an optimizer unpickled from before the auto tier existed
            auto = self._auto = AutoTier()
        return auto.compiles(self._chain(group), group, ctx, params)

    def _blocked_step(self, group: dict[str, Any], params: list[Tensor],
                      ctx: StepContext) -> bool:
        """``implementation="auto"`` on the foreach tier, on CPU: the chain and the write in
        cache-sized blocks (:mod:`llmvalley.optim.blocked`). Returns whether it ran (a group
        of a single block, or of one tensor, runs the plain chain)."""
        blocks = self._block_layout(group, params, ctx, "step", lambda chain: blocked.block_kind(
            chain, group, ctx, self._chain_kinds(group)[0]))
        if not blocks:
            return False
        decay = self.spec(group).decay_for(group)
        return blocked.blocked_step(self._chain(group), ctx.keymap, ctx, blocks,
                                    float(group["lr"]), decay.form, decay.scaled(group))

    def _blocked_finish(self, group: dict[str, Any], params: list[Tensor], ctx: StepContext,
                        barrier: int, updates: list[Tensor]) -> bool:
        """The same for the second pass of a shared-statistics step (the chain from its
        shared-stats transform on, and the write), in blocks of whole tensors
        (:func:`llmvalley.optim.blocked.finish_blocks`). Returns whether it ran."""
        blocks = self._block_layout(group, params, ctx, "finish", lambda chain: (
            "whole" if blocked.finish_blocks(chain, barrier) else None))
        if not blocks:
            return False
        decay = self.spec(group).decay_for(group)
        return blocked.blocked_step(self._chain(group)[barrier:], ctx.keymap, ctx, blocks,
                                    float(group["lr"]), decay.form, decay.scaled(group),
                                    updates=updates)

    def _block_layout(self, group: dict[str, Any], params: list[Tensor], ctx: StepContext,
                      tag: str, kind: Callable[[list[Transform]], str | None]
                      ) -> list[list[blocked.Piece]]:
        """The blocks of a cache-blocked ``tag`` pass of ``group`` this step, [] when it
        runs unblocked. The per-step conditions: ``"auto"`` (not adam's ``fused=...``), CPU,
        no sharded views, at least two blocks' worth of elements; the static ones, decided
        once per chain, pass and shape set: unsharded parameters and ``kind(chain)``
        (``"split"``, ``"whole"`` or None: not blocked), and more than one block."""
        if group.get("implementation", "auto") != "auto" or group.get("fused") is not None \
                or not blocked.eligible_device(ctx.params) or self._shard_views or self._views \
                or sum(t.numel() for t in ctx.params) < 2 * blocked.BLOCK_NUMEL:
            return []
        chain = self._chain(group)
        key = (id(chain), group["optimizer"], tag, tuple(ctx.shapes), tuple(ctx.dtypes))
        cache = self.__dict__.setdefault("_blocks", {})
        blocks = cache.get(key)
        if blocks is None:
            found = None if any(is_sharded(p) for p in params) else kind(chain)
            blocks = [] if found is None else \
                blocked.layout([tuple(s) for s in ctx.shapes], split=found == "split")
            blocks = cache[key] = blocks if len(blocks) > 1 else []
        return blocks

    def _apply(self, group: Mapping[str, Any], ctx: StepContext, working: list[Tensor],
               directions: list[Tensor]) -> None:
        # the compiled tier: the write alone compiled (shared-stats groups)
        if group.get("implementation") == "compiled":
            from llmvalley.optim.compiled import compiled_apply

            compiled_apply(self, group, ctx, working, directions)
            return
        decay = self.spec(group).decay_for(group)
        apply_step(working, directions, ctx.plan, float(group["lr"]), decay.form,
                   decay.scaled(group))

    def _barrier(self, group: Mapping[str, Any]) -> int | None:
        """Index of the first top-level transform of the group's chain with shared stats."""
        return next((i for i, t in enumerate(self._chain(group)) if t.shared_stats), None)

    def _step_shared(self, work: list[tuple[dict[str, Any], list[Tensor]]],
                     loss: Tensor | None, norms: GradNorms, reduce: bool = False) -> None:
        """A step in two passes for methods whose statistics sum over every group: each
        group's chain runs up to its shared-stats transform, which gathers; the sums go to
        every group as ``ctx.totals`` (Python floats: one host sync per sum), and the chains
        finish. With ``reduce`` (sharded parameters) the sums are also taken over every rank.
        On the compiled tier (and ``"auto"``'s, once it compiles) both passes are compiled
        when the transform allows it (:func:`~llmvalley.optim.compiled.shared_compiles`)."""
        staged, parts = [], []
        for group, params in work:
            if not params:
                continue
            b = self._barrier(group)
            if b is None:
                self._step_group(group, params, loss, norms)
                continue
            ctx, working = self._begin(group, params, loss, norms)
            chain, keys = self._chain(group), ctx.keymap
            fast = self._shared_compiled(group, params, ctx, b)
            if fast:
                from llmvalley.optim.compiled import compiled_gather

                fast, result = self._guarded(group, ctx, compiled_gather, self, group, ctx, b)
                if fast:
                    updates, part = result
            if not fast:
                updates = run_chain(chain[:b], ctx, ctx.grads, keys)
                part = call_bound(chain[b], ctx, keys, chain[b].gather, updates)
            parts.append(part)
            staged.append((group, params, ctx, working, chain, keys, b, updates, fast))
        totals: dict[str, Any] = {}
        for part in parts:
            for k, v in part.items():
                totals[k] = totals[k] + v if k in totals else v
        if reduce:
            totals = _sum_over_ranks(totals)
        totals = float_totals(totals)
        for group, params, ctx, working, chain, keys, b, updates, fast in staged:
            ctx.totals = totals
            if fast:
                from llmvalley.optim.compiled import compiled_finish

                fast, _ = self._guarded(group, ctx, compiled_finish, self, group, ctx, b,
                                        updates, working)
            if not fast and not self._blocked_finish(group, params, ctx, b, updates):
                directions = run_chain(chain[b:], ctx, updates, keys)
                self._apply(group, ctx, working, directions)
            ctx.totals = None
            self._write_back(group, params, working, ctx.codec)

    def _shared_compiled(self, group: dict[str, Any], params: list[Tensor], ctx: StepContext,
                         barrier: int) -> bool:
        """Whether a shared-statistics group's two passes run compiled this step: on the
        compiled tier, or ``"auto"`` once :mod:`~llmvalley.optim.auto_tier` compiles it."""
        from llmvalley.optim.compiled import shared_compiles

        chain = self._chain(group)
        if group.get("implementation") == "compiled":
            known = self.__dict__.setdefault("_shared_layouts", {})
            key = (id(chain), group["optimizer"], tuple(ctx.shapes), tuple(ctx.dtypes))
            if key not in known:  # the chain's slots, walked once per layout
                known[key] = shared_compiles(chain, barrier, group, ctx)
            return known[key]
        return chain[barrier].compiled_gather and self._auto_compiles(group, params, ctx)

    def _guarded(self, group: dict[str, Any], ctx: StepContext, fn: Callable[..., Any],
                 *args: Any) -> tuple[bool, Any]:
        """``(True, fn(*args))``; under ``"auto"``, a failure to compile gives
        ``(False, None)``: the float state its preludes advanced is restored and the chain
        stays eager from now on, with a warning (as :meth:`_auto_compiled_step`)."""
        if group.get("implementation") == "compiled":
            return True, fn(*args)
        from llmvalley.optim.auto_tier import float_state, restore
        from llmvalley.optim.compiled import compile_stats

        saved = float_state(ctx)
        graphs = compile_stats(self).graphs
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 -- a compile failure: this pass runs eagerly
            restore(ctx, saved)
            self._auto.failed(self._chain(group), group, e)
            return False, None
        if compile_stats(self).graphs != graphs:
            self._auto.compiled_new_graphs(self._chain(group), group)
        return True, out

    # ---- train / eval iterates (schedule-free) -----------------------------------------
    def train(self, mode: bool = True) -> ChainOptimizer:
        """Put the parameters on the training iterate (``mode=False``: :meth:`eval`).

        Only methods that keep separate iterates (schedule-free) change anything: their
        parameters hold the training point ``y`` in train mode and the averaged point ``x``
        in eval mode, as ``schedulefree``'s optimizers do. Call ``eval()`` before evaluating
        or saving the model, ``train()`` before the next step. Returns the optimizer.
        """
        with torch.no_grad():
            for group in self.param_groups:
                hooks = [t for t in self._chain(group) if t.has_modes]
                if not hooks or group.get("train_mode", True) == mode:
                    continue
                params = [p for p in group["params"]
                          if p.numel() > 0 and "step" in self.state.get(p, {})]
                if params:
                    ctx, working = self._context(group, params, params, count=False)
                    ctx.grads = list(ctx.params)
                    for t in hooks:
                        values = call_bound(t, ctx, ctx.keymap, t.set_mode, mode)
                        if values is not None:
                            for w, v in zip(working, values):
                                w.copy_(v)
                    self._write_back(group, params, working, ctx.codec)
                group["train_mode"] = mode
        return self

    def eval(self) -> ChainOptimizer:
        """Put the parameters on the evaluation iterate (see :meth:`train`)."""
        return self.train(False)

    @property
    def training(self) -> bool:
        """False after :meth:`eval` until :meth:`train` (always True for methods without
        modes)."""
        return all(g.get("train_mode", True) for g in self.param_groups)

    # ---- curvature estimates (Sophia, AdaHessian) ---------------------------------------
    def _group_step(self, group: Mapping[str, Any]) -> int:
        return max((self.state[p]["step"] for p in group["params"]
                    if "step" in self.state.get(p, {})), default=0)

    def curvature_request(self) -> str | None:
        """The curvature estimate a training loop must provide now, or None.

        - ``"hessian_vector"``: take this step's backward with ``create_graph=True`` and call
          :meth:`update_curvature` before ``step()`` (AdaHessian, Sophia-H);
        - ``"gauss_newton"``: after ``step()``, run a forward pass, sample labels from the
          model's own predictions, backward the loss on those labels (into zeroed ``.grad``),
          then call :meth:`update_curvature` and zero the gradients (Sophia-G).

        ``valley train`` follows this protocol; see ``docs/train.md``.
        """
        for group in self.param_groups:
            hooks = [t for t in self._chain(group) if t.curvature is not None]
            if not hooks:  # the common case: no state scan on every step
                continue
            done = self._group_step(group)
            for t in hooks:
                if t.curvature == "hessian_vector" and t.curvature_due(done + 1, group):
                    return t.curvature
                if t.curvature == "gauss_newton" and done > 0 and t.curvature_due(done, group):
                    return t.curvature
        return None

    def update_curvature(self) -> None:
        """Fold the curvature estimate in ``.grad`` (see :meth:`curvature_request`) into the
        state of every method that consumes one. Gradients taken with ``create_graph=True``
        are detached afterwards (their graph is freed; ``step()`` then uses their values)."""
        for group in self.param_groups:
            hooks = [t for t in self._chain(group) if t.curvature is not None]
            if not hooks:
                continue
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            if not params:
                continue
            graph = any(p.grad.requires_grad for p in params)
            with torch.set_grad_enabled(graph):
                ctx, _ = self._context(group, params, [p.grad for p in params], count=False)
                if graph:
                    ctx.params = list(params)
                for t in hooks:
                    call_bound(t, ctx, ctx.keymap, t.update_curvature)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()


class GradNorms:
    """The 2-norms of a step's gradients, one fused ``_foreach_norm`` per device on first use
    (nothing is computed unless a transform asks): calling the object gives their global norm
    over every group (in float32, or float64 when a gradient is; AdaGC's warm-up)."""

    def __init__(self, grads: list[Tensor], params: list[Tensor] | None = None) -> None:
        self.grads = [local(g) for g in grads]  # this rank's shards of sharded gradients
        self.params = params
        self._norms: dict[int, Tensor] | None = None
        self.value: Tensor | None = None

    def of(self, tensors: list[Tensor]) -> list[Tensor]:
        """The norms of ``tensors`` (some of this step's gradients)."""
        if self._norms is None:
            by_device: dict[torch.device, list[Tensor]] = {}
            for g in self.grads:
                by_device.setdefault(g.device, []).append(g)
            self._norms = {id(g): n for gs in by_device.values()
                           for g, n in zip(gs, torch._foreach_norm(gs))}
        return [self._norms[id(local(t))] for t in tensors]

    def find(self, tensors: list[Tensor]) -> list[Tensor] | None:
        """The norms of ``tensors`` when each is one of this step's gradients as the step
        received it (so a transform that needs them and the global norm reads the gradients
        once: AdaGC's warm-up), else None."""
        known = {id(g) for g in self.grads}
        if not all(id(t) in known for t in tensors):
            return None
        return self.of(tensors)

    def __call__(self) -> Tensor:
        if self.value is None:
            device = self.grads[0].device
            dtype = torch.float64 if any(g.dtype == torch.float64 for g in self.grads) \
                else torch.float32
            norms = [n.to(device=device, dtype=dtype) for n in self.of(self.grads)]
            if self.params is not None and any(is_sharded(p) for p in self.params):
                norms = [n.sqrt() for n in sum_over_shards([n * n for n in norms], self.params)]
            self.value = torch.linalg.vector_norm(torch.stack(norms))
        return self.value


def _codec(group: Mapping[str, Any]) -> Codec:
    return Codec(group.get("state_precision"), group.get("state_dtype"))


def _foreach_by_value(tensors: list[Tensor], factors: list[float],
                      op: Callable[[list[Tensor], float], None]) -> None:
    """Apply ``op(tensors_with_factor, factor)`` once per distinct factor."""
    buckets: dict[float, list[Tensor]] = {}
    for t, f in zip(tensors, factors):
        buckets.setdefault(f, []).append(t)
    for f, ts in buckets.items():
        op(ts, f)


def _decoupled(params: list[Tensor], plan: StepPlan, lr: float, scaled: bool) -> None:
    """``p *= 1 - rate * wd`` (tensor rates on the matrix view)."""
    floats: list[Tensor] = []
    factors: list[float] = []
    for p, wd, mult, rate in zip(params, plan.weight_decay, plan.lr_mult, plan.decay_rate):
        if rate is not None:
            if wd != 0:  # a row/column rate applies on the matrix view
                tensor_rate = isinstance(rate, Tensor) and rate.ndim > 0
                (matrix_view(p) if tensor_rate else p).mul_(1 - wd * rate)
            continue
        if wd == 0:
            continue
        r = (lr * mult if mult != 1.0 else lr) if scaled else 1.0
        floats.append(p)
        factors.append(1.0 - r * wd)
    _foreach_by_value(floats, factors, torch._foreach_mul_)


def apply_step(params: list[Tensor], directions: list[Tensor], plan: StepPlan, lr: float,
               form: str, scaled: bool) -> None:
    """The parameter write: weight decay in ``form`` and ``p -= rate * scale * u``."""
    wd = plan.weight_decay[0]
    if _uniform(plan, wd):  # the common case: one call for the decay, one for the step
        shrink = 1.0 - (lr if scaled else 1.0) * wd
        if wd != 0 and form == "decoupled":
            torch._foreach_mul_(params, shrink)
        torch._foreach_add_(params, directions, alpha=-lr)
        if wd != 0 and form == "decoupled_after":
            torch._foreach_mul_(params, shrink)
        elif wd != 0 and form == "proximal":
            torch._foreach_div_(params, 1.0 + lr * wd)
        return
    if form == "decoupled":
        _decoupled(params, plan, lr, scaled)
    plain_p: list[Tensor] = []
    plain_u: list[Tensor] = []
    alphas: list[float] = []
    for p, u, s, mult, absolute in zip(params, directions, plan.scale, plan.lr_mult,
                                       plan.absolute):
        rate = 1.0 if absolute else (lr * mult if mult != 1.0 else lr)
        if isinstance(s, Tensor):
            target, step = (p, u) if s.ndim == 0 else (matrix_view(p), matrix_view(u))
            if rate == 1.0:
                target.sub_(step * s)
            else:
                target.add_(step * s, alpha=-rate)
            continue
        plain_p.append(p)
        plain_u.append(u)
        alphas.append(-(rate * s) if s != 1.0 else -rate)
    if plain_p:
        buckets: dict[float, list[int]] = {}
        for j, a in enumerate(alphas):
            buckets.setdefault(a, []).append(j)
        for a, idx in buckets.items():
            torch._foreach_add_([plain_p[j] for j in idx], [plain_u[j] for j in idx], alpha=a)
    if form == "decoupled_after":
        _decoupled(params, plan, lr, scaled)
    elif form == "proximal":
        factors = [1.0 + (lr * m if m != 1.0 else lr) * wd
                   for wd, m in zip(plan.weight_decay, plan.lr_mult)]
        keep = [(p, f) for p, f, wd in zip(params, factors, plan.weight_decay) if wd != 0]
        _foreach_by_value([p for p, _ in keep], [f for _, f in keep], torch._foreach_div_)


def _uniform(plan: StepPlan, wd: float) -> bool:
    """No per-tensor scale, rate, decay or multiplier: one step size for the whole group."""
    return (all(type(s) is float and s == 1.0 for s in plan.scale)
            and plan.lr_mult.count(1.0) == len(plan.lr_mult)
            and not any(plan.absolute) and plan.decay_rate.count(None) == len(plan.decay_rate)
            and plan.weight_decay.count(wd) == len(plan.weight_decay))


def find_nonfinite(work: list[tuple[Any, list[Tensor]]]
                   ) -> tuple[Any, list[Tensor], int] | None:
    """The first ``(group, params, index)`` whose gradient holds a NaN or inf, or None.

    One screening pass for the whole step (:func:`screen_finite`: a sum per gradient, one host
    sync per device). A sum is non-finite whenever an element is, and can also overflow on
    huge finite gradients, so a flagged step is confirmed element-wise before anything is
    reported.
    """
    grads = [local(p.grad) for _, params in work for p in params]
    if not grads or screen_finite(grads):
        return None
    for group, params in work:
        bad = first_nonfinite([local(p.grad) for p in params])
        if bad is not None:
            return group, params, bad
    return None  # a sum overflowed on finite values


#: Gradients with fewer elements are screened together by one ``_foreach_norm`` call, which
#: saves a Python-level call per tensor; larger ones by a sum, the cheapest reduction.
SCREEN_SUM_MIN = 1 << 15
#: dtypes screened with sums in their own dtype: float32/float64, and bfloat16, whose range is
#: float32's (torch accumulates its sums in float32 and rounds the total; 2.7x faster than a
#: float32 result on CPU). float16 sums would overflow at 65504, so they get a float32 result
_NATIVE_SUM = (torch.float32, torch.float64, torch.bfloat16)


def screen_finite(grads: list[Tensor]) -> bool:
    """True when every tensor in ``grads`` is surely finite; False when one may not be.

    A floating sum is NaN or inf when any summand is, so a finite total proves every element
    finite; a non-finite total may also be an overflow of finite values (the caller confirms
    element-wise). Sums have a float32 range at least: float16 ones get a float32 result
    (theirs would overflow at 65504), bfloat16 ones their own (:data:`_NATIVE_SUM`).
    On CPU a sum costs ~0.15 of a fused AdamW step, against ~0.25 for a 2-norm and ~0.2 for
    an abs-max (3.7M parameters, 1 thread; ``benchmarks/nonfinite_check.py``).
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for gs in by_device.values():
        small, parts = [], []
        for g in gs:
            if g.is_complex():  # real and imaginary parts, each screened
                g = torch.view_as_real(g)
            if g.numel() < SCREEN_SUM_MIN:
                small.append(g)
            else:
                parts.append(g.sum() if g.dtype in _NATIVE_SUM else g.sum(dtype=torch.float32))
        if small:
            parts.extend(torch._foreach_norm(small))
        if any(t.dtype != parts[0].dtype for t in parts):  # float64 gradients among others
            parts = [t.double() for t in parts]
        if not bool(torch.stack(parts).isfinite().all()):
            return False
    return True


def _finite_norm(grad_norm: Tensor | float) -> bool:
    """Whether a caller's global gradient norm is finite. A DTensor norm (``clip_grad_norm_``
    under FSDP2 may return a partial one) is completed first, so every rank decides alike."""
    if isinstance(grad_norm, Tensor):
        if is_dtensor(grad_norm):
            grad_norm = grad_norm.full_tensor()
        return bool(torch.isfinite(grad_norm).all())
    return math.isfinite(float(grad_norm))


def _agree(checked: list[tuple[Any, list[Tensor]]],
           found: tuple[Any, list[Tensor], int] | None) -> tuple[Any, list[Tensor], int] | None:
    """The first non-finite gradient over every rank (one all-reduce of an index), so that
    each rank skips or raises on the same parameter even when only one shard holds it."""
    import torch.distributed as dist

    flat = [(g, ps, i) for g, ps in checked for i in range(len(ps))]
    mine = len(flat) if found is None else next(
        k for k, (g, ps, i) in enumerate(flat) if ps is found[1] and i == found[2])
    device = local(flat[0][1][0]).device if flat else torch.device("cpu")
    index = torch.tensor([mine], device=device)
    dist.all_reduce(index, op=dist.ReduceOp.MIN)
    k = int(index.item())
    return None if k >= len(flat) else flat[k]


def _sum_over_ranks(totals: dict[str, Any]) -> dict[str, Any]:
    """Shared statistics summed over every rank, in rank order (the same on each rank)."""
    import torch.distributed as dist

    mine = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in totals.items()}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out: dict[str, Any] = {}
    for part in everyone:
        for k, v in part.items():
            out[k] = out[k] + v if k in out else v
    device = next((v.device for v in totals.values() if isinstance(v, Tensor)), None)
    return {k: v.to(device) if isinstance(v, Tensor) and device is not None else v
            for k, v in out.items()}


def first_nonfinite(tensors: list[Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or inf (element-wise check), or None."""
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            return i
    return None


__all__ = ["ChainOptimizer", "SHELL_DEFAULTS", "apply_step", "compute_dtype",
           "find_nonfinite", "first_nonfinite", "lookup_spec", "screen_finite"]
