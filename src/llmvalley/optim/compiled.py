"""The compiled execution tier: ``implementation="compiled"``.

A group's step (its transform chain and the parameter write) is compiled with
``torch.compile`` (inductor) into a few kernels, instead of one pass over memory per
``torch._foreach_*`` call of the foreach tier. It computes the foreach tier's math; results
agree to float rounding (inductor fuses and reorders element-wise arithmetic).

What is compiled, and what is not:

- the first step of a group (state being created, first-step initialisation), and any step
  where the shell has just created state, runs eagerly (the foreach code);
- every later step runs the chain as *segments*: maximal runs of top-level transforms that
  compile, each one compiled function, with the parameter write folded into the last one.
  A top-level transform (a combinator with all it contains) runs eagerly between segments
  when it keeps Python-float state (a slot of shape ``None``: schedule-free's weight sum,
  Prodigy's ``d``: their values change every step and would recompile) that it does not
  compute in a :meth:`~llmvalley.optim.transforms.base.Transform.prelude` (NAdam and LaProp
  do: their preludes run eagerly before the kernel, which gets the numbers as 0-d tensors),
  has statistics shared over groups, or sets ``compiled = False`` (a class attribute a
  transform may declare). A
  chain without such a transform is one compiled function;
- inside a segment, what dynamo cannot trace (a host sync such as ``.item()``, a random
  generator) is a graph break. One inside the chain's loop makes dynamo run the loop eagerly
  and compile each transform apart (:func:`compile_stats` counts the graphs), so the
  transforms avoid them: 0-d tensor numbers are added with ``add_each_``/``add_scaled_``,
  never through ``torch._foreach_add_`` (which reads them with ``.item()``), and sizes come
  from ``ctx.shapes``; Shampoo's and ASGO's host checks of a factor before its
  decomposition are the deliberate exceptions;
- groups with statistics shared over every group run in the shell's two passes. Where the
  shared transform declares ``compiled_gather`` (Prodigy, D-Adapt Adam) both passes compile:
  the chain up to it with its ``gather`` (:func:`compiled_gather`), then, once the sums over
  every group are known (one host sync per sum and step), the rest with the write
  (:func:`compiled_finish`); their float state (``d``) is read in a ``gather_prelude`` and
  advanced in the ``prelude``, eagerly, and reaches the kernels as 0-d tensors. Otherwise
  (MoMo, Ranger21's stable weight decay) the chain runs eagerly and only the parameter write
  is compiled;
- a group holding a 0-d float64 CPU tensor runs eagerly: inductor (torch 2.13, CPU) drops
  in-place updates of 0-d float64 inputs (:func:`_zero_dim_float64_cpu`);
- 8-/4-bit slots (``state_precision="int8"/"int4"``, adamw8bit, adamw4bit) are decoded before
  the compiled segments and encoded after them by the codec's own compiled kernels
  (``Codec(compiled=True)``: the eager codec's bits), so the graphs see plain compute-dtype
  state; bfloat16 slots (``state_dtype``) are widened and stored inside the graphs, their
  stochastic rounding's noise hashed there from the foreach tier's seed, passed in as a 0-d
  tensor (the same bits).

Recompilation: one compilation per chain, dtype and shape set. Step counts (``ctx.steps``,
the state's ``step``) are symbolic integers from the first compilation, so the next step does
not recompile; the learning rate reaches the parameter write as a 0-d tensor, so an LR
schedule does not recompile a chain that does not read ``lr`` itself. Other hyperparameters
are Python floats that dynamo specialises (``torch._foreach_*`` scalar arguments cannot be
symbolic in torch 2.13): changing one recompiles that segment once per new value, up to
dynamo's ``recompile_limit`` per segment (then the segment runs eagerly, still exact).
Chains that read ``lr`` inside a compiled segment (MoMo, Ranger21 and a few others)
recompile on an lr change for the same reason; schedule-free, LaProp, Prodigy and D-Adapt
Adam read it in their preludes, so they do not.

Step powers: a bias correction ``1 - beta**t`` of the symbolic step would be a ``pow``
evaluated inside the kernel's loop, once per vector of elements (on CPU that made the compiled
Adam step 2.8x slower than with the powers precomputed). Transforms therefore read them through
:meth:`~llmvalley.optim.transforms.base.StepContext.powers`: an eager step records the bases a
chain asks for (the first step of a group, and the first after a process starts or loads a
state dict), and every compiled step gets ``base**t`` as 0-d float64 tensors computed before
the kernel runs, which the kernel loads once.

Compile time is measured: ``optimizer.compile_seconds`` (set after the first compiled step)
and :func:`compile_stats`.
"""

