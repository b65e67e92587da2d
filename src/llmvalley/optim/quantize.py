"""Low-precision storage codecs for optimizer state.

Pure tensor functions (no optimizer logic) for keeping optimizer buffers in fewer bits:

* :func:`bf16_stochastic_round` -- fp32 -> bf16 with unbiased stochastic rounding, for bf16
  master weights or bf16 state that must not stall when updates are below half a bf16 ulp.
* 8-bit block-wise dynamic quantization (Dettmers et al., 2022, "8-bit Optimizers via
  Block-wise Quantization", arXiv:2110.02861): :func:`dynamic_map`,
  :func:`quantize_blockwise`, :func:`dequantize_blockwise`.
* 4-bit block-wise quantization (Li et al., 2023, "Memory Efficient Optimizers with 4-bit
  States", arXiv:2309.01507) in the variant implemented by torchao's ``AdamW4bit``:
  :func:`map_4bit`, :func:`quantize_4bit`, :func:`dequantize_4bit`.

Conventions and where they come from
------------------------------------
Block size, 8-bit. The paper chunks state tensors into blocks of B = 2048. The code that people
actually run uses 256: bitsandbytes 0.50.2 allocates ``absmax`` for its block-wise 8-bit
optimizers with ``blocksize = 256`` (``bitsandbytes/optim/optimizer.py``) and torchao's
``AdamW8bit`` defaults to ``block_size=256``, noting that it matches bitsandbytes. We default to
256 (:data:`BLOCK_SIZE_8BIT`).

Maps, 8-bit. The 256-entry "dynamic tree" map of bitsandbytes' ``create_dynamic_map``: a
decimal exponent 10^-6 .. 10^0 chosen by a run of zero bits, the remaining bits a linear
fraction in [0.1, 1], plus the entries 0 and 1. The signed map (first moments) spends one bit on
the sign, so it covers [-0.993, 1] (no -1); the unsigned map (second moments) gives that bit to
the fraction. Our maps are bit-identical to bitsandbytes' and torchao's (tested).

Block size and maps, 4-bit. torchao's ``AdamW4bit``: blocks of 128; first moment with the
signed dynamic tree map shrunk to 4 bits (3 exponent bits); second moment with the linear map
{1/16, 2/16, ..., 1}, which deliberately excludes zero (the paper's "zero-point problem":
a second moment rounded to 0 blows up m / sqrt(v)). The paper's preferred second-moment scheme
is rank-1 normalisation with that linear map; torchao (and we) use plain 128-blocks instead,
following the ``2nd_moment_group_128`` config of the authors' ``lpmm`` code. Two codes are
packed per byte, the element with the even flat index in the high nibble (torchao's layout).

Rounding to the map. Each value is divided by its block's absmax and mapped to the nearest
map entry; an exact tie goes to the larger entry. The comparison is the one torchao uses, so
codes are bit-identical to torchao's whenever the block absmax is >= 1e-12 (see below).
bitsandbytes' CPU kernel sends ties to the smaller entry instead (exact ties essentially never
occur for real data), and its table-driven search sometimes returns a neighbour of the nearest
entry; our codes are never farther from the value than bitsandbytes' (tested).

Zero blocks. We store the true absmax (0 for an all-zero block) and only divide by a
substitute 1 when it is 0, so an all-zero block dequantizes to exact zeros, even with the
zero-free 4-bit unsigned map. torchao instead clips the absmax to >= 1e-12 and stores the clipped
value (so its zero blocks come back as 1e-12 * map[code], e.g. 6.25e-14 for the 4-bit second
moment); bitsandbytes stores 0 like we do. Apart from that stored scale, we differ from
torchao only for blocks with 0 < absmax < 1e-12, whose codes it flattens towards zero.

Partial blocks and odd sizes. Tensors are flattened; the last block may be shorter than
``block_size`` and has its own absmax over the real elements only. For 4-bit with an odd
element count the final low nibble is padding (code 0) and is ignored on dequantization.

Nearest-entry search. ``torch.searchsorted`` on the sorted map gives the entry just below each
value, then one comparison against the half-gap to the next entry picks the nearer of the two.
This is O(n log 256) with two small int32/float temporaries per element, instead of the
O(n * 256) memory an ``argmin`` over |x - map| would need for large state tensors.

Non-finite state values are not representable: a block containing inf or nan quantizes to
garbage. Keep optimizer state finite (or check it) before quantizing.

Compiled codec
--------------
:func:`quantize_blockwise_compiled`, :func:`dequantize_blockwise_compiled`,
:func:`quantize_4bit_compiled` and :func:`dequantize_4bit_compiled` take the arguments of their
eager counterparts and return bit-identical codes, absmax and decoded values, computed by
``torch.compile`` (inductor) kernels: one pass that takes each block's absmax and writes its
codes, one that decodes. Blocks holding inf or NaN get the eager (garbage) codes too, and NaN
absmax and decoded values where eager has them (a NaN's sign and payload bits may differ).
On one CPU thread (4M elements) they encode 7-11x and decode 1.3-2.5x faster than the eager
functions; a call has a fixed cost of about 70-80 us (dynamo's guards and wrappers), less than
an eager call takes at 4096 elements (``benchmarks/results/codec_time_cpu.md``).

* The nearest-entry search becomes one gather. The eager code (``_nearest_codes``: entry
  below, residual test ``(x - below) >= gap / 2``, ties up) is a non-decreasing function of
  the value; over the float32 numbers sharing their top 16 bits it steps at most once for the
  shipped maps (it may also step between two such buckets), so one
  int32 per top-16-bit pattern, ``code at the bucket's low end << 17 | the low 16 bits (in
  float order) of the first value with the next code`` (65536 if none), gives every code:
  :func:`_code_table`, built once per map *from the eager function itself*. A map whose
  buckets hold two steps (none of ours) is quantized eagerly.
* The only float arithmetic left is the division by the absmax (exact IEEE division in the
  kernel, as eagerly) and the decode's one multiplication ``map[code] * absmax``; no
  reordering can change them. The compile options pin what could: no unsafe math (no
  reciprocal-multiply), no floating-point contraction.
* One compilation per function serves every size: the block count is a dynamic dimension
  (``mark_dynamic``), the block size is static, and the kernels see whole blocks only (the
  caller pads a partial last block; a 4-bit odd count's padding nibble is cleared after).
  Inductor in torch 2.13 drops the tail of a dynamic-length loop it splits on a floor
  division (pytorch/pytorch#195582); whole blocks keep the kernels free of such indexing.
* Tensors under :data:`MIN_QUANTIZED_NUMEL` elements, devices other than the CPU, and maps
  without a table run the eager functions (the same results; nothing is compiled for them).
  On CUDA the kernels would need Triton's correctly rounded division and no flush-to-zero
  (the options are set), but they are untested there, so CUDA stays eager.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llmvalley.optim import kernels

__all__ = [
    "BLOCK_SIZE_4BIT",
    "BLOCK_SIZE_8BIT",
    "MIN_QUANTIZED_NUMEL",
    "bf16_noise",
    "bf16_round_with_seed",
    "bf16_stochastic_round",
    "dequantize_4bit",
    "dequantize_4bit_compiled",
    "dequantize_blockwise",
    "dequantize_blockwise_compiled",
    "dynamic_map",
    "map_4bit",
    "quantize_4bit",
    "quantize_4bit_compiled",
    "quantize_blockwise",
    "quantize_blockwise_compiled",
]

# Tensors with fewer elements than this stay in full precision: the saving is negligible and
# small tensors (biases, norms) are sensitive. Same threshold as bitsandbytes' `min_8bit_size`
# default; torchao's low-bit AdamW also keeps tensors below 4096 elements unquantized.
MIN_QUANTIZED_NUMEL = 4096

# Block sizes of the reference implementations (see the module docstring).
BLOCK_SIZE_8BIT = 256
BLOCK_SIZE_4BIT = 128

# Low 16 bits cleared: 0xFFFF0000 as a two's-complement int32.
_BF16_HIGH_MASK = -(1 << 16)


# --------------------------------------------------------------------------------------------
# bf16 stochastic rounding
# --------------------------------------------------------------------------------------------


def bf16_stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round ``x`` to bfloat16 stochastically, so that the result is unbiased.

    bf16 keeps the upper 16 bits of an fp32 number. Adding a uniform random integer in
    [0, 2^16) to the fp32 bit pattern and then clearing the low 16 bits rounds the magnitude up
    to the next bf16 value with probability (dropped bits) / 2^16 and down otherwise, so
    E[result] == x. Used when accumulating small updates into bf16 tensors, where
    round-to-nearest would silently drop every update smaller than half an ulp.

    One seed is drawn from ``generator`` (``torch.randint(0, 2**32, (1,))``) and the noise of
    each element is a hash of (seed, its row-major index): :func:`bf16_round_with_seed`.

    Args:
        x: floating-point tensor; non-fp32 inputs are cast to fp32 first (exact for fp16/bf16;
            fp64 is rounded to nearest fp32 before the stochastic step).
        generator: optional ``torch.Generator`` on ``x``'s device, for reproducible draws.

    Returns:
        A new bfloat16 tensor of ``x``'s shape. Each element is one of the two bf16 values
        bracketing the fp32 value (the value itself if it is exactly representable). inf and
        nan pass through unchanged. A finite value above the largest bf16 (~3.39e38) may round
        up to inf, its upper neighbour.
    """
    if not x.is_floating_point():
        raise TypeError(f"bf16_stochastic_round expects a floating-point tensor, got {x.dtype}")
    x = x.float()
    seed = torch.randint(0, 1 << 32, (1,), dtype=torch.int64, generator=generator,
                         device=generator.device if generator is not None else x.device)
    return bf16_round_with_seed(x, int(seed))


