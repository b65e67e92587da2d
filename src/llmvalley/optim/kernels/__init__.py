"""Hand-written CPU kernels for the fused tier, built on first use with inductor's C++
toolchain.

Inductor's loop fusion cannot give some recipes the passes their math needs: a matrix's row and
column sums never share a loop in its CPU backend, so compiled Adafactor read the gradient four
times (row sums, column sums, ``rms(u)``, the write), and AdamP's moments took a pass of their
own before the projection's row sums (``projected.cpp`` runs AdamP and SGDP). A kernel here
makes the passes the method needs and no more. ``lowbit.cpp`` runs adamw8bit, adamw4bit and
lion8bit in one pass: it decodes each block of the 8-/4-bit moments into L1, updates them,
writes the parameter and encodes them again (the chain decodes and encodes in passes of their
own, through table lookups that inductor's CPU code makes one element at a time); the same
kernel runs lion, and adamw with bfloat16 moments (stochastic rounding by hashed noise).
``schedule_free.cpp`` runs schedule-free SGD and AdamW in one pass. Each is one C++ file next to
this module with an ``extern "C" void kernel(...)`` entry, built after the helpers of
``common.h`` (row and column sums in one pass, OpenMP over rows). :func:`load` compiles it
through ``torch._inductor.codecache.CppPythonBindingsCodeCache`` (the compiler, ISA flags,
OpenMP and on-disk cache that ``torch.compile`` uses on CPU: a few seconds the first time on a
machine, then a load from the cache) and returns a Python callable taking tensors for the
pointer arguments.

A kernel that cannot be built (no C++ compiler, a torch without that API) is reported once
in the log and :func:`load` returns None: the fused tier then declines and the recipe's
foreach chain runs, as it does on any other device.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent

#: each kernel's argument types, in the order of its C++ ``kernel`` entry
SIGNATURES: dict[str, tuple[str, ...]] = {
    "adafactor": ("float*", "const float*", "float*", "float*", "int64_t", "int64_t",
                  "int64_t", "float", "float", "float", "float", "float", "float", "int64_t"),
    "projected": ("float*", "const float*", "float*", "float*", "int64_t", "int64_t", "float",
                  "float", "float", "float", "float", "float", "float", "float", "float",
                  "float", "float", "int64_t", "int64_t", "int64_t", "int64_t"),
    "came": ("float*", "const float*", "float*", "float*", "float*", "float*", "float*",
             "int64_t", "int64_t", "int64_t", "float", "float", "float", "float", "float",
             "float", "float", "float", "float", "float", "float", "int64_t"),
    "sr": ("const float*", "void*", "int64_t", "int64_t", "int64_t"),
    "schedule_free": ("float*", "const float*", "float*", "float*", "int64_t", "float",
                      "float", "float", "float", "float", "float", "float", "float", "int64_t",
                      "int64_t"),
    "lowbit": ("float*", "const float*", "void*", "float*", "const float*", "const int32_t*",
               "void*", "float*", "const float*", "const int32_t*", "int64_t", "int64_t",
               "int64_t", "int64_t", "int64_t", "float", "float", "float", "float", "float",
               "float", "float", "float", "int64_t", "int64_t", "int64_t"),
}


#: elements per OpenMP thread below which a kernel runs a tensor on fewer threads
ELEMENTS_PER_THREAD = 1 << 16


def threads_for(numel: int) -> int:
    """OpenMP threads for a kernel on ``numel`` elements: torch's count, fewer for a small
    tensor."""
    return max(1, min(torch.get_num_threads(), numel // ELEMENTS_PER_THREAD))


def plain(t: Any) -> bool:
    """Whether ``t`` is a plain tensor: the kernels read raw pointers, so a tensor subclass
    such as a DTensor takes the chain."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


@functools.cache
def load(name: str, defines: tuple[str, ...] = ()) -> Callable[..., Any] | None:
    """The built kernel ``name`` (``<name>.cpp`` here), or None when it cannot be built on
    this machine (logged once). ``defines``: ``"NAME VALUE"`` macros set before the source
    (tests build the low-bit kernel's narrower SIMD paths with them)."""
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        source = "".join(f"#define {d}\n" for d in defines) + \
            (HERE / "common.h").read_text() + (HERE / f"{name}.cpp").read_text()
        start = time.perf_counter()
        kernel = CppPythonBindingsCodeCache.load_pybinding(list(SIGNATURES[name]), source)
        log.info("llmvalley: the %s CPU kernel is ready in %.1f s (built once per machine, "
                 "then loaded from inductor's cache)", name, time.perf_counter() - start)
        return kernel
    except Exception as e:  # no compiler, an older torch: the chain runs instead
        log.warning("llmvalley: the %s CPU kernel could not be built (%s: %s); the recipe "
                    "runs its foreach chain", name, type(e).__name__, e)
        return None


__all__ = ["ELEMENTS_PER_THREAD", "SIGNATURES", "load", "plain", "threads_for"]
