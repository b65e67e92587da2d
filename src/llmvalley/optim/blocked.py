"""Cache-blocked eager steps: ``implementation="auto"`` on CPU runs a chain in blocks of
about :data:`BLOCK_NUMEL` elements.

On a CPU a ``torch._foreach_*`` call is a loop of one kernel per tensor, and each kernel
streams its whole tensor: a chain of ten calls over a group larger than the caches reads
and writes every parameter-sized tensor from memory ten times. Run block by block (the
whole chain and the parameter write on some tensors, then on the next ones), every call
after the first finds its operands in the cache. Each element sees the same operations in
the same order, so the results are the foreach tier's bit for bit (tested for every
recipe); the gain is up to 2.9x on one core (``benchmarks/results/blocked_step_cpu.md``).
Other devices run the foreach tier as it is: their kernels are not cache-bound, and more
launches would cost.

Two kinds of blocks:

- *split*, for element-wise chains (every transform any tensor passes through is
  element-wise): large tensors are cut along their first dimension into row ranges, small
  ones packed together. A block keeps each tensor's rank, and the context keeps each
  tensor's full shape and name (routing by shape or name, as partitions do, is unchanged);
- *whole tensors*, for chains whose transforms reduce over each tensor (AdamP's cosine
  test, caution's mask mean, Adafactor's factors, norms) but never across tensors: every
  transform is element-wise or declares :attr:`~.Transform.per_tensor`, and none has
  statistics over the group (:attr:`~.Transform.whole_group`) or over every group
  (:attr:`~.Transform.shared_stats`). Tensors are packed in order, one block per tensor
  beyond :data:`BLOCK_NUMEL`: the gain comes from tensors smaller than the caches. Matrix
  methods (orthogonalization, Kronecker and subspace preconditioners) do not declare
  ``per_tensor``: their cost is matrix products, and they batch same-shape matrices.

Methods whose step size comes from sums over every group (Prodigy, D-Adapt Adam: a
transform with :attr:`~.Transform.shared_stats` and :attr:`~.Transform.compiled_gather`)
step in two passes: the gathering pass runs over each group as before (its sums keep their
order, so the step size keeps its bits), and the second pass (the moments' direction and
the parameter write, from the shared-stats transform on) runs in blocks of whole tensors
when everything after that transform is element-wise or per-tensor. Its prelude (which
advances Prodigy's ``d``) runs once before the blocks (:func:`blocked_step` given the
updates; Prodigy's
eager step 0.82-0.95x, ``benchmarks/results/blocked_step_cpu.md``).

A step is blocked when all of these hold (otherwise it runs the foreach chain):

- the device is a CPU, the parameters are not sharded and the step is not being traced;
- the chain compiles as one segment (:func:`~llmvalley.optim.auto_tier.compiles_whole`):
  Python-float state is advanced only in preludes, which run once for the whole group
  before the blocks;
- the state already exists (not the first step), and every slot of a tensor that is split
  has the parameter's shape and compute dtype (not 8-/4-bit, no other storage dtype);
- the group holds at least two blocks' worth of elements.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import StepContext, Transform, numel
from llmvalley.optim.transforms.combine import (
    KeyMap,
    call_bound,
    chain_paths,
    chain_slots,
    run_chain,
)

#: elements per block (2 MiB of float32 per operand): 2^18 to 2^20 ran within a few percent
#: of each other on this project's EPYC machines (1 and 2 threads, 3.7M and 45M parameters;
#: ``benchmarks/results/blocked_step_cpu.md``), 2^17 lost to the per-block Python overhead
BLOCK_NUMEL = 1 << 19

#: a block: ``(tensor index, first row, rows)``; ``rows`` is None for the whole tensor
Piece = tuple[int, int, int | None]


def layout(shapes: list[tuple[int, ...]], block: int | None = None,
           split: bool = True) -> list[list[Piece]]:
    """The blocks of a group with these shapes: large tensors cut into row ranges of about
    ``block`` elements (default :data:`BLOCK_NUMEL`; with ``split=False`` kept whole), small
    ones whole, packed in order until a block is full. A row (or, unsplit, a tensor) larger
    than a block is a block of its own."""
    block = block or BLOCK_NUMEL
    blocks: list[list[Piece]] = []
    current: list[Piece] = []
    filled = 0
    for i, shape in enumerate(shapes):
        n = numel(shape)
        if n <= block or len(shape) == 0 or not split:
            pieces: list[tuple[Piece, int]] = [((i, 0, None), n)]
        else:
            row = n // shape[0]
            rows = max(1, block // row)
            pieces = [((i, r, min(rows, shape[0] - r)), min(rows, shape[0] - r) * row)
                      for r in range(0, shape[0], rows)]
        for piece, size in pieces:
            if current and filled + size > block:
                blocks.append(current)
                current, filled = [], 0
            current.append(piece)
            filled += size
    if current:
        blocks.append(current)
    return blocks


def block_kind(chain: list[Transform], group: Mapping[str, Any], ctx: StepContext,
               elementwise: bool) -> str | None:
    """``"split"``, ``"whole"`` or None (not blocked): the static conditions (module
    docstring), checked once per chain and shape set."""
    from llmvalley.optim.auto_tier import compiles_whole

    if not compiles_whole(chain, group, ctx):
        return None
    if not elementwise:
        alone = all((t.elementwise or t.per_tensor) and not (t.whole_group or t.shared_stats)
                    for path in chain_paths(chain) for t in path)
        return "whole" if alone else None
    for i, shape in enumerate(ctx.shapes):
        for _, slot in chain_slots(chain, shape, group, ctx.name(i)):
            if slot.shape is not None and tuple(slot.shape) != tuple(shape):
                return None
    return "split"


def _state_fits(ctx: StepContext, blocks: list[list[Piece]]) -> bool:
    """The per-step conditions: no state was created this step, and each split tensor's
    state holds only tensors of its shape and compute dtype."""
    if ctx.created:
        return False
    split = {i for b in blocks for i, _, rows in b if rows is not None}
    for i in split:
        shape, dtype = ctx.params[i].shape, ctx.dtypes[i]
        for v in ctx.states[i].values():
            if isinstance(v, Tensor) and (v.shape != shape or v.dtype != dtype):
                return False
    return True


def _block_context(ctx: StepContext, pieces: list[Piece],
                   preludes: dict[int, dict[str, list[Any]]]) -> StepContext:
    """The context of one block: row views of the tensors (and of their state), each
    tensor's own step, name, full shape and plan entries."""
    def cut(t: Tensor, first: int, rows: int | None) -> Tensor:
        return t if rows is None else t.narrow(0, first, rows)

    owners = [i for i, _, _ in pieces]
    states = []
    for i, first, rows in pieces:
        st = ctx.states[i]
        states.append(st if rows is None else
                      {k: cut(v, first, rows) if isinstance(v, Tensor) else v
                       for k, v in st.items()})
    sub = copy.copy(ctx)  # cheaper than dataclasses.replace, which re-runs __post_init__
    sub.params = [cut(ctx.params[i], f, r) for i, f, r in pieces]
    sub.grads = [cut(ctx.grads[i], f, r) for i, f, r in pieces]
    sub.states = states
    sub.steps = [ctx.steps[i] for i in owners]
    sub.names = [ctx.names[i] for i in owners] if ctx.names else []
    sub.shapes = [ctx.shapes[i] for i in owners]
    sub.dtypes = [ctx.dtypes[i] for i in owners]
    sub.plan = ctx.plan.take(owners)
    sub.positions = [ctx.positions[i] for i in owners]
    sub.preludes = {k: {name: [row[i] for i in owners] for name, row in values.items()}
                    for k, values in preludes.items()} or None
    sub.created, sub._loaded = set(), []
    return sub


