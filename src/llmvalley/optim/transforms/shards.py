"""Shapes of sharded tensors, for transforms that run on row shards (Dion).

Kept apart from :mod:`llmvalley.optim.sharded` (which imports the combinators) so that any
transform module can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor

try:  # DTensor is public since torch 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor split across ranks (not merely replicated)."""
    return is_dtensor(p) and any(not pl.is_replicate() for pl in p.placements)


class ShardedShape(tuple):
    """The shape a transform works on for one rank's shard of a sharded parameter: the local
    shard's shape (it behaves as that tuple), with the whole tensor's shape in ``whole`` and
    the process group that holds the other shards in ``group`` (row-shardable transforms
    complete their reductions over it; ``dim`` is the split dimension)."""

    whole: tuple[int, ...]
    group: Any
    dim: int

    def __new__(cls, local_shape: Sequence[int], whole: Sequence[int], group: Any,
                dim: int) -> ShardedShape:
        self = super().__new__(cls, tuple(int(n) for n in local_shape))
        self.whole, self.group, self.dim = tuple(int(n) for n in whole), group, dim
        return self

    def __reduce__(self):  # pickles (and copies) as the plain local shape
        return (tuple, (tuple(self),))


def chunk_sizes(length: int, world: int) -> list[int]:
    """Each rank's extent of a dimension of ``length`` split over ``world`` ranks
    (``torch.chunk``'s split, as FSDP2 shards)."""
    step = -(-length // world)
    return [max(0, min(step, length - r * step)) for r in range(world)]


def whole_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The whole tensor's shape of a :class:`ShardedShape`, else ``shape`` itself."""
    return getattr(shape, "whole", tuple(shape))


def shard_group(shape: Sequence[int]) -> Any:
    """The process group of a :class:`ShardedShape` (None for a whole tensor)."""
    return getattr(shape, "group", None)


def all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    """``t`` summed over ``group`` in place (nothing without a group); returns ``t``."""
    if group is not None:
        dist.all_reduce(t, group=group)
    return t
