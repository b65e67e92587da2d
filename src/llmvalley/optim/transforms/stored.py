"""Numbers a compiled step should compute once and load, not recompute in every loop.

Inductor inlines the arithmetic that makes a per-row or per-tensor number (square roots,
divisions, selections) into the loop over a matrix's elements, where it runs once per vector
of 16 floats: GCC does not hoist ``std::sqrt`` out of inductor's CPU loops, which are
compiled with ``-fmath-errno``. A product with a 1x1 ones matrix is an extern kernel that
inductor cannot inline, so the values go through one (exact) and the loops load them.
Outside a compiled CPU step these return their inputs: the problem is GCC's, and on a GPU the
extern product would only cut inductor's fused kernels in two.

:func:`device_number` makes the per-step numbers the fused and compiled tiers pass to their
kernels (step counts, learning rate, step powers) on the device, on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _one(x: Tensor) -> Tensor:
    return torch.ones(1, 1, dtype=x.dtype, device=x.device)


def device_number(value: float, device: torch.device,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """A per-step number as a 0-d tensor on ``device``. ``torch.full`` launches a fill with
    the value as its argument; ``torch.tensor(value, device=...)`` would copy it from host
    memory, which on CUDA blocks until the stream has finished its queued work (the backward
    pass, for an optimizer step). Exact for float64."""
    return torch.full((), value, dtype=dtype, device=device)


def compiled_cpu(x: Tensor) -> bool:
    """Whether ``x`` is being traced for a compiled CPU step (where inductor's C++ loops, not
    Triton's, will compute with it)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu"


def stored_factors(rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``(..., m, 1)`` and per-column ``(..., 1, n)`` factors, unchanged, for a
    compiled step that broadcasts them over a matrix (Adafactor's compiled step 0.46x, 45M
    parameters, CPU)."""
    if not compiled_cpu(rows):
        return rows, cols
    one = _one(rows)
    return rows @ one, one @ cols


def stored_scalars(values: list[Tensor]) -> list[Tensor]:
    """0-d tensors of one dtype, unchanged, computed once in a compiled step (stacked into
    one :func:`stored_rows`). Outside a compiled CPU step: ``values`` itself."""
    if not values or not compiled_cpu(values[0]):
        return values
    return list(stored_rows(torch.stack(values)).unbind(0))


def stored_rows(x: Tensor) -> Tensor:
    """A 1-D tensor of per-row numbers, unchanged, computed once in a compiled step (AdamP's
    projection coefficients). Outside a compiled CPU step: ``x`` itself.

    A single number is repeated twice: inductor rewrites a ``(1, 1) @ (1, 1)`` product on
    CPU as a multiplication, which it would inline again."""
    if not compiled_cpu(x):
        return x
    n = x.shape[0]
    column = (x if n > 1 else x.repeat(2)).reshape(-1, 1)
    return (column @ _one(column)).reshape(-1)[:n]


def row_aligned(x: Tensor) -> Tensor:
    """``x`` unchanged (times a stored 1 per row of its ``(rows, -1)`` view in a compiled CPU
    step; exact), for an element-wise loop that should share a loop with per-row sums.

    Inductor's CPU backend merges the two dimensions of a contiguous element-wise loop into one,
    and a flat loop never fuses with a reduction over rows: AdamP's moment updates ran as a pass
    of their own, and its row sums read their results back. A per-row factor in the loop's body
    keeps it two-dimensional, and inductor then computes the moments and the row sums in one
    pass. Tensors of fewer than two dimensions, and every step outside a compiled CPU one, get
    ``x`` itself."""
    if x.ndim < 2 or not compiled_cpu(x):
        return x
    rows = x.shape[0]
    ones = stored_rows(torch.ones(rows, dtype=x.dtype, device=x.device))
    return (x.reshape(rows, -1) * ones[:, None]).reshape(x.shape)


__all__ = ["compiled_cpu", "device_number", "row_aligned", "stored_factors", "stored_rows",
           "stored_scalars"]
