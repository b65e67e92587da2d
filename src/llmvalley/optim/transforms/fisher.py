"""AdaFisher's diagonal block-Kronecker Fisher (Gomes et al., ICLR 2025, arXiv 2405.16397).

AdaFisher preconditions a bias-corrected momentum with the diagonal of a K-FAC-style Fisher
block per layer. For an ``nn.Linear`` with weight ``(out, in)`` it keeps

- ``H``: the diagonal of the input covariance E[a a^T] (one entry per input feature, plus the
  homogeneous coordinate 1 when the layer has a bias), and
- ``S``: the diagonal of the output-gradient covariance E[s s^T] (one entry per output),

each Min-Max normalised per capture and folded into a running average, and steps with
``m_hat / (S H^T + damping)`` (no square root). Both statistics come from the layer's input
and output gradient, which an optimizer over parameters never sees, so they are collected by
module hooks that :func:`attach_fisher` registers. The hooks only capture (on the steps where
the statistics are due); the fold into the declared slots happens in the step, so the running
statistics are ordinary checkpointed state.

Parameters of other modules (embeddings, RMSNorm, a weight tied to an embedding) take the
official code's fallback, ``F = 1``: a bias-corrected momentum step. The official code also
has statistics for ``Conv2d``, ``BatchNorm2d`` and ``LayerNorm``; they are not implemented
here, and :func:`attach_fisher` refuses a model that has such modules rather than silently
treating them differently.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from llmvalley.optim.transforms.base import SlotSpec, StepContext, Transform

#: module class names the official code hooks whose statistics are implemented here
SUPPORTED = ("Linear",)
#: module class names the official code hooks whose statistics are not implemented here
NOT_IMPLEMENTED = ("Conv2d", "BatchNorm2d", "LayerNorm")
#: the group key :func:`attach_fisher` sets on the groups whose modules it hooks
ATTACHED_KEY = "fisher_hooks"
#: the Min-Max normalisation's epsilon in the official code
NORM_EPS = 1e-6


def min_max_normalize(x: Tensor, eps: float = NORM_EPS) -> Tensor:
    """``(x - min) / (max - min + eps)`` over the whole vector, with +inf read as 1 and -inf
    as 0 first (the official code's guard)."""
    x = torch.where(x == float("inf"), torch.ones_like(x), x)
    x = torch.where(x == float("-inf"), torch.zeros_like(x), x)
    low = x.min()
    return (x - low) / (x.max() - low + eps)


def _stat_dtype(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def input_diagonal(x: Tensor, bias: bool) -> Tensor:
    """Diagonal of E[a a^T] over every row (token) of a Linear layer's input ``x``, with the
    homogeneous coordinate (always 1) appended when the layer has a bias; normalised."""
    a = _stat_dtype(x.detach()).reshape(-1, x.shape[-1])
    h = data_parallel_mean(a.square().sum(0) / a.shape[0])
    if bias:
        h = torch.cat([h, h.new_ones(1)])
    return min_max_normalize(h)


def output_diagonal(g: Tensor) -> Tensor:
    """Diagonal of E[s s^T] over every row of the gradient ``g`` of a Linear layer's output;
    normalised."""
    s = _stat_dtype(g.detach()).reshape(-1, g.shape[-1])
    return min_max_normalize(data_parallel_mean(s.square().sum(0) / s.shape[0]))


def data_parallel_mean(x: Tensor) -> Tensor:
    """``x`` averaged over the ranks of a data-parallel run (DDP), so that every replica folds
    the statistics of the global batch and the replicas stay identical (the official code's
    ``dist=True``); ``x`` itself in one process. Every rank runs the same hooks in the same
    order, so the all-reduces pair up."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x)
    return x.div_(dist.get_world_size())


@dataclass
class _Pending:
    """Captures waiting for a parameter's next step (its state dict is held so that its id,
    the key, cannot be reused)."""

    state: dict[str, Any]
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


#: captures not yet folded, keyed by ``id(optimizer.state[param])``
_PENDING: dict[int, _Pending] = {}


def _deposit(state: dict[str, Any], kind: str, value: Tensor) -> None:
    entry = _PENDING.get(id(state))
    if entry is None or entry.state is not state:
        entry = _PENDING[id(state)] = _Pending(state)
    getattr(entry, kind).append(value)


def _take(state: dict[str, Any]) -> _Pending | None:
    entry = _PENDING.pop(id(state), None)
    return entry if entry is not None and entry.state is state else None


class FisherHooks:
    """The forward hooks (and the output-gradient hooks they place) that feed AdaFisher's
    statistics for one optimizer and one model. ``remove()`` takes them off."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self._optimizer = weakref.ref(optimizer)
        self.handles: list[Any] = []
        self.modules: list[nn.Module] = []
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]
                  if _runs_adafisher(optimizer, g)}
        owners: dict[int, set[str]] = {}
        for module in model.modules():
            kind = module_kind(module)
            if kind in NOT_IMPLEMENTED and any(id(p) in groups for p in
                                               module.parameters(recurse=False)):
                raise ValueError(
                    f"adafisher: the model has a {kind} module; the official code's {kind} "
                    "statistics are not implemented here (only Linear layers are "
                    "preconditioned). Route its parameters to another optimizer with a rule, "
                    "e.g. rules=[(nn.LayerNorm, 'adamw')]")
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(kind)
        for module in model.modules():
            if module_kind(module) not in SUPPORTED or not isinstance(module, nn.Linear):
                continue
            weight, bias = module.weight, module.bias
            if id(weight) not in groups or owners[id(weight)] != {"Linear"}:
                continue  # not ours, or tied to an embedding: the F = 1 fallback
            targets = [(weight, groups[id(weight)], slice(None, -1) if bias is not None
                        else slice(None))]
            if bias is not None and id(bias) in groups:
                targets.append((bias, groups[id(bias)], slice(-1, None)))
            self.handles.append(module.register_forward_hook(self._forward_hook(targets)))
            self.modules.append(module)
        for group in {id(g): g for g in groups.values()}.values():
            group[ATTACHED_KEY] = True

    def _forward_hook(self, targets: list[tuple[Tensor, dict[str, Any], slice]]):
        weight, group, _ = targets[0]
        has_bias = len(targets) > 1 or targets[0][2] != slice(None)

        def due() -> dict[int, dict[str, Any]] | None:
            optimizer = self._optimizer()
            if optimizer is None:
                return None
            done = optimizer.state[weight].get("step", 0)
            if done % group["fisher_interval"]:
                return None
            return {i: optimizer.state[p] for i, (p, _, _) in enumerate(targets)}

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            states = due()
            if states is None:
                return
            with torch.no_grad():
                h = input_diagonal(inputs[0], has_bias)
            for i, (_, _, part) in enumerate(targets):
                _deposit(states[i], "inputs", h[part])
            if isinstance(output, Tensor) and output.requires_grad:
                def grad_hook(g: Tensor) -> None:
                    with torch.no_grad():
                        s = output_diagonal(g)
                    for st in states.values():
                        _deposit(st, "outputs", s)

                output.register_hook(grad_hook)

        return hook

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def module_kind(module: nn.Module) -> str:
    """The module's class name as the official code matches it; FSDP2's ``fully_shard``
    renames the class (``FSDPLinear``), which is still the same layer."""
    return type(module).__name__.removeprefix("FSDP")