from __future__ import annotations

import itertools
import time
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.options import chain_and_keys
from llmvalley.optim.state import ABSMAX, QUANTIZED, SR_SEED
from llmvalley.optim.transforms.base import (
    PowerTable,
    StepContext,
    StepPlan,
    Transform,
    prelude_key,
)
from llmvalley.optim.transforms.combine import KeyMap, call_bound, chain_slots, run_chain
from llmvalley.optim.transforms.orthogonalize import matrix_view
from llmvalley.optim.transforms.stored import device_number

#: integer sources dynamo treats as symbolic from the first compilation (step counts), so
#: that the next step reuses the graph (``torch.compiler.config.dynamic_sources`` syntax)
STEP_SOURCES = r".*(steps('\])?\[\d+\]|\['step'\]|\.step)$"


@dataclass
class CompileStats:
    """What the compiled tier has compiled for one optimizer."""

    #: wall seconds of the calls that compiled (tracing and code generation; the step they
    #: also ran is a negligible part)
    seconds: float = 0.0
    #: graphs compiled (one per segment and dtype/shape set; more after a graph break or a
    #: recompilation)
    graphs: int = 0
    #: compiled functions created (segments over all groups, dtypes and shapes)
    functions: int = 0
    #: how each recipe's chain runs: recipe name (``"write"`` for a write alone) -> the
    #: distinct layouts of its groups, each a list of ("compiled" | "eager", transform names)
    segments: dict[str, list[list[tuple[str, tuple[str, ...]]]]] = field(default_factory=dict)


@dataclass
class _Segment:
    compiled: bool
    transforms: tuple[Transform, ...]
    write: bool = False
    fn: Callable[..., Any] | None = None


_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: numbers the compiled functions' code objects (:func:`_fresh_copy`)
_SEGMENT_IDS = itertools.count()
_ENTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: per optimizer and :func:`_key`: the bases of :meth:`StepContext.powers` its chain reads
_BASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_stats(optimizer: Any) -> CompileStats:
    """The compile statistics of ``optimizer`` (zeros before its first compiled step)."""
    stats = _STATS.get(optimizer)
    if stats is None:
        stats = _STATS[optimizer] = CompileStats()
    return stats


def compiled_step(optimizer: Any, group: Mapping[str, Any], ctx: StepContext,
                  working: list[Tensor]) -> None:
    """The compiled tier's step of one group: its chain and the parameter write on
    ``working`` (the shell writes them back to the parameters)."""
    spec = optimizer.spec(group)
    chain, keys = chain_and_keys(spec, group)
    decay = spec.decay_for(group)
    form, scaled = decay.form, decay.scaled(group)
    key = _key(spec.name, chain, ctx)
    bases = _BASES.setdefault(optimizer, {})
    if ctx.created or key not in bases:
        # state was just created (first-step initialisation runs eagerly), or this process
        # has not yet seen the chain run: an eager step, recording the powers it reads
        from llmvalley.optim.shell import apply_step

        recorder = ctx.power_table = _PowerRecorder()
        directions = run_chain(chain, ctx, ctx.grads, keys)
        ctx.power_table = None
        apply_step(working, directions, ctx.plan, float(group["lr"]), form, scaled)
        bases[key] = frozenset(recorder.bases)
        return
    segments = _segments(optimizer, key, spec.name, chain, group, ctx, write=True)
    held: list[_Held] = []
    done = False
    try:
        _unpack_stored(chain, keys, group, ctx, held)
        _run(optimizer, segments, keys, ctx, ctx.grads, working, group, form, scaled,
             bases[key])
        done = True
    finally:
        _repack_stored(ctx, held, done)