# the hash of bf16_round_with_seed: 32-bit arithmetic in int64 (every product stays below
# 2^63, so neither eager torch nor inductor's C++ overflows); multipliers are odd, < 2^31
_MASK32 = 0xFFFFFFFF
_HASH_STEP = 0x61C88647  # 2^32 minus the golden-ratio increment 0x9E3779B9
_HASH_MUL1 = 0x7FEB352D  # Wellons' lowbias32
_HASH_MUL2 = 0x7B935975  # 2^32 - 0x846CA68B, lowbias32's second multiplier negated
#: elements hashed at a time by the eager rounding (its int64 temporaries stay in cache)
SR_CHUNK = 1 << 17


def bf16_noise(index: Tensor, seed: int | Tensor) -> Tensor:
    """The stochastic-rounding noise of the elements at flat ``index`` (int64, below 2^32) under
    ``seed`` (an int or a 0-d int64 tensor in [0, 2^32)): the top 16 bits of a 32-bit hash, ``h
    = (index * 0x61C88647 + seed) mod 2^32`` mixed by ``h ^= h >> 16; h *= 0x7FEB352D; h ^= h >>
    15; h *= 0x7B935975`` (mod 2^32), as int32 in [0, 2^16) (a last ``h ^= h >> 16`` would
    change only the low bits). Traceable: in a compiled graph it is a few integer operations per
    element, with nothing drawn or stored."""
    h = index * _HASH_STEP  # in place from here: fewer temporaries eagerly
    h += seed
    h &= _MASK32
    h ^= h >> 16
    h *= _HASH_MUL1
    h &= _MASK32
    h ^= h >> 15
    h *= _HASH_MUL2
    h &= _MASK32
    return (h >> 16).to(torch.int32)


