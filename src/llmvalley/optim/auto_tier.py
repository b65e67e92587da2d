"""When ``implementation="auto"`` moves a group from the foreach tier to the compiled tier.

A compiled step is 1.1-4x faster than the foreach chain of an element-wise recipe (one or
two passes over memory instead of one per ``torch._foreach_*`` call), but compiling it costs
seconds to a minute on first use. ``"auto"`` therefore starts every group on the foreach
tier (the fused kernel where the recipe has one) and compiles its step only once the group
has run long enough for the compile to be a small part of the run: after
:func:`threshold` *element-steps* (the sum over the group's tensors of elements times steps
taken). Eager steps cost about the same per element-step, so the rule compiles once the
eager steps have taken about as long as a compile takes, the classic rent-or-buy bound: a
run never spends more than about twice the time it would have with the better choice made
in hindsight, and short runs (tests, smoke runs, small models) never compile.

The rule, for a group with ``implementation="auto"`` that does not run a fused kernel, or
whose spec's kernel only bridges the eager phase (``fused_until_compiled``: SPAM's, Grams'
and Adan's, no faster than inductor's code in steady state):

- the device is a CPU (CUDA stays on the foreach tier until the compiled tier has been
  checked on a GPU; ask for ``implementation="compiled"`` there), its parameters are not
  sharded (DTensor), and the step is not itself being traced by ``torch.compile``;
- the whole chain compiles as one segment (no transform runs eagerly between compiled
  pieces: element-wise recipes; see :mod:`llmvalley.optim.compiled`), or as the two compiled
  passes of a shared-statistics step (Prodigy, D-Adapt Adam), and no transform of it declares
  ``auto_compile = False`` (SinkGD: its cache-blocked eager step, ten passes over each matrix
  while it sits in cache, took 0.55-0.58x the compiled step's time on 45M parameters);
- the group holds at least :data:`MIN_NUMEL` (2^20) elements: below that, the compiled
  call's fixed cost (guards over every tensor, about a millisecond on CPU) eats most of the
  gain (measured on nano, 0.9M parameters: lion 1.02x its eager step, nadam 0.44x; micro,
  4.9M: lion 0.55x, nadam 0.25x; ``benchmarks/auto_tier.py``);
- the group has taken at least :func:`threshold` element-steps: 1e10 on CPU by default,
  about 20-70 s of eager optimizer steps on one core (a group of micro's 4.9M parameters
  compiles after ~2,000 steps, of 45M after ~220). ``LLMVALLEY_AUTO_COMPILE=off`` keeps
  ``"auto"`` eager, a number sets the threshold;
- ``torch.compile`` works on this machine: a one-time probe compiles a one-line function
  (no C++ compiler, or an unsupported Python, keeps ``"auto"`` eager).

The decision depends only on step counts and shapes, which the state dict holds, so a run
and its resumption switch at the same step, and every DDP rank switches together. If
compiling a group's step fails, the step runs eagerly (the Python-float state its prelude
advanced is restored first), a warning names the recipe, and the group stays eager. A group
whose compiled step keeps compiling new graphs (on more than :data:`MAX_COMPILING_STEPS`
steps: something specialises the graph on the step) also goes back to eager, with a warning.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import StepContext, Transform
from llmvalley.optim.transforms.shards import is_dtensor

#: element-steps after which ``"auto"`` compiles a group's step, per device type
THRESHOLDS = {"cpu": 1e10}
#: the fewest elements a group must hold for ``"auto"`` to compile its step
MIN_NUMEL = 1 << 20
#: steps of one chain that may compile new graphs under ``"auto"`` (the first compile, a
#: graph per flag pattern, a basis refresh) before it is kept eager
MAX_COMPILING_STEPS = 8
ENV = "LLMVALLEY_AUTO_COMPILE"

log = logging.getLogger(__name__)


def threshold(device_type: str) -> float | None:
    """Element-steps after which ``"auto"`` compiles on ``device_type`` (None: never)."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("off", "false", "no", "never"):
        return None
    base = THRESHOLDS.get(device_type)
    if base is None or not raw:
        return base
    try:
        value = float(raw)
    except ValueError as e:
        raise ValueError(f"invalid {ENV}={raw!r}: 'off' or a number of element-steps") from e
    if not value >= 0:
        raise ValueError(f"invalid {ENV}={raw!r}: 'off' or a number of element-steps >= 0")
    return value


def element_steps(ctx: StepContext) -> int:
    """Elements times steps already taken (before this one), over the group's tensors."""
    total = 0
    for t, step in zip(ctx.params, ctx.steps):
        total += t.numel() * (int(step) - 1)
    return total


