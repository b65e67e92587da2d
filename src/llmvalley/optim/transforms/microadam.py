"""MicroAdam (Modoranu et al., NeurIPS 2024, arXiv 2405.15593; IST-DASLab/MicroAdam, the
optimizer of ``ista-daslab-optimizers``): Adam's statistics recomputed at every step from a
window of the last ``m`` Top-K sparse gradients, with the discarded part of each gradient kept
in a 4-bit error-feedback buffer.

Per tensor, flattened to ``d`` elements, at step ``t`` (Algorithm 1 of the paper):

1. ``a = g + Q^-1(e)``: the dequantized error feedback is added to the gradient;
2. Top-K of ``|a|`` in blocks of ``topk_block_size`` elements, ``ceil(k_init * block)`` per
   block (the last, shorter block gets ``ceil(k_init * its size)``): the indices (block-local,
   int16) and values (bf16) go to row ``(t - 1) % m`` of the window;
3. ``a[I] = 0`` and ``e = Q(a)``: the residual is quantized to 4 bits per element, asymmetric
   in buckets of ``quant_block_size`` elements (each bucket's min and max as bf16,
   ``u = (max - min) / 15``, code ``floor((x - min) / u + 1/2)``, value ``min + code * u``);
4. ``m = sum_i beta1^(age_i) V_i``, ``v = sum_i beta2^(age_i) V_i^2`` over the window rows
   (age 0 for this step's row, up to ``min(t, m) - 1``), scattered to their coordinates, and the
   direction ``c1 m / (sqrt(c2 v) + eps)`` with ``c_j = (1 - beta_j) / (1 - beta_j^t)``.

The direction is zero outside the coordinates of the window. State, packed into float words
(the slots are ``exact``: the codec never touches them), per tensor of ``d`` elements with
``k`` window entries per row:

- ``window``: ``m * k`` words holding ``m * k`` int16 indices then ``m * k`` bf16 values
  (``4 m k`` bytes, the paper's count);
- ``error``: ``ceil(d / 8)`` words holding the ``ceil(d / 2)`` bytes of 4-bit codes, two a byte,
  the element with the even index in the high nibble (the reference's layout);
- ``error_range``: ``ceil(d / quant_block_size)`` words holding each bucket's bf16 min, then
  each bucket's bf16 max.

With float32 (or bf16) parameters that is ``4 m k + 4 ceil(d / 8) + 4 ceil(d / B_q)`` bytes,
the paper's ``0.5 d + 4 m k`` plus the bucket statistics when ``8 | d``; float64 parameters
keep the same words in 8 bytes (half of each unused).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform, numel

Group = Mapping[str, Any]

#: the largest Top-K block whose block-local indices fit the window's int16 entries
MAX_TOPK_BLOCK = 2**15
#: the 4-bit code range of the error feedback
LEVELS = 15


def topk_layout(d: int, block: int, density: float) -> tuple[int, int, int, int]:
    """``(block, full, k_many, k_few)`` of a tensor of ``d`` elements: the Top-K block size
    used (``min(d, block)``), the number of full blocks, the entries kept per full block and in
    the last, shorter block (0 when there is none), as the reference splits it."""
    block = min(d, block)
    if block == 0:
        return 0, 0, 0, 0
    full = d // block
    k_many = int(math.ceil(block * density))
    k_few = int(math.ceil((d - full * block) * density))
    return block, full, k_many, k_few


def window_k(d: int, group: Group) -> int:
    """Window entries per step (``k``) for a tensor of ``d`` elements."""
    _, full, k_many, k_few = topk_layout(d, int(group["topk_block_size"]), group["k_init"])
    return full * k_many + k_few


#: ``beta**age`` tables by (beta, window, dtype, device), made once
_AGE_WEIGHTS: dict[tuple[float, int, torch.dtype, torch.device], Tensor] = {}


def age_weights(beta: float, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[beta**0, ..., beta**(m-1)]`` (Python's powers, rounded to ``dtype``) on ``device``.
    Eagerly the table is made once and kept: building it each step would copy it from host
    memory, which on CUDA blocks until the stream has run its queued work. In a compiled step
    it is a constant of the graph."""
    if torch.compiler.is_compiling():
        return torch.tensor([beta**e for e in range(m)], dtype=dtype, device=device)
    key = (float(beta), m, dtype, torch.device(device))
    table = _AGE_WEIGHTS.get(key)
    if table is None:
        table = _AGE_WEIGHTS[key] = torch.tensor([beta**e for e in range(m)], dtype=dtype,
                                                 device=device)
    return table


