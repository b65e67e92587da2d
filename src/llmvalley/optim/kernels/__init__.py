"""Hand-written CPU kernels for the fused tier, built on first use with inductor's C++ toolchain.

Inductor's loop fusion cannot give some recipes the passes their math needs: a matrix's row and
column sums never share a loop in its CPU backend, so compiled Adafactor read the gradient four
times (row sums, column sums, ``rms(u)``, the write), and AdamP's moments took a pass of their
own before the projection's row sums (``projected.cpp`` runs AdamP and SGDP). A kernel here
makes the passes the method needs and no more. ``lowbit.cpp`` runs adamw8bit, adamw4bit and
lion8bit in one pass: it decodes each block of the 8-/4-bit moments into L1, updates them,
writes the parameter and encodes them again (the chain decodes and encodes in passes of their
own, through table lookups that inductor's CPU code makes one element at a time); the same
kernel runs lion, and adamw with bfloat16 moments (stochastic rounding by hashed noise).
``schedule_free.cpp`` runs schedule-free SGD and AdamW in one pass, ``adam_hf.cpp`` SPAM and
Grams (Adam in the HF eps form) and ``adan.cpp`` Adan in one, ``stable_spam.cpp`` Stable-SPAM in
two (its clipped norm found in the pass that finds the peak), ``fadam.cpp`` FAdam in three,
``adam.cpp`` AdamW with MARS's correction (two passes) or AdaGC's clipping factor (one). Each is
one C++ file next to this module with an ``extern "C" void kernel(...)`` entry, built after the
helpers of ``common.h`` (row and column sums in one pass, OpenMP over rows). :func:`load`
compiles it through ``torch._inductor.codecache.CppPythonBindingsCodeCache`` (the compiler, ISA
flags, OpenMP and on-disk cache that ``torch.compile`` uses on CPU: a few seconds the first time
on a machine, then a load from the cache) and returns a Python callable taking tensors for the
pointer arguments.

A kernel that cannot be built (no C++ compiler, a torch without that API) is reported once
in the log and :func:`load` returns None: the fused tier then declines and the recipe's
foreach chain runs, as it does on any other device.

Loading from inductor's cache still imports inductor and probes the compiler: about 3.7 s in
each new process, the first optimizer step's. :func:`load` therefore also records where the
built module lies, under ``$LLMVALLEY_CACHE/kernels`` (default ``~/.cache/llmvalley``), keyed by
the source, torch's build, Python's version and the CPU's vector ISA; a later process imports
that module directly (milliseconds) and builds through inductor only when the record or the
file is gone, or the import fails.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmvalley.atomic import replacing

log = logging.getLogger(__name__)

#: the variable naming llmvalley's cache folder (as for tokenized data)
CACHE_ENV = "LLMVALLEY_CACHE"

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
    "fadam": ("float*", "const float*", "float*", "float*", "int64_t", "float", "float", "float",
              "float", "float", "float", "float", "float", "int64_t"),
    "adan": ("float*", "const float*", "float*", "float*", "float*", "float*", "int64_t",
             "int64_t", "float", "float", "float", "float", "float", "float", "float", "float",
             "float", "float", "float", "int64_t", "int64_t", "int64_t"),
    "adam": ("float*", "const float*", "float*", "float*", "float*", "int64_t", "float",
             "int64_t", "float", "float", "float", "float", "float", "float", "float", "float",
             "int64_t", "int64_t"),
    "adam_hf": ("float*", "const float*", "float*", "float*", "int64_t", "float", "int64_t",
                "int64_t", "float", "float", "float", "float", "float", "float", "int64_t",
                "float", "float", "int64_t", "int64_t", "int64_t"),
    "stable_spam": ("float*", "const float*", "float*", "float*", "float*", "float*", "float*",
                    "int64_t", "float", "float", "float", "float", "float", "float", "float",
                    "float", "float", "float", "int64_t", "float", "float", "float", "float",
                    "float", "float", "float", "int64_t", "int64_t"),
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
    source = "".join(f"#define {d}\n" for d in defines) + \
        (HERE / "common.h").read_text() + (HERE / f"{name}.cpp").read_text()
    record = _record(name, source)
    kernel = _import_recorded(record)
    if kernel is not None:
        return kernel
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        start = time.perf_counter()
        kernel = CppPythonBindingsCodeCache.load_pybinding(list(SIGNATURES[name]), source)
        log.info("llmvalley: the %s CPU kernel is ready in %.1f s (built once per machine, "
                 "then loaded from inductor's cache)", name, time.perf_counter() - start)
    except Exception as e:  # no compiler, an older torch: the chain runs instead
        log.warning("llmvalley: the %s CPU kernel could not be built (%s: %s); the recipe "
                    "runs its foreach chain", name, type(e).__name__, e)
        return None
    module = sys.modules.get(getattr(kernel, "__module__", "") or "")
    built = getattr(module, "__file__", None)
    if built:
        try:  # where the module lies, for the next process (best effort)
            record.parent.mkdir(parents=True, exist_ok=True)
            with replacing(record) as partial:
                partial.write_text(f"{module.__name__}\n{built}\n")
        except OSError:
            pass
    return kernel


def _record(name: str, source: str) -> Path:
    """The file recording where kernel ``name`` built from ``source`` lies: keyed by the
    source, torch's build, Python's version and the CPU's vector ISA (what the module was
    compiled for)."""
    key = hashlib.sha256("\n".join((
        source, torch.__version__, str(torch.version.git_version),
        f"{sys.version_info[0]}.{sys.version_info[1]}",
        torch.backends.cpu.get_cpu_capability())).encode()).hexdigest()[:32]
    env = os.environ.get(CACHE_ENV)  # the data cache's folder and variable (data/cache.py)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "llmvalley"
    return root / "kernels" / f"{name}-{key}"


def _import_recorded(record: Path) -> Callable[..., Any] | None:
    """The kernel from the module :func:`load` recorded, imported as inductor imports it
    (the tensor-pointer helper's address in the environment, then the extension module),
    or None: no record, its file gone, or any failure (then inductor builds or loads it)."""
    try:
        module_name, path = record.read_text().split("\n")[:2]
        if not Path(path).is_file():
            return None
        if module_name not in sys.modules:
            os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(
                torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr)
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                return None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[module_name] = module
        return sys.modules[module_name].kernel
    except Exception:  # noqa: BLE001 -- no record, or a stale one: build as before
        return None


__all__ = ["ELEMENTS_PER_THREAD", "SIGNATURES", "load", "plain", "threads_for"]
