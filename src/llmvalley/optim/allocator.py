"""Keep freed CPU memory in the process between optimizer steps (glibc's malloc).

A foreach chain allocates a few temporaries the size of the parameters at every step. With
glibc's default settings, large blocks are ``mmap``-ed and unmapped on free, and the heap's
top is returned to the OS once it holds more than a small threshold, so the next step takes
a page fault on every 4 KiB page of every temporary again. On this project's 2-core EPYC
machines that made element-wise recipes (NAdam, LaProp, Adan...) 2.5-6x slower than the same
arithmetic on retained memory (``benchmarks/results/allocator_cpu.md``).

:func:`retain_freed_cpu_memory` sets three ``mallopt`` parameters so that glibc keeps what
it frees, as PyTorch's caching allocator does on CUDA:

- ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's ceiling on 64-bit): blocks up to that size come from
  the heap instead of fresh mappings;
- ``M_MMAP_MAX`` = 0: larger blocks too (a temporary of a matrix above 8M float32 elements,
  such as a 32000 x 512 embedding). Without it each such temporary was mapped afresh and
  faulted in page by page at every step: CAME's default step on 45M LLaMA-shaped parameters
  took 1.7x as long, its compiled step 2.3x (``benchmarks/results/allocator_cpu.md``);
- ``M_TRIM_THRESHOLD`` = 1 GiB: up to that much free memory at the heap's top stays mapped.

The process's resident memory then stays near its peak instead of shrinking between steps,
and memory freed below a block still in use is not returned to the OS until the process
ends (what a caching allocator does too). If glibc cannot grow the heap it still maps
memory, so allocations do not fail for it.

:class:`~llmvalley.optim.shell.ChainOptimizer` calls it once per process, at the first step
with a parameter on the CPU. Set ``LLMVALLEY_RETAIN_CPU_MEMORY=0`` to opt out. On other C
libraries (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: glibc's ``mallopt`` parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
#: the largest ``M_MMAP_THRESHOLD`` glibc accepts on 64-bit (``HEAP_MAX_SIZE / 2``)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
#: the environment variable that turns it off (``0``, ``false``, ``no`` or ``off``)
OPT_OUT = "LLMVALLEY_RETAIN_CPU_MEMORY"

_result: bool | None = None


def retain_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory for reuse (module docstring); once per process.

    Returns whether the settings are in force: False when opted out through
    ``LLMVALLEY_RETAIN_CPU_MEMORY``, when the C library is not glibc, or when ``mallopt``
    refused a value.
    """
    global _result
    if _result is None:
        _result = _apply()
    return _result


def _apply() -> bool:
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and macOS lack it)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on a refused value
    return all([bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)),
                bool(mallopt(M_MMAP_MAX, 0)),
                bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))])


__all__ = ["OPT_OUT", "retain_freed_cpu_memory"]