def compiles_whole(chain: list[Transform], group: Mapping[str, Any], ctx: StepContext) -> bool:
    """Whether every top-level transform of ``chain`` runs in the compiled segment."""
    from llmvalley.optim.compiled import _compilable, _zero_dim_float64_cpu

    return not _zero_dim_float64_cpu(ctx) and all(_compilable(t, group, ctx) for t in chain)


@functools.cache
def compile_works(device_type: str) -> bool:
    """Whether ``torch.compile`` (inductor) compiles and runs on ``device_type`` here: a
    one-line function, compiled once per process."""

    def probe(x: Tensor) -> Tensor:
        return x * 2.0 + 1.0

    try:
        x = torch.arange(8, dtype=torch.float32, device=device_type)
        fn = torch.compile(probe, backend="inductor", dynamic=False)
        return bool(torch.equal(fn(x), x * 2.0 + 1.0))
    except Exception as e:  # noqa: BLE001 -- any failure means: stay eager
        log.info("torch.compile does not work on %s (%s): implementation='auto' stays "
                 "eager", device_type, e)
        return False


class AutoTier:
    """The ``"auto"`` decisions of one optimizer: which groups compile, which failed."""

    def __init__(self) -> None:
        #: chains (by id) found not to compile whole, and chains whose compile failed
        self._eager: set[tuple[int, str]] = set()
        #: chains, with the shapes and dtypes of their tensors, found to compile whole
        self._whole: set[tuple[Any, ...]] = set()
        self._told: set[str] = set()

    def compiles(self, chain: list[Transform], group: Mapping[str, Any],
                 ctx: StepContext, params: list[Tensor]) -> bool:
        """Whether this step of ``group`` (``params``, the group's parameters as given)
        runs on the compiled tier (see the module). The cheap tests come first: this runs
        at every eager step of every ``"auto"`` group."""
        device = ctx.params[0].device.type
        limit = threshold(device)
        key = (id(chain), group["optimizer"])
        if limit is None or key in self._eager or torch.compiler.is_compiling():
            return False
        done = element_steps(ctx)
        if done < limit or sum(t.numel() for t in ctx.params) < MIN_NUMEL \
                or any(is_dtensor(p) for p in params):
            return False
        whole = (*key, tuple(ctx.shapes), tuple(ctx.dtypes))
        if whole not in self._whole:  # the chain's slots, walked once per layout
            if not compiles_whole(chain, group, ctx) or not compile_works(device) \
                    or not all(t.auto_compile for t in chain):
                self._eager.add(key)
                return False
            self._whole.add(whole)
        if group["optimizer"] not in self._told:
            self._told.add(group["optimizer"])
            log.info("%s: implementation='auto' compiles the step after %d element-steps "
                     "(set implementation='foreach' to stay eager)", group["optimizer"], done)
        return True

    def compiled_new_graphs(self, chain: list[Transform], group: Mapping[str, Any]) -> None:
        """Note that a compiled step of ``group`` compiled new graphs; past
        :data:`MAX_COMPILING_STEPS` such steps the chain stays eager from now on, with a
        warning: a number of the step reaches its graph and specialises it, so it would
        recompile on and on (what Stable-SPAM did before its prelude)."""
        key = (id(chain), group["optimizer"])
        counts = self.__dict__.setdefault("_compiling", {})
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > MAX_COMPILING_STEPS and key not in self._eager:
            self._eager.add(key)
            warnings.warn(f"{group['optimizer']}: its compiled step compiled new graphs on "
                          f"{counts[key]} steps (a number of the step specialises them); "
                          "implementation='auto' runs it eagerly (the foreach tier) from now "
                          "on", RuntimeWarning, stacklevel=4)

    def failed(self, chain: list[Transform], group: Mapping[str, Any],
               error: BaseException) -> None:
        """Keep ``group``'s chain eager from now on, and say why."""
        self._eager.add((id(chain), group["optimizer"]))
        warnings.warn(f"{group['optimizer']}: compiling the step failed "
                      f"({type(error).__name__}: {error}); implementation='auto' runs it "
                      "eagerly (the foreach tier) from now on", RuntimeWarning, stacklevel=4)


def float_state(ctx: StepContext) -> list[dict[str, Any]]:
    """The non-tensor state values of a step (what preludes advance), to restore."""
    return [{k: v for k, v in st.items() if not isinstance(v, Tensor)} for st in ctx.states]


def restore(ctx: StepContext, saved: list[dict[str, Any]]) -> None:
    """Put back the non-tensor state values saved by :func:`float_state`."""
    for st, values in zip(ctx.states, saved):
        st.update(values)
    ctx.power_table = ctx.preludes = None
    ctx.codec.compiled = False  # the eager step decodes with the eager codec


__all__ = ["MAX_COMPILING_STEPS", "THRESHOLDS", "AutoTier", "compile_works", "compiles_whole",
           "element_steps", "threshold"]