def _sr_kernel(x: Tensor) -> Any:
    """The stochastic-rounding CPU kernel for a contiguous float32 CPU tensor, None otherwise
    or where it cannot be built."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() \
            or not kernels.plain(x):
        return None
    return kernels.load("sr")


def bf16_round_with_seed(x: Tensor, seed: int | Tensor) -> Tensor:
    """Float32 ``x`` rounded stochastically to bfloat16 with the noise :func:`bf16_noise`
    gives each element (by its row-major index modulo 2^32) under ``seed``. The same bits
    eagerly and traced by ``torch.compile``: a compiled step passes the seed as a 0-d tensor,
    so that it changes every step without a recompile."""
    n = x.numel()
    compiling = torch.compiler.is_compiling()
    kernel = None if compiling else _sr_kernel(x)
    if kernel is not None:  # the C++ kernel (kernels/sr.cpp): the same bits, one pass
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        kernel(x, out, n, int(seed), kernels.threads_for(n))
        return out
    flat = x.reshape(-1)
    if compiling or n <= SR_CHUNK:
        index = torch.arange(n, dtype=torch.int64, device=x.device) & _MASK32
        return _round_with_noise(flat, bf16_noise(index, seed)).view(x.shape)
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    base = torch.arange(SR_CHUNK, dtype=torch.int64, device=x.device)
    for start in range(0, n, SR_CHUNK):  # chunks: int64 temporaries of 1 MB, not 8n bytes
        stop = min(n, start + SR_CHUNK)
        index = (base[: stop - start] + start) & _MASK32
        out[start:stop] = _round_with_noise(flat[start:stop], bf16_noise(index, seed))
    return out.view(x.shape)


def _round_with_noise(x: Tensor, noise: Tensor) -> Tensor:
    """:func:`bf16_stochastic_round` of float32 ``x`` given its int32 ``noise`` in
    [0, 2^16)."""
    # Only NaN needs a special case: an infinity's low 16 bits are zero and the noise cannot
    # carry into its exponent, so it comes back unchanged. NaN bit patterns are zeroed first
    # so that the int32 addition cannot overflow. (x != x: one pass eagerly, where isfinite
    # takes four; inductor's CPU code for isnan ran 2x slower than for x != x.)
    nan = x != x
    bits = torch.where(nan, 0, x.view(torch.int32))
    bits += noise
    bits &= _BF16_HIGH_MASK
    # The low 16 bits are now zero, so the cast to bf16 is exact.
    return torch.where(nan, x, bits.view(torch.float32)).to(torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Quantization maps
# --------------------------------------------------------------------------------------------


@cache
def _dynamic_tree_values(signed: bool, total_bits: int) -> tuple[float, ...]:
    """Sorted entries of the dynamic tree map with ``total_bits - 1`` exponent bits.

    Exponent e = 0 .. total_bits - 2 scales a linear fraction by 10^(e - (total_bits - 2)).
    Fraction level counts double with each exponent step; the signed map has half as many per
    sign. Each level is the centre of an equal-width bin of [0.1, 1]. Arithmetic is float32 in
    the same order as bitsandbytes' ``create_dynamic_map`` so the entries agree bit for bit.
    """
    exponent_bits = total_bits - 1
    parts = [torch.tensor([0.0, 1.0], dtype=torch.float32)]
    for e in range(exponent_bits):
        levels = 2 ** (e + total_bits - exponent_bits - (1 if signed else 0))
        edges = torch.linspace(0.1, 1, levels + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        magnitudes = (10.0 ** (e - (exponent_bits - 1))) * centres
        parts.append(magnitudes)
        if signed:
            parts.append(-magnitudes)
    values = torch.cat(parts).sort().values
    assert values.numel() == 2**total_bits and bool((values.diff() > 0).all())
    return tuple(values.tolist())


def dynamic_map(signed: bool, *, device: torch.types.Device = None) -> Tensor:
    """The 256-entry dynamic tree quantization map of bitsandbytes / Dettmers et al. (2022).

    Use ``signed=True`` for first moments (range [-0.993, 1]) and ``signed=False`` for second
    moments (range [0, 1], finer resolution). Returns a sorted float32 tensor of shape (256,).
    Keep the map on the state's device to avoid a copy on every (de)quantization.
    """
    return torch.tensor(_dynamic_tree_values(signed, 8), dtype=torch.float32, device=device)


def map_4bit(signed: bool, *, device: torch.types.Device = None) -> Tensor:
    """The 16-entry maps of torchao's ``AdamW4bit`` (Li et al., 2023).

    ``signed=True`` (first moments): the dynamic tree map with 3 exponent bits,
    {-0.8875 .. -0.0055, 0, 0.0055 .. 0.8875, 1}. ``signed=False`` (second moments): the linear
    map {1/16, 2/16, ..., 1} without zero. Returns a sorted float32 tensor of shape (16,).
    """
    if signed:
        return torch.tensor(_dynamic_tree_values(True, 4), dtype=torch.float32, device=device)
    return torch.linspace(0, 1, 17, dtype=torch.float32, device=device)[1:]


# --------------------------------------------------------------------------------------------
# Block-wise helpers
# --------------------------------------------------------------------------------------------


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_map(qmap: Tensor, entries: int) -> None:
    if qmap.ndim != 1 or qmap.numel() != entries:
        raise ValueError(f"expected a 1-D map of {entries} entries, got shape {tuple(qmap.shape)}")


def _scale_blocks(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Flatten ``x`` to fp32, divide each block by its absmax; return (scaled, absmax).

    ``scaled`` is padded with zeros to a whole number of blocks, shape (blocks, block_size);
    padding cannot change an absmax. All-zero blocks keep absmax 0 and are divided by 1.
    """
    blocks = _whole_blocks(x.detach().reshape(-1).float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return blocks / divisor[:, None], absmax


@cache
def _bucket_table(values: tuple[float, ...], device: str) -> tuple[Tensor, Tensor] | None:
    """``searchsorted(qmap, x, right=True)`` for every float32 ``x``, by its top 16 bits.

    All floats sharing their top 16 bits (sign, exponent, 7 mantissa bits) form an interval;
    the count of map entries at or below ``x`` is constant on it, or steps once at the one map
    entry inside it. Returns the count at the interval's low end and the padded map (so that
    ``start + (map[start] <= x)`` is the exact count), or None when some interval holds more
    than one entry (then the caller searches). Buckets of NaN/inf patterns count as NaN does
    (past the end), which is what ``searchsorted`` gives for the NaN a non-finite block
    scales to.
    """
    qmap = torch.tensor(values, dtype=torch.float32)
    top = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32) << 16
    ends = torch.stack([top, top | 0xFFFF]).view(torch.float32)
    counts = torch.searchsorted(qmap, ends.contiguous(), right=True)
    low, high = counts.min(dim=0).values, counts.max(dim=0).values
    special = (top & 0x7F800000) == 0x7F800000  # exponent all ones: inf and NaN
    low = torch.where(special, torch.full_like(low, qmap.numel()), low)
    high = torch.where(special, low, high)
    if bool(((high - low) > 1).any()):
        return None
    padded = torch.cat([qmap, torch.full((1,), math.inf)])
    # the entry inside an interval is map[low] (the first above its low end); an interval
    # without one points at the +inf pad, which never counts
    inside = torch.where(high > low, low, torch.full_like(low, qmap.numel()))
    return torch.stack([low, inside]).to(device=device, dtype=torch.int32), padded.to(device)