def shared_compiles(chain: Sequence[Transform], barrier: int, group: Mapping[str, Any],
                    ctx: StepContext) -> bool:
    """Whether the compiled tier compiles both passes of a shared-statistics group (the
    transforms before ``chain[barrier]`` and its :meth:`~.Transform.gather`, then the rest
    and the write): every top-level transform compiles and the barrier declares
    :attr:`~.Transform.compiled_gather`. Otherwise the chain runs eagerly and only the write
    is compiled (MoMo, Ranger21's stable weight decay)."""
    from llmvalley.optim.auto_tier import compiles_whole

    return chain[barrier].compiled_gather and compiles_whole(list(chain), group, ctx)


def compiled_gather(optimizer: Any, group: Mapping[str, Any], ctx: StepContext,
                    barrier: int) -> tuple[list[Tensor], dict[str, Any]]:
    """The first pass of a shared-statistics group on the compiled tier: the chain up to
    ``chain[barrier]`` and that transform's :meth:`~.Transform.gather`, compiled as one
    function (its float inputs from :meth:`~.Transform.gather_prelude`, run eagerly first).
    Returns the updates that reach the barrier and the group's sums (0-d tensors). The group's
    first step, and the first this process sees, run eagerly, recording the step powers both
    passes read (:func:`compiled_finish` completes the record)."""
    spec = optimizer.spec(group)
    chain, keys = chain_and_keys(spec, group)
    key = _key(spec.name, chain, ctx)
    bases = _BASES.setdefault(optimizer, {})
    t = chain[barrier]
    if ctx.created or key not in bases:
        recorder = ctx.power_table = _PowerRecorder()
        updates = run_chain(chain[:barrier], ctx, ctx.grads, keys)
        part = call_bound(t, ctx, keys, t.gather, updates)
        ctx.power_table = None
        ctx.stash[_RECORDER] = recorder
        return updates, part
    fns = _ENTRIES.setdefault(optimizer, {})
    fkey = (*key, "gather")
    stats = compile_stats(optimizer)
    if fkey not in fns:
        stats.functions += 1
        fns[fkey] = torch.compile(_fresh_copy(_gather_step, f"{spec.name}_{stats.functions}"),
                                  backend=_counting_backend(stats))
        layout = [("compiled", (*(type(x).__name__ for x in chain[:barrier]),
                                f"{type(t).__name__}.gather"))]
        if layout not in stats.segments.setdefault(spec.name, []):
            stats.segments[spec.name].append(layout)
    device = ctx.grads[0].device
    steps = list(ctx.steps)
    ctx.power_table = _power_table(bases[key], steps, device)
    ctx.preludes = _preludes(chain[:barrier], ctx, keys, device) or {}
    ctx.preludes.update(_preludes([t], ctx, keys, device, gather=True) or {})
    try:
        return _timed_call(optimizer, fns[fkey], tuple(chain[:barrier]), t, keys, ctx,
                           ctx.grads, steps)
    finally:
        ctx.power_table = ctx.preludes = None


def _gather_step(transforms: tuple[Transform, ...], barrier: Transform, keys: KeyMap,
                 ctx: StepContext, updates: list[Tensor], steps: list[int]
                 ) -> tuple[list[Tensor], dict[str, Any]]:
    """What :func:`compiled_gather` compiles."""
    ctx.steps = steps  # the symbolic step counts (STEP_SOURCES)
    updates = run_chain(transforms, ctx, updates, keys)
    return updates, call_bound(barrier, ctx, keys, barrier.gather, updates)