def _runs_adafisher(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> bool:
    spec = getattr(optimizer, "spec", None)
    if spec is None:
        return False
    return any(isinstance(t, ScaleByAdaFisher) for t in spec(group).chain(group))


def attach_fisher(optimizer: torch.optim.Optimizer, model: nn.Module) -> FisherHooks:
    """Hook ``model``'s ``nn.Linear`` layers whose weights ``optimizer`` steps with
    AdaFisher, so that their input and output-gradient statistics reach it. Call it before
    the first forward pass (the statistics of step 0 initialise the preconditioner).

    Raises ``ValueError`` when the model has modules whose official AdaFisher statistics are
    not implemented here (``Conv2d``, ``BatchNorm2d``, ``LayerNorm``) among the parameters the
    optimizer runs AdaFisher on.
    """
    return FisherHooks(optimizer, model)


class ScaleByAdaFisher(Transform):
    """AdaFisher's direction: ``m = beta m + (1 - beta) g``; for a preconditioned tensor
    ``H <- 0.1 gamma H + 0.01 gamma h`` and ``S <- 0.1 gamma S + 0.01 gamma s`` for every
    capture (``h``, ``s``: normalised diagonals, see :func:`input_diagonal`), starting from
    ones; direction ``(m / (1 - beta^t)) / (S H^T + damping)``, or ``m / (1 - beta^t)`` for a
    tensor that never received statistics (the official code's ``F = 1`` fallback).

    Reads ``betas`` (one entry), ``gamma`` and ``damping``. Slots: ``exp_avg``;
    ``fisher_in`` (``in`` entries for a matrix, 1 for a vector: a bias's homogeneous entry)
    and ``fisher_out`` (``out`` entries) for 1-D and 2-D tensors; ``fisher_bound`` (a float,
    1 once statistics arrived).
    """

    slot_names = ("exp_avg", "fisher_in", "fisher_out", "fisher_bound")

    def slots(self, shape, group, name=""):
        out = [SlotSpec("exp_avg", shape)]
        if len(shape) in (1, 2):
            out += [SlotSpec("fisher_in", (shape[1] if len(shape) == 2 else 1,), "exact"),
                    SlotSpec("fisher_out", (shape[0],), "exact"),
                    SlotSpec("fisher_bound", None)]
        return out

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        (beta,) = ctx.hp("betas")
        gamma, damping = ctx.hp("gamma"), ctx.hp("damping")
        keep, add = gamma * 1e-1, gamma * 1e-2  # the official code's running average
        if not ctx.group.get(ATTACHED_KEY) and 1 in ctx.steps:  # once, at the first step
            warnings.warn(
                "adafisher: no module hooks are attached to this parameter group, so every "
                "tensor steps with F = 1 (bias-corrected momentum). Create the optimizer with "
                "llmvalley.create_optimizer(name, model) or call "
                "llmvalley.optim.transforms.fisher.attach_fisher(optimizer, model) before the "
                "first forward pass.", UserWarning, stacklevel=2)
        out = []
        for i, (g, m, t) in enumerate(zip(updates, ctx.slot("exp_avg"), ctx.steps)):
            m.mul_(beta).add_(g, alpha=1 - beta)
            direction = m / (1 - beta**t)
            if len(ctx.shapes[i]) in (1, 2):
                direction = self._precondition(ctx, i, direction, keep, add, damping)
            out.append(direction)
        return out

    @staticmethod
    def _precondition(ctx: StepContext, i: int, direction: Tensor, keep: float, add: float,
                      damping: float) -> Tensor:
        fin, fout = ctx.slot("fisher_in", [i])[0], ctx.slot("fisher_out", [i])[0]
        if ctx.steps[i] == 1:
            fin.fill_(1.0)  # the official code starts both factors at ones
            fout.fill_(1.0)
        pending = _take(ctx.states[i])
        if pending is not None:
            for h in pending.inputs:
                fin.mul_(keep).add_(h.to(fin.dtype), alpha=add)
            for s in pending.outputs:
                fout.mul_(keep).add_(s.to(fout.dtype), alpha=add)
            if pending.inputs or pending.outputs:
                ctx.set_scalar("fisher_bound", i, 1.0)
        if not ctx.scalar("fisher_bound", i):
            return direction
        if direction.ndim == 2:
            return direction / (torch.outer(fout, fin) + damping)
        return direction / (fout * fin + damping)