def _lookup(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a 1-D table and int32/int64 indices of any shape, through
    ``index_select``: on CPU about 2.5x faster than advanced indexing with int32 indices."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def _count_at_or_below(scaled: Tensor, qmap: Tensor) -> Tensor:
    """``searchsorted(qmap, scaled, right=True)`` (int32) through a 65536-entry table of the
    float32 bit patterns (:func:`_bucket_table`), a gather instead of a binary search."""
    table = _bucket_table(tuple(qmap.tolist()), str(scaled.device))
    if table is None:
        return torch.searchsorted(qmap, scaled.contiguous(), right=True, out_int32=True)
    (low, inside), padded = table
    bucket = (scaled.contiguous().view(torch.int32) >> 16) + (1 << 15)
    return _lookup(low, bucket) + (_lookup(padded, _lookup(inside, bucket)) <= scaled).to(
        torch.int32)


def _nearest_codes(scaled: Tensor, qmap: Tensor) -> Tensor:
    """Index of the nearest entry of the sorted ``qmap`` for each value (ties go up).

    Values outside [qmap[0], qmap[-1]] map to the end entries.
    """
    qmap = qmap.to(device=scaled.device, dtype=torch.float32).contiguous()
    last = qmap.numel() - 1
    # Entry at or below each value, kept in [0, last - 1] so that `lower + 1` is valid.
    lower = (_count_at_or_below(scaled, qmap) - 1).clamp_(0, last - 1)
    below = _lookup(qmap, lower)
    gap = _lookup(qmap, lower + 1) - below
    # Residual form of `x >= midpoint`, the same float expression torchao evaluates.
    return lower + ((scaled - below) >= gap * 0.5).to(torch.int32)


def _dequantize_codes(
    codes: Tensor,
    absmax: Tensor,
    qmap: Tensor,
    block_size: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> Tensor:
    """Map flat integer ``codes`` (length numel(shape)) back to values of ``shape``."""
    n = codes.numel()
    blocks = absmax.numel()
    if blocks != math.ceil(n / block_size):
        raise ValueError(
            f"absmax has {blocks} entries, expected ceil({n} / {block_size}) for block_size "
            f"{block_size}"
        )
    qmap = qmap.to(device=codes.device, dtype=torch.float32)
    values = _lookup(qmap, codes.to(torch.int32))
    pad = blocks * block_size - n
    if pad:
        values = F.pad(values, (0, pad))
    values = values.view(blocks, block_size) * absmax.to(codes.device, torch.float32)[:, None]
    return values.reshape(-1)[:n].reshape(shape).to(dtype)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


# --------------------------------------------------------------------------------------------
# 8-bit
# --------------------------------------------------------------------------------------------


def quantize_blockwise(
    x: Tensor, qmap: Tensor, block_size: int = BLOCK_SIZE_8BIT
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` to 8-bit codes with per-block absmax scaling.

    Args:
        x: floating-point tensor of any shape (cast to fp32, flattened in C order).
        qmap: sorted 256-entry map, e.g. ``dynamic_map(signed)``; ideally on ``x``'s device.
        block_size: elements per absmax block; the last block may be partial.

    Returns:
        ``(codes, absmax)``: uint8 codes of shape (x.numel(),) and float32 absmax of shape
        (ceil(x.numel() / block_size),). Reconstruct with :func:`dequantize_blockwise`.
    """
    _check_block_size(block_size)
    _check_map(qmap, 256)
    scaled, absmax = _scale_blocks(x, block_size)
    codes = _nearest_codes(scaled, qmap).reshape(-1)[: x.numel()]
    return codes.to(torch.uint8), absmax


def dequantize_blockwise(
    codes: Tensor,
    absmax: Tensor,
    qmap: Tensor,
    block_size: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: ``qmap[code] * absmax[block]``, reshaped.

    Args:
        codes: uint8 codes, numel(shape) of them (any layout; read flat).
        absmax: float32 per-block scales from :func:`quantize_blockwise`.
        qmap: the map used for quantization.
        block_size: the block size used for quantization.
        shape: shape of the returned tensor.
        dtype: dtype of the returned tensor (computed in fp32, then cast).
    """
    _check_block_size(block_size)
    _check_map(qmap, 256)
    codes = codes.reshape(-1)
    if codes.numel() != _numel(shape):
        raise ValueError(f"{codes.numel()} codes do not fill shape {tuple(shape)}")
    return _dequantize_codes(codes, absmax, qmap, block_size, shape, dtype)


# --------------------------------------------------------------------------------------------
# 4-bit
# --------------------------------------------------------------------------------------------


def quantize_4bit(
    x: Tensor, qmap: Tensor, block_size: int = BLOCK_SIZE_4BIT
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` to 4-bit codes with per-block absmax scaling, two codes per byte.

    Args:
        x: floating-point tensor of any shape (cast to fp32, flattened in C order).
        qmap: sorted 16-entry map, e.g. ``map_4bit(signed)``; ideally on ``x``'s device.
        block_size: elements per absmax block; the last block may be partial.

    Returns:
        ``(packed, absmax)``: uint8 of shape (ceil(x.numel() / 2),) holding element 2i in the
        high nibble and element 2i + 1 in the low nibble (0 padding when numel is odd), and
        float32 absmax of shape (ceil(x.numel() / block_size),).
    """
    _check_block_size(block_size)
    _check_map(qmap, 16)
    n = x.numel()
    scaled, absmax = _scale_blocks(x, block_size)
    codes = _nearest_codes(scaled, qmap).reshape(-1)[:n].to(torch.uint8)
    if n % 2:
        codes = F.pad(codes, (0, 1))
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize_4bit(
    packed: Tensor,
    absmax: Tensor,
    qmap: Tensor,
    block_size: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of :func:`quantize_4bit`: unpack nibbles, then ``qmap[code] * absmax[block]``.

    Args:
        packed: uint8 tensor of ceil(numel(shape) / 2) bytes from :func:`quantize_4bit`.
        absmax: float32 per-block scales from :func:`quantize_4bit`.
        qmap: the 16-entry map used for quantization.
        block_size: the block size used for quantization.
        shape: shape of the returned tensor.
        dtype: dtype of the returned tensor (computed in fp32, then cast).
    """
    _check_block_size(block_size)
    _check_map(qmap, 16)
    n = _numel(shape)
    packed = packed.reshape(-1)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{packed.numel()} bytes do not hold the 4-bit codes of {tuple(shape)}")
    codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:n]
    return _dequantize_codes(codes, absmax, qmap, block_size, shape, dtype)


# --------------------------------------------------------------------------------------------
# Compiled codec (see "Compiled codec" in the module docstring)
# --------------------------------------------------------------------------------------------

# (code at the bucket's low end) << _CODE_SHIFT | (low 16 bits of the step, or _NO_STEP)
_CODE_SHIFT = 17
_NO_STEP = 1 << 16
_STEP_MASK = (1 << _CODE_SHIFT) - 1


@cache
def _code_table(values: tuple[float, ...], device: str) -> Tensor | None:
    """The eager nearest-entry code (:func:`_nearest_codes`) of every float32, as one int32
    per pattern of its top 16 bits (the index is the pattern read as unsigned).

    Within a bucket (sign, exponent, 7 mantissa bits) the code is a non-decreasing function of
    the value: the entry below is, and so is the residual ``x - below`` that is compared with
    the half-gap. Read in float order, the bucket's low 16 bits are ``key = low16`` for a
    positive and ``low16 ^ 0xFFFF`` for a negative float (``(bits ^ (bits >> 31)) & 0xFFFF``).
    Each entry is ``code(low end) << 17 | k``, where ``k`` is the smallest key whose code is one
    more (65536 when the code does not change), so that ``code = (entry >> 17) + (key >= (entry
    & 0x1FFFF))``. Built by evaluating the eager function at both ends of every bucket and
    bisecting the keys of the buckets where it steps. Buckets of inf and NaN patterns get the
    code eager gives NaN (``len(map) - 2``; a scaled value is never infinite). None when some
    bucket steps twice (the caller then quantizes eagerly).
    """
    qmap = torch.tensor(values, dtype=torch.float32)
    top = torch.arange(1 << 16, dtype=torch.int64)
    negative = top >= 1 << 15
    base = top << 16

    def codes_at(key: Tensor) -> Tensor:
        bits = base | torch.where(negative, key ^ 0xFFFF, key)
        bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
        return _nearest_codes(bits.view(torch.float32), qmap).to(torch.int64)

    special = (base & 0x7F800000) == 0x7F800000  # exponent all ones: inf and NaN
    low, high = codes_at(torch.zeros_like(top)), codes_at(torch.full_like(top, 0xFFFF))
    steps = torch.where(special, 0, high - low)
    if bool((steps < 0).any()):  # not monotone: cannot happen for a sorted map
        return None
    if bool((steps > 1).any()):
        return None
    low = torch.where(special, qmap.numel() - 2, low)
    # smallest key with the high end's code, by bisection on [0, 0xFFFF] (all buckets at once)
    lo, hi = torch.zeros_like(top), torch.full_like(top, 0xFFFF)
    for _ in range(16):
        mid = (lo + hi) // 2
        up = codes_at(mid) == high
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid + 1)
    step = torch.where(steps == 1, hi, _NO_STEP)
    return ((low << _CODE_SHIFT) | step).to(device=device, dtype=torch.int32)


def _encode_graph(blocks: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """int32 codes and absmax of float32 ``blocks`` (rows of whole blocks), as eager."""
    absmax = blocks.abs().amax(dim=1)
    divisor = torch.where(absmax > 0, absmax, 1.0)
    bits = (blocks / divisor[:, None]).view(torch.int32)
    key = (bits ^ (bits >> 31)) & 0xFFFF
    entry = table[(bits >> 16) & 0xFFFF]
    codes = (entry >> _CODE_SHIFT) + (key >= (entry & _STEP_MASK)).to(torch.int32)
    return codes, absmax


def _encode_8bit_graph(blocks: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    codes, absmax = _encode_graph(blocks, table)
    return codes.to(torch.uint8), absmax


def _encode_4bit_graph(blocks: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    codes, absmax = _encode_graph(blocks, table)
    pairs = codes.view(codes.shape[0], -1, 2)
    return ((pairs[..., 0] << 4) | pairs[..., 1]).to(torch.uint8), absmax


def _decode_8bit_graph(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    return qmap[codes.to(torch.int32)] * absmax[:, None]


def _decode_4bit_graph(packed: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    p = packed.to(torch.int32)
    codes = torch.stack((p >> 4, p & 0xF), dim=2)
    return qmap[codes].view(packed.shape[0], -1) * absmax[:, None]


#: inductor options that keep the kernels' float arithmetic that of the eager functions
#: (the defaults in torch 2.13, pinned against a changed global config)
_COMPILE_OPTIONS = {
    "cpp.enable_unsafe_math_opt_flag": False,
    "cpp.enable_floating_point_contract_flag": "off",
    "eager_numerics.division_rounding": True,
    "eager_numerics.disable_ftz": True,
}


@cache
def _compiled(graph: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(graph, options=_COMPILE_OPTIONS)


def _run_compiled(graph: Callable[..., Any], *args: Tensor) -> Any:
    """``graph(*args)`` compiled: the block count (first dimension of every argument but the
    last, the table or map) dynamic, everything else static, so that one compilation serves
    all sizes. The marks go on fresh views, never on the caller's tensors."""
    if torch.compiler.is_compiling():  # traced into an enclosing graph: inline it
        return graph(*args)
    *sized, last = args
    sized = [t.view(t.shape) for t in sized]
    for t in sized:
        torch._dynamo.mark_dynamic(t, 0)
        for d in range(1, t.ndim):
            torch._dynamo.mark_static(t, d)
    with torch.no_grad():
        return _compiled(graph)(*sized, last)


def _use_compiled(x: Tensor, n: int) -> bool:
    return n >= MIN_QUANTIZED_NUMEL and x.device.type == "cpu"


def _whole_blocks(flat: Tensor, block: int) -> Tensor:
    """``flat`` (1-D) padded with zeros to whole blocks, as rows of ``block``."""
    pad = -flat.numel() % block
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, block)


def _first(flat: Tensor, n: int) -> Tensor:
    """The first ``n`` of ``flat``: itself, or a copy (no storage kept beyond ``n``)."""
    return flat if flat.numel() == n else flat[:n].clone()


def quantize_blockwise_compiled(
    x: Tensor, qmap: Tensor, block_size: int = BLOCK_SIZE_8BIT
) -> tuple[Tensor, Tensor]:
    """:func:`quantize_blockwise` through a compiled kernel: bit-identical codes and absmax."""
    _check_block_size(block_size)
    _check_map(qmap, 256)
    n = x.numel()
    table = _code_table(tuple(qmap.tolist()), str(x.device)) if _use_compiled(x, n) else None
    if table is None:
        return quantize_blockwise(x, qmap, block_size)
    blocks = _whole_blocks(x.detach().reshape(-1).float(), block_size)
    codes, absmax = _run_compiled(_encode_8bit_graph, blocks, table)
    return _first(codes.view(-1), n), absmax


def dequantize_blockwise_compiled(
    codes: Tensor,
    absmax: Tensor,
    qmap: Tensor,
    block_size: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:func:`dequantize_blockwise` through a compiled kernel: bit-identical values."""
    _check_block_size(block_size)
    _check_map(qmap, 256)
    n = _numel(shape)
    if not _use_compiled(codes, n) or codes.numel() != n \
            or absmax.numel() != math.ceil(n / block_size):
        return dequantize_blockwise(codes, absmax, qmap, block_size, shape, dtype)
    blocks = _whole_blocks(codes.reshape(-1).to(torch.uint8), block_size)
    out = _run_compiled(_decode_8bit_graph, blocks, absmax.to(codes.device, torch.float32),
                        qmap.to(device=codes.device, dtype=torch.float32))
    return out.view(-1)[:n].view(shape).to(dtype)


def quantize_4bit_compiled(
    x: Tensor, qmap: Tensor, block_size: int = BLOCK_SIZE_4BIT
) -> tuple[Tensor, Tensor]:
    """:func:`quantize_4bit` through a compiled kernel: bit-identical bytes and absmax."""
    _check_block_size(block_size)
    _check_map(qmap, 16)
    n = x.numel()
    table = _code_table(tuple(qmap.tolist()), str(x.device)) \
        if _use_compiled(x, n) and block_size % 2 == 0 else None
    if table is None:
        return quantize_4bit(x, qmap, block_size)
    blocks = _whole_blocks(x.detach().reshape(-1).float(), block_size)
    packed, absmax = _run_compiled(_encode_4bit_graph, blocks, table)
    packed = _first(packed.view(-1), (n + 1) // 2)
    if n % 2:  # the padding element's code is that of 0: the eager padding nibble is 0
        packed[-1] &= 0xF0
    return packed, absmax


def dequantize_4bit_compiled(
    packed: Tensor,
    absmax: Tensor,
    qmap: Tensor,
    block_size: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:func:`dequantize_4bit` through a compiled kernel: bit-identical values."""
    _check_block_size(block_size)
    _check_map(qmap, 16)
    n = _numel(shape)
    if not _use_compiled(packed, n) or block_size % 2 or packed.numel() != (n + 1) // 2 \
            or absmax.numel() != math.ceil(n / block_size):
        return dequantize_4bit(packed, absmax, qmap, block_size, shape, dtype)
    blocks = _whole_blocks(packed.reshape(-1).to(torch.uint8), block_size // 2)
    out = _run_compiled(_decode_4bit_graph, blocks, absmax.to(packed.device, torch.float32),
                        qmap.to(device=packed.device, dtype=torch.float32))
    return out.view(-1)[:n].view(shape).to(dtype)