def compiled_finish(optimizer: Any, group: Mapping[str, Any], ctx: StepContext,
                    barrier: int, updates: list[Tensor], working: list[Tensor]) -> None:
    """The second pass of a shared-statistics group on the compiled tier (``ctx.totals``
    set): the chain from ``chain[barrier]`` on (its :meth:`~.Transform.prelude`, which reads
    the totals, runs eagerly first) and the parameter write, compiled as one function."""
    spec = optimizer.spec(group)
    chain, keys = chain_and_keys(spec, group)
    decay = spec.decay_for(group)
    form, scaled = decay.form, decay.scaled(group)
    key = _key(spec.name, chain, ctx)
    recorder = ctx.stash.pop(_RECORDER, None)
    if recorder is not None:  # the eager step that records the powers
        from llmvalley.optim.shell import apply_step

        ctx.power_table = recorder
        directions = run_chain(chain[barrier:], ctx, updates, keys)
        ctx.power_table = None
        apply_step(working, directions, ctx.plan, float(group["lr"]), form, scaled)
        _BASES.setdefault(optimizer, {})[key] = frozenset(recorder.bases)
        return
    segments = _segments(optimizer, (*key, "finish"), spec.name, chain[barrier:], group, ctx,
                         write=True)
    _run(optimizer, segments, keys, ctx, updates, working, group, form, scaled,
         _BASES[optimizer][key])


#: where :func:`compiled_gather` leaves its power recorder for :func:`compiled_finish`
_RECORDER = "compiled_power_recorder"


#: a slot prepared for a compiled step: its state dict, key, slot spec, codes and block scales
#: (an 8-/4-bit slot), or the key of a bfloat16 slot's rounding seed and None
_Held = tuple[dict[str, Any], str, Any, Tensor, Tensor | None]


#: the stored forms :func:`_unpack_stored` prepares
_PREPARED = (*QUANTIZED, "bf16")


def _unpack_stored(chain: Sequence[Transform], keys: KeyMap, group: Mapping[str, Any],
                   ctx: StepContext, held: list[_Held]) -> None:
    """Prepare the group's slots stored in another form than the compute dtype, before the
    compiled segments run.

    8-/4-bit codes are decoded in place of their stored tensors, so that the traced code sees
    plain compute-dtype state and updates it in place; they are encoded after the segments.
    Traced inside them, the codec's table lookups broke the graphs and hit dynamo's
    recompile limit. The codec's own compiled kernels (``Codec(compiled=True)``,
    bit-identical to the eager codec) do the decoding and encoding.

    bfloat16 slots (``state_dtype``) stay in the graph, widened and stored there, their
    stochastic rounding's noise hashed there (:func:`~llmvalley.optim.quantize.bf16_noise`);
    their seeds, the foreach tier's, are put in the state here as 0-d tensors
    (:meth:`~llmvalley.optim.state.Codec.stage_seed`): a seed formatted from the symbolic step broke
    the graph inside the chain's loop, which sends the whole segment to eager. float16 slots
    need nothing (round to nearest traces).

    Appends to ``held`` what :func:`_repack_stored` needs, slot by slot (so that a failure
    part-way can be undone)."""
    codec = ctx.codec
    if codec.default not in _PREPARED and not any(v in _PREPARED
                                                  for v in codec.by_slot.values()):
        return  # no 8-/4-bit or bf16 slot (loaded ones were converted to the group's form)
    for i, st in enumerate(ctx.states):
        compute = ctx.dtypes[i]
        quantized = any(k.endswith(ABSMAX) for k in st)
        low = any(isinstance(v, Tensor) and v.dtype == torch.bfloat16 != compute
                  and v.ndim > 0 for v in st.values())
        if not quantized and not low:
            continue
        for owner, slot in chain_slots(chain, ctx.shapes[i], group, ctx.name(i)):
            key = keys.get(id(owner), {}).get(slot.name, slot.name)
            if slot.shape is None or key not in st:
                continue
            stored = st[key]
            if key + ABSMAX in st:
                codec.compiled = True
                value, _ = codec.load(st, key, slot, compute)
                held.append((st, key, slot, stored, st.pop(key + ABSMAX)))
                st[key] = value
            elif stored.dtype == torch.bfloat16 != compute:
                codec.stage_seed(st, key, slot)
                held.append((st, key + SR_SEED, slot, stored, None))


