"""Exact accounting of optimizer-state memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _local(t: Tensor) -> Tensor:
    """The locally stored shard of a DTensor, the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _tensors(value: Any):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state`` (each storage counted once), plus,
    for an llmvalley optimizer, the declared state of parameters that have not taken a step
    yet (it is created at their first step), so the figure is right before training starts.

    Works for any ``torch.optim.Optimizer``; for DTensor state, the local shard is counted.
    Quantized state counts its codes and its scales.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for st in optimizer.state.values():
        for t in _tensors(st):
            t = _local(t)
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    planned = getattr(optimizer, "planned_state_bytes", None)
    return total + (planned() if callable(planned) else 0)


def global_state_bytes(optimizer: torch.optim.Optimizer, group: Any = None) -> int:
    """:func:`state_bytes` summed over every rank of ``group`` (the default process group):
    the optimizer state of a whole sharded or data-parallel job. In one process (no process
    group) it equals :func:`state_bytes`. Collective: every rank must call it."""
    import torch.distributed as dist

    local = state_bytes(optimizer)
    if not (dist.is_available() and dist.is_initialized()):
        return local
    total = torch.tensor([local], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        total = total.cuda()
    dist.all_reduce(total, group=group)
    return int(total.item())