def blocked_step(chain: list[Transform], keys: KeyMap, ctx: StepContext,
                 blocks: list[list[Piece]], lr: float, form: str, scaled: bool,
                 updates: list[Tensor] | None = None) -> bool:
    """Run ``chain`` and the parameter write on ``ctx`` block by block; False (nothing done)
    when this step's state does not allow it (:func:`_state_fits`). The chain's input is the
    gradients, or ``updates`` (blocks of whole tensors only): the second pass of a
    shared-statistics step, ``chain`` from the shared-stats transform on, ``ctx.totals``
    set. The preludes, which advance the float state (Prodigy's ``d``), run once before."""
    from llmvalley.optim.compiled import has_prelude
    from llmvalley.optim.shell import apply_step

    if not _state_fits(ctx, blocks):
        return False
    preludes = {id(t): call_bound(t, ctx, keys, t.prelude) for t in chain if has_prelude(t)}
    for pieces in blocks:
        sub = _block_context(ctx, pieces, preludes)
        inputs = sub.grads if updates is None else [updates[i] for i, _, _ in pieces]
        apply_step(sub.params, run_chain(chain, sub, inputs, keys), sub.plan, lr, form,
                   scaled)
    return True


def finish_blocks(chain: list[Transform], barrier: int) -> bool:
    """Whether the second pass of a shared-statistics chain (``chain[barrier:]``, run once
    the sums are known) can run in blocks of whole tensors: the shared-stats transform
    computes its numbers in preludes (:attr:`~.Transform.compiled_gather`: its ``__call__``
    is tensor work alone), and everything after it works on each tensor alone."""
    head = chain[barrier]
    return head.compiled_gather and all(
        t is head or ((t.elementwise or t.per_tensor) and not (t.whole_group or t.shared_stats))
        for path in chain_paths(chain[barrier:]) for t in path)


def eligible_device(params: list[Tensor]) -> bool:
    """CPU tensors, not being traced by ``torch.compile``."""
    return params[0].device.type == "cpu" and not torch.compiler.is_compiling()


__all__ = ["BLOCK_NUMEL", "block_kind", "blocked_step", "eligible_device", "finish_blocks",
           "layout"]