def _repack_stored(ctx: StepContext, held: list[_Held], done: bool) -> None:
    """Encode the 8-/4-bit slots :func:`_unpack_stored` decoded (after a step that did not
    finish, put the old codes back unchanged), and drop the bfloat16 slots' seeds."""
    for st, key, slot, stored, absmax in held:
        if absmax is None:
            st.pop(key, None)  # a slot's rounding seed
            continue
        value = st[key]
        st[key], st[key + ABSMAX] = stored, absmax
        if done:
            ctx.codec.store(st, key, slot, value)


def compiled_apply(optimizer: Any, group: Mapping[str, Any], ctx: StepContext,
                   working: list[Tensor], directions: list[Tensor]) -> None:
    """The parameter write alone, compiled (groups whose chain ran eagerly: shared
    statistics)."""
    decay = optimizer.spec(group).decay_for(group)
    if ctx.created:
        from llmvalley.optim.shell import apply_step

        apply_step(working, directions, ctx.plan, float(group["lr"]), decay.form,
                   decay.scaled(group))
        return
    segments = _segments(optimizer, _key("write", (), ctx), "write", (), group, ctx,
                         write=True)
    _run(optimizer, segments, {}, ctx, directions, working, group, decay.form,
         decay.scaled(group))


def _run(optimizer: Any, segments: list[_Segment], keys: KeyMap, ctx: StepContext,
         updates: list[Tensor], working: list[Tensor], group: Mapping[str, Any], form: str,
         scaled: bool, bases: frozenset[float] = frozenset()) -> None:
    device = working[0].device
    lr = device_number(float(group["lr"]), device)
    steps = list(ctx.steps)
    powers = _power_table(bases, steps, device)
    for seg in segments:
        if not seg.compiled:
            updates = run_chain(seg.transforms, ctx, updates, keys)
            if seg.write:
                from llmvalley.optim.shell import apply_step

                apply_step(working, updates, ctx.plan, float(group["lr"]), form, scaled)
            continue
        assert seg.fn is not None
        ctx.power_table = powers
        ctx.preludes = _preludes(seg.transforms, ctx, keys, device)
        updates = _timed_call(optimizer, seg.fn, seg.transforms, keys, ctx, updates, steps,
                              working, lr, form, scaled, seg.write)
        ctx.power_table = ctx.preludes = None