def _words(t: Tensor) -> Tensor:
    """The raw bytes of a slot (a 1-D float tensor used as storage)."""
    return t.view(torch.uint8)


def _window_views(slot: Tensor, m: int, k: int) -> tuple[Tensor, Tensor]:
    """The ``(m, k)`` int16 indices and bf16 values stored in a ``window`` slot."""
    raw = _words(slot)
    half = 2 * m * k
    return (raw[:half].view(torch.int16).view(m, k),
            raw[half:2 * half].view(torch.bfloat16).view(m, k))


def _range_views(slot: Tensor, buckets: int) -> tuple[Tensor, Tensor]:
    """The bf16 mins and maxes of the error buckets, stored in an ``error_range`` slot."""
    both = _words(slot)[:4 * buckets].view(torch.bfloat16)
    return both[:buckets], both[buckets:]


def _bucket_stats(x: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Per-bucket min and max of the flat ``x`` (the last bucket may be shorter)."""
    d = x.numel()
    full = d // size
    mins, maxs = [], []
    if full:
        view = x[:full * size].view(full, size)
        mins.append(view.amin(dim=1))
        maxs.append(view.amax(dim=1))
    if full * size < d:
        mins.append(x[full * size:].amin().reshape(1))
        maxs.append(x[full * size:].amax().reshape(1))
    return torch.cat(mins), torch.cat(maxs)


def _per_element(values: Tensor, d: int, size: int) -> Tensor:
    """One value per bucket spread over the bucket's elements."""
    return values.repeat_interleave(size)[:d]


def quantize_asymmetric(x: Tensor, lo: Tensor, hi: Tensor, size: int) -> Tensor:
    """4-bit codes (uint8, one per element) of the flat ``x`` against each bucket's ``[lo, hi]``
    (``floor((x - lo) / u + 1/2)`` with ``u = (hi - lo) / 15``; a flat bucket gets code 0).
    Codes are clamped to [0, 15], a no-op unless bf16 rounding of the range moved it past an
    element by more than half a step (the reference would wrap the byte)."""
    d = x.numel()
    lo_e, u_e = _per_element(lo, d, size), _per_element((hi - lo) / LEVELS, d, size)
    flat = u_e == 0
    codes = torch.floor((x - lo_e) / torch.where(flat, torch.ones_like(u_e), u_e) + 0.5)
    return codes.masked_fill_(flat, 0).clamp_(0, LEVELS).to(torch.uint8)


def dequantize_asymmetric(codes: Tensor, lo: Tensor, hi: Tensor, size: int) -> Tensor:
    """``lo + code * u`` per element (the inverse of :func:`quantize_asymmetric`)."""
    d = codes.numel()
    u = (hi - lo) / LEVELS
    return _per_element(lo, d, size) + codes.to(lo.dtype) * _per_element(u, d, size)


def pack_nibbles(codes: Tensor, out: Tensor) -> None:
    """Write 4-bit ``codes`` two to a byte into ``out`` (even index in the high nibble)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    out.copy_((codes[0::2] << 4) | codes[1::2])


def unpack_nibbles(packed: Tensor, d: int) -> Tensor:
    """The ``d`` 4-bit codes stored by :func:`pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:d]


class ScaleByMicroAdam(Transform):
    """MicroAdam's direction from a Top-K window with 4-bit error feedback (module docstring).

    Hyperparameters: ``betas``, ``eps``, ``m`` (window size), ``k_init`` (Top-K density),
    ``topk_block_size`` and ``quant_block_size``.
    """

    slot_names = ("window", "error", "error_range")

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        d = numel(shape)
        m, k = int(group["m"]), window_k(d, group)
        buckets = math.ceil(d / int(group["quant_block_size"]))
        return [SlotSpec("window", (m * k,), "exact"),
                SlotSpec("error", (math.ceil(d / 8),), "exact"),
                SlotSpec("error_range", (buckets,), "exact")]

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2 = ctx.hp("betas")
        eps, m = ctx.hp("eps"), int(ctx.hp("m"))
        qsize = int(ctx.hp("quant_block_size"))
        out = []
        for i, (g, t, p1, p2) in enumerate(zip(updates, ctx.steps, ctx.powers(beta1),
                                               ctx.powers(beta2))):
            if g.numel() == 0:
                out.append(torch.zeros_like(g))
                continue
            window, error, ranges = (ctx.slot(s, [i])[0] for s in self.slot_names)
            out.append(self._step(g, t, window, error, ranges, ctx.group, beta1, beta2, eps,
                                  m, qsize, (p1, p2)))
        return out

    @staticmethod
    def _step(g: Tensor, t: int, window: Tensor, error: Tensor, ranges: Tensor, group: Group,
              beta1: float, beta2: float, eps: float, m: int, qsize: int,
              powers: tuple[Any, Any]) -> Tensor:
        """One tensor's step; ``powers`` are ``beta1**t`` and ``beta2**t``
        (:meth:`StepContext.powers`: 0-d tensors in a compiled step)."""
        d = g.numel()
        block, full, k_many, k_few = topk_layout(d, int(group["topk_block_size"]),
                                                 group["k_init"])
        k = full * k_many + k_few
        buckets = math.ceil(d / qsize)
        idx, vals = _window_views(window, m, k)
        lo, hi = _range_views(ranges, buckets)
        codes = _words(error)[:math.ceil(d / 2)]
        lo_c, hi_c = lo.to(g.dtype), hi.to(g.dtype)

        # 1. error feedback into the gradient
        a = g.reshape(-1) + dequantize_asymmetric(unpack_nibbles(codes, d), lo_c, hi_c, qsize)
        # 2. Top-K of |a| per block, block-local indices
        mag = a.abs()
        picks = [mag[:full * block].view(full, block).topk(k_many, dim=1, sorted=False)
                 .indices.reshape(-1)]
        if k_few:
            picks.append(mag[full * block:].topk(k_few, sorted=False).indices)
        local = torch.cat(picks)
        offsets = torch.div(torch.arange(k, device=a.device), k_many,
                            rounding_mode="floor") * block
        row = (t - 1) % m
        idx[row] = local.to(torch.int16)
        vals[row] = a[local + offsets].to(torch.bfloat16)
        # 3. the residual becomes the new (quantized) error
        a[local + offsets] = 0
        new_lo, new_hi = _bucket_stats(a, qsize)
        lo.copy_(new_lo)
        hi.copy_(new_hi)
        pack_nibbles(quantize_asymmetric(a, lo.to(a.dtype), hi.to(a.dtype), qsize), codes)
        # 4. Adam's moments from the window, newest row with age 0
        # row r's age is (t - 1 - r) % m: its weights are gathered from beta**age for every
        # age, so that no power of the step count is computed (in a compiled kernel)
        rows = min(t, m)
        ages = (t - 1 - torch.arange(rows, device=a.device)) % m
        w1 = age_weights(beta1, m, a.dtype, a.device)[ages]
        w2 = age_weights(beta2, m, a.dtype, a.device)[ages]
        where = (idx[:rows].to(torch.int64) + offsets).reshape(-1)
        v_rows = vals[:rows].to(a.dtype)
        m_sum = a.new_zeros(d).index_add_(0, where, (w1[:, None] * v_rows).reshape(-1))
        v_sum = a.new_zeros(d).index_add_(0, where, (w2[:, None] * v_rows**2).reshape(-1))
        c1 = (1 - beta1) / (1 - powers[0])
        c2 = (1 - beta2) / (1 - powers[1])
        return (c1 * m_sum / ((c2 * v_sum).sqrt_() + eps)).view(g.shape)
