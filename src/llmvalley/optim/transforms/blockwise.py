"""FRUGAL's blockwise projector: whole tensors of a group take turns holding optimizer state.

FRUGAL (Zmushko et al., arXiv 2411.07837; the official code's ``BlockOptimizer``, which the
pretraining scripts run as ``--optimizer frugal``) splits a parameter group's tensors into an
*active* set, updated by a state-full method (Adam), and the rest, updated state-free
(signSGD). Every ``update_proj_gap`` steps the active set moves on: about
``round(n * density)`` whole tensors, picked by ``block_order``:

- ``"descending"``: from the last tensor backwards, wrapping around (the scripts' choice);
- ``"ascending"``: from the first tensor forwards, wrapping around;
- ``"mirror"``: pairs ``(j, n - 1 - j)`` from both ends inwards (an even count);
- ``"random"``: a random subset, from a per-group seed stream.

At each re-selection every tensor's Adam state is freed and the chosen tensors start from
zero moments, with the bias correction counting from the re-selection; so at any time only
the active tensors hold state, which is the paper's memory claim.

How it fits the declared-state model: :class:`BlockwiseTensors` is a combinator whose inner
slots (the Adam moments) are declared for a tensor only while it is active. The selection
lives in each tensor's float slots (``block_active``, ``block_step`` and the group's cursor
and seed, copied on every tensor, as DoG keeps its group sums), so it is checkpointed with the
state and resume is exact. :meth:`BlockwiseTensors.slots` cannot see that state, so the group
also carries the labels of the active tensors (``group["active_blocks"]``, refreshed at every
step, saved with the param groups); before the first step the initial selection is computed
from the group itself. That makes ``state_bytes`` exact at all times: the Adam state of the
active tensors only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.state import ABSMAX
from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform
from llmvalley.optim.transforms.combine import (
    Combinator,
    GroupView,
    chain_paths,
    chain_slots,
    run_chain,
)
from llmvalley.optim.transforms.projection import next_seed

Group = Mapping[str, Any]

BLOCK_ORDERS = ("descending", "ascending", "mirror", "random")
#: the group key holding the labels of the active tensors (see the module docstring)
ACTIVE_KEY = "active_blocks"
#: the shell's label of an unnamed parameter: ``group G param I (shape ...)``
_UNNAMED = re.compile(r"group \d+ param (\d+) \(shape .*\)")


def active_count(n: int, density: float) -> int:
    """How many of ``n`` tensors are active: ``round(n * density)``, as the reference (Python's
    rounding, half to even)."""
    return round(n * float(density))


@lru_cache(maxsize=256)
def select_blocks(order: str, n: int, k: int, cursor: int, seed: int
                  ) -> tuple[tuple[int, ...], int, int]:
    """One re-selection: the active positions among ``n`` tensors, the next cursor and seed.

    ``cursor`` is the reference's ``next_block_start`` (``-1`` before the first selection:
    0, or ``n - 1`` for ``"descending"``). ``"random"`` takes the first ``k`` entries of a
    permutation drawn by a CPU generator seeded with ``seed`` and advances the seed with
    :func:`~.projection.next_seed`; the other orders leave it alone.
    """
    if order == "random":
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=gen)[:k].tolist()
        return tuple(sorted(chosen)), cursor, next_seed(seed)
    if order == "ascending":
        start = 0 if cursor < 0 else cursor
        chosen = [(start + j) % n for j in range(k)]
        nxt = start + k
        return tuple(sorted(set(chosen))), nxt - n if nxt >= n else nxt, seed
    if order == "descending":
        start = n - 1 if cursor < 0 else cursor
        chosen = [(start - j) % n for j in range(k)]
        nxt = start - k
        return tuple(sorted(set(chosen))), nxt + n if nxt < 0 else nxt, seed
    if order == "mirror":
        half = n // 2
        start = 0 if cursor < 0 else cursor
        chosen = []
        for j in range(start, start + k // 2):
            chosen += [j % half, n - 1 - j % half]
        nxt = start + k // 2
        return tuple(sorted(set(chosen))), nxt - half if nxt >= half else nxt, seed
    raise ValueError(f"block_order must be one of {BLOCK_ORDERS}, got {order!r}")


def group_position(group: Group, name: str) -> int | None:
    """The position of the tensor labelled ``name`` among the group's non-empty tensors (as a
    step sees them when every tensor has a gradient), or None when the group does not say.

    The label is the shell's: ``"<param name> (shape ...)"``, or ``"group G param I (shape
    ...)"`` for unnamed parameters.
    """
    params = group.get("params") if isinstance(group, Mapping) else None
    if not params or not name:
        return None
    sized = [j for j, p in enumerate(params) if p.numel() > 0]
    names = group.get("param_names")
    if names:
        for pos, j in enumerate(sized):
            if j < len(names) and name == f"{names[j]} (shape {tuple(params[j].shape)})":
                return pos
        return None
    match = _UNNAMED.fullmatch(name)
    if match is None or int(match.group(1)) not in sized:
        return None
    return sized.index(int(match.group(1)))


def _writable(group: Group) -> dict[str, Any]:
    """The parameter group itself behind any alias views."""
    while isinstance(group, GroupView):
        group = group.group
    return group  # type: ignore[return-value]


class BlockwiseTensors(Combinator):
    """Run ``active`` on the group's active tensors and ``inactive`` on the others, moving the
    active set every ``update_proj_gap`` steps (FRUGAL's ``BlockOptimizer``).

    Schedule (the reference's): a re-selection happens at the first step and then whenever the
    group's step count since the last one (the freshest tensor's ``block_step``, the
    reference's first tensor's ``step``) is a multiple of ``update_proj_gap``: steps 1,
    1 + gap, ... Each one frees the state of every tensor's ``active`` chain, marks
    ``active_count(n, density)`` tensors active (:func:`select_blocks` by
    ``group["block_order"]``; ``"random"`` seeded from ``group["block_seed"]``) and restarts
    every tensor's ``block_step``. The ``active`` chain sees ``block_step`` (from 1) as the
    step count, so Adam's bias correction restarts. ``inactive=None`` gives the inactive
    tensors a zero direction (the reference's ``inactive_update_rule="no"``).

    State per tensor: the floats ``block_active`` (1 or 0), ``block_step``, and the group's
    ``block_cursor`` and ``block_rng`` (the seed of the next random draw), copied on every
    tensor; plus the ``active`` chain's slots while active. The whole group is needed to
    select (:attr:`whole_group`): sharded groups go to one owner rank.
    """

    slot_names = ("block_active", "block_step", "block_cursor", "block_rng")
    whole_group = True
    elementwise = False

    def __init__(self, active: list[Transform], inactive: list[Transform] | None,
                 *, order_key: str = "block_order", density_key: str = "density",
                 gap_key: str = "update_proj_gap", seed_key: str = "block_seed") -> None:
        self.active = list(active)
        self.inactive = None if inactive is None else list(inactive)
        self.order_key, self.density_key = order_key, density_key
        self.gap_key, self.seed_key = gap_key, seed_key

    # ---- declarations ------------------------------------------------------------------------
    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("block_active", None), SlotSpec("block_step", None, init=-1.0),
                SlotSpec("block_cursor", None, init=-1.0),
                SlotSpec("block_rng", None, init=-1.0)]

    def paths(self) -> list[list[Transform]]:
        rest = chain_paths(self.inactive) if self.inactive else [[]]
        return [[self, *p] for p in chain_paths(self.active) + rest]

    def is_active(self, group: Group, name: str) -> bool:
        """Whether the tensor labelled ``name`` holds the ``active`` chain's state: from the
        group's record of the active tensors, or before the first step, from the initial
        selection. A group that names no tensors (``spec.state_numel``) gets the state of an
        active tensor."""
        record = group.get(ACTIVE_KEY) if isinstance(group, Mapping) else None
        if record is not None:
            return name in record
        if not (isinstance(group, Mapping) and group.get("params")):
            return True
        pos = group_position(group, name)
        if pos is None:
            return False  # unknown: created at the step that activates it, if any
        n = sum(1 for p in group["params"] if p.numel() > 0)
        chosen, _, _ = select_blocks(group[self.order_key], n,
                                     active_count(n, group[self.density_key]), -1,
                                     int(group[self.seed_key]))
        return pos in chosen

    def inner_slots(self, shape, group, name=""):
        if self.is_active(group, name):
            return chain_slots(self.active, shape, group, name)
        return chain_slots(self.inactive, shape, group, name) if self.inactive else []

    # ---- the step ----------------------------------------------------------------------------
    def _active_keys(self, ctx: StepContext) -> list[str]:
        """Every state key the ``active`` chain may hold (what a re-selection frees)."""
        keys = []
        for path in chain_paths(self.active):
            for t in path:
                own = ctx.keymap.get(id(t), {})
                keys += [own.get(s, s) for s in t.slot_names]
        return keys

    def _reselect(self, ctx: StepContext, j: int) -> None:
        """Free every tensor's active state and choose the next active set (``j``: the tensor
        whose copy of the group's cursor and seed is the freshest)."""
        n = len(ctx.grads)
        cursor = int(ctx.scalar("block_cursor", j))
        seed = int(ctx.scalar("block_rng", j))
        if seed < 0:
            seed = int(ctx.hp(self.seed_key))
        chosen, cursor, seed = select_blocks(str(ctx.hp(self.order_key)), n,
                                             active_count(n, ctx.hp(self.density_key)),
                                             cursor, seed)
        keys = self._active_keys(ctx)
        for i, st in enumerate(ctx.states):
            for key in keys:
                st.pop(key, None)
                st.pop(key + ABSMAX, None)
            ctx.set_scalar("block_active", i, 1.0 if i in chosen else 0.0)
            ctx.set_scalar("block_step", i, 0)
            ctx.set_scalar("block_cursor", i, cursor)
            ctx.set_scalar("block_rng", i, seed)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        n = len(updates)
        gap = int(ctx.hp(self.gap_key))
        j = max(range(n), key=ctx.steps.__getitem__)
        since = int(ctx.scalar("block_step", j))
        if since < 0 or since % gap == 0:
            self._reselect(ctx, j)
        steps = []
        for i in range(n):
            t = int(ctx.scalar("block_step", i)) + 1
            ctx.set_scalar("block_step", i, t)
            steps.append(t)
        active = [i for i in range(n) if ctx.scalar("block_active", i)]
        if ctx.names:
            record = tuple(ctx.names[i] for i in active)
            group = _writable(ctx.group)
            if group.get(ACTIVE_KEY) != record:
                group[ACTIVE_KEY] = record
        out: list[Tensor | None] = [None] * n
        rest = [i for i in range(n) if i not in set(active)]
        for chain, idx in ((self.active, active), (self.inactive, rest)):
            if not idx:
                continue
            if chain is None:
                for i in idx:
                    out[i] = torch.zeros_like(updates[i])
                continue
            sub = ctx.subset(idx, steps=[steps[i] for i in idx])
            res = run_chain(chain, sub, [updates[i] for i in idx], ctx.keymap)
            ctx.plan.put(idx, sub.plan)
            for k, i in enumerate(idx):
                out[i] = res[k]
        return out  # type: ignore[return-value]