def _timed_call(optimizer: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, a compiled function, with the step counts symbolic; the call's time
    goes to the compile statistics when it compiled a graph."""
    stats = compile_stats(optimizer)
    before, start = stats.graphs, time.perf_counter()
    with torch.compiler.config.patch(dynamic_sources=STEP_SOURCES):
        out = fn(*args)
    if stats.graphs != before:
        stats.seconds += time.perf_counter() - start
        optimizer.compile_seconds = stats.seconds
    return out


def _key(name: str, chain: Sequence[Transform], ctx: StepContext) -> tuple[Any, ...]:
    """What the compiled code of a group depends on: its chain, dtypes and shapes."""
    return name, id(chain), tuple(ctx.dtypes), tuple(ctx.shapes), ctx.grads[0].device


class _PowerRecorder:
    """Stands in for :attr:`StepContext.power_table` in an eager step: records the bases
    :meth:`StepContext.powers` is asked for, and lets it compute the floats."""

    def __init__(self) -> None:
        self.bases: set[float] = set()

    def lookup(self, base: float, steps: list[Any]) -> None:
        self.bases.add(base)


def _power_table(bases: frozenset[float], steps: list[int], device: torch.device) -> PowerTable:
    """``base**t`` for each recorded base and each tensor's step, as 0-d float64 tensors
    computed here, outside the kernel: a power of the symbolic step count inside the graph
    would be evaluated in the kernel's loop, once per vector of elements (which made the
    compiled Adam step 2.8x slower on CPU). Tensors at the same step share one tensor."""
    table: dict[float, list[Tensor]] = {}
    for base in bases:
        made: dict[int, Tensor] = {}
        for t in steps:
            if t not in made:
                made[t] = device_number(base**t, device)
        table[base] = [made[t] for t in steps]
    return PowerTable(steps, table)


def has_prelude(t: Transform, gather: bool = False) -> bool:
    """Whether ``t`` computes per-step numbers from float state in a
    :meth:`~llmvalley.optim.transforms.base.Transform.prelude` (``gather``: in a
    :meth:`~llmvalley.optim.transforms.base.Transform.gather_prelude`)."""
    if gather:
        return type(t).gather_prelude is not Transform.gather_prelude
    return type(t).prelude is not Transform.prelude


def _preludes(transforms: Sequence[Transform], ctx: StepContext, keys: KeyMap,
              device: torch.device, gather: bool = False) -> dict[Any, dict[str, list[Any]]] | None:
    """The preludes of a compiled segment's transforms (``gather``: their gather preludes),
    run eagerly now (advancing their float state), floats as 0-d float64 tensors (equal
    values share one; other values, such as flags, stay Python values)."""
    out: dict[Any, dict[str, list[Any]]] = {}
    for t in transforms:
        if not has_prelude(t, gather):
            continue
        values = call_bound(t, ctx, keys, t.gather_prelude if gather else t.prelude)
        made: dict[float, Tensor] = {}
        for name, items in values.items():
            row = []
            for v in items:
                if type(v) is float:
                    if v not in made:
                        made[v] = device_number(v, device)
                    v = made[v]
                row.append(v)
            values[name] = row
        out[prelude_key(t, gather)] = values
    return out or None


def _segments(optimizer: Any, key: tuple[Any, ...], name: str, chain: Sequence[Transform],
              group: Mapping[str, Any], ctx: StepContext, write: bool) -> list[_Segment]:
    """The segments of ``chain`` for these tensors (cached per :func:`_key`)."""
    entries = _ENTRIES.setdefault(optimizer, {})
    if key in entries:
        return entries[key]
    stats = compile_stats(optimizer)
    segments: list[_Segment] = []
    unsafe = _zero_dim_float64_cpu(ctx)
    for t in chain:
        ok = not unsafe and _compilable(t, group, ctx)
        if segments and segments[-1].compiled == ok:
            segments[-1].transforms += (t,)
        else:
            segments.append(_Segment(ok, (t,)))
    if write:
        if not segments or segments[-1].compiled == unsafe:
            segments.append(_Segment(not unsafe, ()))
        segments[-1].write = True
    for seg in segments:
        if seg.compiled:
            stats.functions += 1
            seg.fn = torch.compile(_fresh_copy(_segment_step, f"{name}_{stats.functions}"),
                                   backend=_counting_backend(stats))
    layout = [("compiled" if s.compiled else "eager",
               tuple(type(t).__name__ for t in s.transforms) + (("write",) if s.write else ()))
              for s in segments]
    if layout not in stats.segments.setdefault(name, []):
        stats.segments[name].append(layout)
    entries[key] = segments
    return segments


def _zero_dim_float64_cpu(ctx: StepContext) -> bool:
    """Whether the group holds a 0-d float64 CPU tensor (a parameter, gradient or slot).

    Inductor (torch 2.13, CPU) drops in-place updates of 0-d float64 input tensors
    (``v.mul_(0.5)`` on ``torch.ones((), dtype=torch.float64)`` leaves it at 1; float32 and
    1-element tensors are right), so such groups run every step eagerly (the foreach code).
    """
    def bad(t: Any) -> bool:
        return isinstance(t, Tensor) and t.ndim == 0 and t.dtype == torch.float64 \
            and t.device.type == "cpu"

    return any(bad(t) for t in (*ctx.params, *ctx.grads)) \
        or any(bad(v) for st in ctx.states for v in st.values())


def _compilable(t: Transform, group: Mapping[str, Any], ctx: StepContext) -> bool:
    """Whether top-level transform ``t`` (with what it contains) runs in a compiled segment."""
    if (t.shared_stats and not t.compiled_gather) or getattr(t, "compiled", True) is False:
        return False
    for i, shape in enumerate(ctx.shapes):
        for owner, slot in chain_slots([t], shape, group, ctx.name(i)):
            if getattr(owner, "compiled", True) is False:
                return False
            if slot.shape is None and not (owner is t and has_prelude(t)):
                return False
    return True


def _fresh_copy(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """``fn`` with its own code object: dynamo keeps its compiled graphs and its recompile
    limit per code object, so each segment gets its own. The name is unique in the process:
    dynamo's automatic dynamic shapes remember the sizes seen per (file, line, name), so a
    second optimizer's segment under the same name with other shapes would compile with
    symbolic sizes (and SMMF's square shape then broke its graph)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}_{next(_SEGMENT_IDS)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                              fn.__closure__)


def _counting_backend(stats: CompileStats) -> Callable[..., Any]:
    """Inductor, counting the graphs it compiles."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        stats.graphs += 1
        return compile_fx(gm, example_inputs)

    return backend


def _segment_step(transforms: tuple[Transform, ...], keys: KeyMap, ctx: StepContext,
                  updates: list[Tensor], steps: list[int], working: list[Tensor], lr: Tensor,
                  form: str, scaled: bool, write: bool) -> list[Tensor]:
    """What a compiled segment runs: its transforms, then (last segment) the write. A
    segment that writes returns nothing: returning the directions would make the kernel store
    them to fresh buffers, a pass over memory nobody reads. For the same reason it puts back
    the gradients a transform replaced in ``ctx.grads`` (AdaGC's clipped ones): nothing after
    the write reads them, and a changed list would be a graph output, stored."""
    ctx.steps = steps  # the symbolic step counts (STEP_SOURCES)
    grads = list(ctx.grads)
    updates = run_chain(transforms, ctx, updates, keys)
    if write:
        write_step(working, updates, ctx.plan, lr, form, scaled)
        ctx.grads[:] = grads
        return []
    return updates


def write_step(params: list[Tensor], directions: list[Tensor], plan: StepPlan, lr: Tensor,
               form: str, scaled: bool) -> None:
    """The parameter write of :func:`~llmvalley.optim.shell.apply_step` with a tensor
    learning rate (per tensor; inductor fuses each tensor's decay and step into one pass)."""
    for p, u, s, mult, absolute, wd, rate in zip(params, directions, plan.scale, plan.lr_mult,
                                                 plan.absolute, plan.weight_decay,
                                                 plan.decay_rate):
        lr_p = lr if type(mult) is float and mult == 1.0 else lr * mult
        # a tensor decay (AdamP's ratio chosen on the device) is always applied: no host sync
        decays = isinstance(wd, Tensor) or wd != 0
        if decays and form == "decoupled":
            _shrink(p, wd, rate, lr_p if scaled else None)
        target, step = p, u
        if isinstance(s, Tensor):
            if s.ndim == 0:
                step = u * s
            else:
                target, step = matrix_view(p), matrix_view(u) * s
        elif s != 1.0:
            step = u * s
        target.sub_(step if absolute else step * lr_p)
        if decays and form == "decoupled_after":
            _shrink(p, wd, rate, lr_p if scaled else None)
        elif decays and form == "proximal":
            p.div_(1.0 + lr_p * wd)


def _shrink(p: Tensor, wd: float, rate: Any, lr: Tensor | None) -> None:
    """Decoupled decay: ``p *= 1 - rate * wd`` (``rate`` from the plan, else ``lr`` or 1)."""
    if rate is not None:
        tensor_rate = isinstance(rate, Tensor) and rate.ndim > 0
        (matrix_view(p) if tensor_rate else p).mul_(1 - wd * rate)
    elif lr is not None:
        p.mul_(1 - lr * wd)
    else:
        p.mul_(1 - wd)


__all__ = ["CompileStats", "compile_stats", "compiled_apply", "compiled_finish",
           "compiled_gather", "compiled_step", "device_number", "shared_compiles",
           "write_step"]
