"""Steps on sharded parameters (FSDP2 / DTensor): local shards or whole tensors on owner ranks.

A parameter group runs one of two ways when its parameters are sharded DTensors:

- **Local.** When every transform of the group's chain is element-wise
  (:attr:`~llmvalley.optim.transforms.base.Transform.elementwise`), the state is stored as
  plain storage and a step is the same arithmetic on every element, so each rank steps its
  own shard. The state is kept as DTensors sharded like the parameter, so
  ``torch.distributed.checkpoint`` sees ordinary DTensors and reshards them.
- **Owner.** Everything else needs whole tensors: orthogonalization, row and column
  statistics, bases, Kronecker factors, per-tensor norms, quantized state, stochastic
  rounding. :class:`OwnerPlan` gives each such tensor one owner rank (balanced by size), sends
  the gradient and parameter shards to it in one all-to-all, the owner alone runs the chain on
  the whole tensor (its state lives on the owner, whole), and a second all-to-all sends the new
  values back to the ranks holding the shards, as microsoft/dion and torchtitan's distributed
  Muon do. No rank computes a tensor it does not own; in one process the plan is the identity.

Only parameters sharded along one mesh dimension (FSDP2's ``Shard(dim)``, with ``Replicate``
on other mesh dimensions, as in HSDP) can go to owners; a chain needing whole tensors of a
parameter sharded two ways (tensor parallel plus FSDP) raises a clear error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor is public since torch 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

from llmvalley.optim.transforms.base import Transform
from llmvalley.optim.transforms.combine import chain_paths
from llmvalley.optim.transforms.shards import (
    ShardedShape,
    all_reduce_sum,
    chunk_sizes,
    is_dtensor,
    is_sharded,
    shard_group,
    whole_shape,
)


def local(t: Tensor) -> Tensor:
    """The shard this rank stores (the tensor itself when it is not a DTensor)."""
    return t._local_tensor if is_dtensor(t) else t


def chain_is_elementwise(chain: Sequence[Transform]) -> bool:
    """Whether every transform any tensor passes through is element-wise."""
    return all(t.elementwise for path in chain_paths(chain) for t in path)


def chain_runs_on_rows(chain: Sequence[Transform]) -> bool:
    """Whether every transform is element-wise or runs on row shards (:class:`ShardedShape`),
    and at least one needs rows (not merely elements)."""
    kinds = [(t.elementwise, t.row_shardable) for path in chain_paths(chain) for t in path]
    return all(e or r for e, r in kinds) and any(r and not e for e, r in kinds)


def replicated_keys(chain: Sequence[Transform], keymap: dict[int, dict[str, str]]) -> set[str]:
    """State keys kept whole and identical on every rank (Dion's ``Q``)."""
    return {keymap.get(id(t), {}).get(n, n) for path in chain_paths(chain) for t in path
            for n in t.replicated_slots}


def sharded_shape(p: Tensor, name: str = "parameter") -> ShardedShape | torch.Size:
    """The :class:`ShardedShape` of a sharded parameter's local shard (its plain shape when it
    is not sharded or not split along one dimension)."""
    if not is_sharded(p):
        return local(p).shape
    try:
        lay = layout(p, name)
    except NotImplementedError:
        return local(p).shape
    return ShardedShape(local(p).shape, p.shape, lay.group, lay.dim)


# ---- element-wise groups: DTensor state, local views -------------------------------------
def local_state(st: dict[str, Any]) -> dict[str, Any]:
    """``st`` with each DTensor replaced by its local shard (what transforms read and update in
    place); :func:`store_local_state` puts what they changed back."""
    return {k: local(v) for k, v in st.items()}


def store_local_state(st: dict[str, Any], view: dict[str, Any], p: Tensor,
                      replicated: set[str] | frozenset[str] = frozenset()) -> None:
    """Write a local view back into the state of ``p``: a new tensor shaped like the local
    shard becomes a DTensor sharded like ``p`` (unless its key is ``replicated``: kept whole
    on every rank); everything else is stored as it is."""
    shape = local(p).shape
    for k in [k for k in st if k not in view]:
        del st[k]
    for k, v in view.items():
        held = st.get(k)
        if is_dtensor(held) and held._local_tensor is v:
            continue
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape == shape and k not in replicated:
            st[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
        else:
            st[k] = v


# ---- owner plan --------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    """How one parameter is split: along tensor dim ``dim`` over the ranks of ``group``."""

    group: Any
    dim: int
    world: int
    rank: int

    def sizes(self, length: int) -> list[int]:
        """Each rank's extent along ``dim`` (``torch.chunk``'s split, as FSDP2 uses)."""
        return chunk_sizes(length, self.world)


def layout(p: Tensor, name: str) -> ShardLayout:
    """The single-dimension sharding of ``p``, or a clear error for other layouts."""
    shards = [(i, pl) for i, pl in enumerate(p.placements) if not pl.is_replicate()]
    if len(shards) != 1 or not isinstance(shards[0][1], Shard) \
            or type(shards[0][1]) is not Shard:
        raise NotImplementedError(
            f"{name} is sharded as {p.placements}: methods that need whole tensors support "
            "parameters sharded along one mesh dimension (FSDP2's Shard(dim), HSDP); use an "
            "element-wise method or one mesh dimension of sharding for this parameter")
    i, pl = shards[0]
    mesh = p.device_mesh
    group = mesh.get_group(i)
    return ShardLayout(group, pl.dim, mesh.size(i), dist.get_rank(group))


class OwnerPlan:
    """Who steps which whole tensor, and the two all-to-alls around the step.

    Owners are assigned once for a list of parameters (every rank builds the same plan from
    the same global shapes): greedily, largest first, to the rank with the fewest elements so
    far. :meth:`gather` and :meth:`scatter` are collective: every rank calls them with the same
    parameters in the same order.
    """

    def __init__(self, params: Sequence[Tensor], names: Sequence[str],
                 bundles: Sequence[Any] | None = None) -> None:
        self.layouts = {id(p): layout(p, n) for p, n in zip(params, names)}
        self.owner: dict[int, int] = {}
        # parameters with the same bundle key (not None) get one owner: a group whose
        # statistics run over all its tensors
        units: dict[Any, list[Tensor]] = {}
        for i, p in enumerate(params):
            key = bundles[i] if bundles is not None and bundles[i] is not None else ("one", i)
            units.setdefault((self.layouts[id(p)].group, key), []).append(p)
        loads: dict[Any, list[int]] = {}
        order = sorted(units.values(), key=lambda ps: -sum(p.numel() for p in ps))
        for ps in order:
            lay = self.layouts[id(ps[0])]
            load = loads.setdefault(lay.group, [0] * lay.world)
            r = min(range(lay.world), key=lambda k: (load[k], k))
            load[r] += sum(p.numel() for p in ps)
            for p in ps:
                self.owner[id(p)] = r

    def owns(self, p: Tensor) -> bool:
        return self.owner[id(p)] == self.layouts[id(p)].rank

    @staticmethod
    def _groups(params: Iterable[Tensor], layouts: dict[int, ShardLayout]) -> dict[Any, list]:
        out: dict[Any, list[Tensor]] = {}
        for p in params:
            out.setdefault(layouts[id(p)].group, []).append(p)
        return out

    def gather(self, params: Sequence[Tensor], tensors: Sequence[Sequence[Tensor]]
               ) -> dict[int, list[Tensor]]:
        """Whole tensors on their owners: for each parameter ``params[i]`` and each list in
        ``tensors`` (e.g. the gradients, the parameters, in ``params``' order; DTensors or
        local shards), the owner gets the full tensor. Returns ``{id(p): [whole, ...]}`` for
        the parameters this rank owns."""
        result: dict[int, list[Tensor]] = {}
        index = {id(p): i for i, p in enumerate(params)}
        for pg, members in self._groups(params, self.layouts).items():
            lay = self.layouts[id(members[0])]
            dtype = _common_dtype([local(ts[index[id(p)]]) for ts in tensors for p in members])
            send: list[list[Tensor]] = [[] for _ in range(lay.world)]
            recv_sizes = [0] * lay.world
            for p in members:
                o = self.owner[id(p)]
                for ts in tensors:
                    send[o].append(local(ts[index[id(p)]]).reshape(-1).to(dtype))
                if o == lay.rank:
                    rest = p.numel() // p.shape[lay.dim] if p.shape[lay.dim] else 0
                    for r, n in enumerate(self.layouts[id(p)].sizes(p.shape[lay.dim])):
                        recv_sizes[r] += n * rest * len(tensors)
            device = local(tensors[0][index[id(members[0])]]).device
            outs = _all_to_all(send, recv_sizes, dtype, device, pg)
            offsets = [0] * lay.world
            for p in members:
                if self.owner[id(p)] != lay.rank:
                    continue
                sizes = lay.sizes(p.shape[lay.dim])
                wholes = []
                for ts in tensors:
                    parts = []
                    for r, n in enumerate(sizes):
                        shape = list(p.shape)
                        shape[lay.dim] = n
                        count = int(torch.Size(shape).numel())
                        parts.append(outs[r][offsets[r]:offsets[r] + count].view(shape))
                        offsets[r] += count
                    ref = local(ts[index[id(p)]])
                    wholes.append(torch.cat(parts, dim=lay.dim).to(ref.dtype))
                result[id(p)] = wholes
        return result

    def scatter(self, params: Sequence[Tensor], wholes: dict[int, Tensor]) -> None:
        """The owners' new whole values (``wholes[id(p)]``) written into every rank's shard of
        ``p``."""
        for pg, members in self._groups(params, self.layouts).items():
            lay = self.layouts[id(members[0])]
            dtype = _common_dtype([local(p) for p in members])
            device = local(members[0]).device
            send: list[list[Tensor]] = [[] for _ in range(lay.world)]
            recv_sizes = [0] * lay.world
            for p in members:
                o = self.owner[id(p)]
                if o == lay.rank:
                    sizes = lay.sizes(p.shape[lay.dim])
                    for r, part in enumerate(wholes[id(p)].split(sizes, dim=lay.dim)):
                        send[r].append(part.reshape(-1).to(dtype))
                recv_sizes[o] += local(p).numel()
            outs = _all_to_all(send, recv_sizes, dtype, device, pg)
            offsets = [0] * lay.world
            for p in members:
                o = self.owner[id(p)]
                shard = local(p)
                n = shard.numel()
                shard.copy_(outs[o][offsets[o]:offsets[o] + n].view(shard.shape))
                offsets[o] += n


def _all_to_all(send: list[list[Tensor]], recv_sizes: list[int], dtype: torch.dtype,
                device: torch.device, group: Any) -> list[Tensor]:
    """One ``all_to_all_single``: the flattened ``send[r]`` go to rank ``r``; returns what
    arrived from each rank (``recv_sizes[r]`` elements from rank ``r``)."""
    pieces = [t for s in send for t in s]
    flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(out, flat, recv_sizes, [sum(t.numel() for t in s) for s in send],
                           group=group)
    return list(out.split(recv_sizes))


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def sum_over_shards(values: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """Per-parameter partial sums (``values[i]`` over this rank's shard of ``params[i]``)
    completed over the ranks that hold the other shards (one all-reduce per process group;
    replicated parameters are left as they are)."""
    out = list(values)
    by_group: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        if is_sharded(p):
            by_group.setdefault(layout(p, "parameter").group, []).append(i)
    for pg, idx in by_group.items():
        flat = torch.stack([out[i].reshape(()) for i in idx])
        dist.all_reduce(flat, group=pg)
        for j, i in enumerate(idx):
            out[i] = flat[j]
    return out


__all__ = ["OwnerPlan", "ShardLayout", "ShardedShape", "all_reduce_sum", "chain_is_elementwise",
           "chain_runs_on_rows", "is_dtensor", "is_sharded", "local", "local_state",
           "replicated_keys", "shard_group", "sharded_shape", "store_local_state",
           "sum_over_shards", "whole_shape"]
