"""Tests for the low-precision optimizer-state codecs in ``llmvalley.optim.quantize``.

Each codec is checked against a slow reference written here (loop over blocks, brute-force
argmin over the map), against torchao's implementation (maps, codes, scales, dequantized
values), and, when it is installed, against bitsandbytes' CPU kernels.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from llmvalley.optim.quantize import (
    BLOCK_SIZE_4BIT,
    BLOCK_SIZE_8BIT,
    MIN_QUANTIZED_NUMEL,
    bf16_stochastic_round,
    dequantize_4bit,
    dequantize_blockwise,
    dynamic_map,
    map_4bit,
    quantize_4bit,
    quantize_blockwise,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]


@pytest.fixture(scope="module")
def torchao_optim() -> SimpleNamespace:
    """torchao's low-bit optimizer internals (skips when torchao is not installed)."""
    quant_utils = pytest.importorskip("torchao.optim.quant_utils")
    subclass_8bit = pytest.importorskip("torchao.optim.subclass_8bit")
    subclass_4bit = pytest.importorskip("torchao.optim.subclass_4bit")
    return SimpleNamespace(qu=quant_utils, s8=subclass_8bit, s4=subclass_4bit)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed))


def _heavy_tailed(shape, seed: int) -> torch.Tensor:
    """Cauchy samples (ratio of normals) times log-normal magnitudes spanning ~8 decades."""
    g = _gen(seed)
    cauchy = torch.randn(shape, generator=g) / torch.randn(shape, generator=g)
    return cauchy * torch.exp(2.0 * torch.randn(shape, generator=g))


def _state(shape, seed: int, signed: bool, heavy: bool = False) -> torch.Tensor:
    """A first-moment-like (signed) or second-moment-like (non-negative) tensor."""
    x = _heavy_tailed(shape, seed) if heavy else _normal(shape, seed)
    return x if signed else x.square()


# --------------------------------------------------------------------------------------------
# Slow references
# --------------------------------------------------------------------------------------------


def _ref_quantize(x: torch.Tensor, qmap: torch.Tensor, block_size: int):
    """Loop over blocks; per block: absmax, divide, brute-force nearest entry in float64.

    Returns (codes as int64, absmax float32, scaled values float32, float64 distance matrix).
    """
    flat = x.reshape(-1).float()
    q64 = qmap.double()
    codes, absmaxes, scaled_all, dists = [], [], [], []
    for start in range(0, flat.numel(), block_size):
        block = flat[start : start + block_size]
        absmax = block.abs().max()
        scaled = block / absmax if absmax > 0 else torch.zeros_like(block)
        dist = (scaled.double()[:, None] - q64[None, :]).abs()
        codes.append(dist.argmin(dim=1))
        absmaxes.append(absmax.reshape(1))
        scaled_all.append(scaled)
        dists.append(dist)
    if not codes:
        empty = torch.empty(0)
        return empty.long(), empty, empty, torch.empty(0, qmap.numel(), dtype=torch.float64)
    return torch.cat(codes), torch.cat(absmaxes), torch.cat(scaled_all), torch.cat(dists)


def _ref_dequantize(codes, absmax, qmap, block_size: int) -> torch.Tensor:
    out = torch.empty(codes.numel())
    for b in range(absmax.numel()):
        sl = slice(b * block_size, (b + 1) * block_size)
        out[sl] = qmap[codes[sl].long()] * absmax[b]
    return out


def _ref_pack(codes: list[int]) -> torch.Tensor:
    if len(codes) % 2:
        codes = codes + [0]
    return torch.tensor(
        [(codes[i] << 4) | codes[i + 1] for i in range(0, len(codes), 2)], dtype=torch.uint8
    )


def _assert_nearest_codes(codes: torch.Tensor, ref_codes, scaled, dist) -> None:
    """Codes equal the brute-force argmin, except at ties, where the larger entry must win.

    A "tie" is two candidates whose exact distances differ by less than the rounding of the
    float32 midpoint test (a few ulp of the scaled value); random data essentially never has one.
    """
    codes = codes.cpu().long()
    ours = dist.gather(1, codes[:, None]).squeeze(1)
    best = dist.gather(1, ref_codes[:, None]).squeeze(1)
    tol = 4 * 2.0**-24 * scaled.double().abs().clamp_min(1e-30)
    assert bool((ours <= best + tol).all()), "a code is not a nearest map entry"
    mismatch = codes != ref_codes
    # Any disagreement must be a tie resolved upwards.
    assert bool((codes[mismatch] > ref_codes[mismatch]).all())
    assert bool(((ours - best)[mismatch] <= tol[mismatch]).all())


# --------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------


def _paper_dynamic_map(signed: bool, total_bits: int) -> torch.Tensor:
    """The dynamic tree map from its description, in float64: sign, decimal exponent given by
    a run of zeros, linear fraction of equal bins of [0.1, 1] (bin centres), plus 0 and 1."""
    exponent_bits = total_bits - 1
    values = [0.0, 1.0]
    for e in range(exponent_bits):
        levels = 2 ** (e + (0 if signed else 1))
        width = 0.9 / levels
        for j in range(levels):
            v = 10.0 ** (e - exponent_bits + 1) * (0.1 + (j + 0.5) * width)
            values += [v, -v] if signed else [v]
    return torch.tensor(sorted(values), dtype=torch.float64)


def _assert_rel_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 map vs float64 description: equal up to float32 rounding (rtol 1e-6)."""
    assert ours.shape == ref.shape
    assert bool(((ours.double() - ref).abs() <= 1e-6 * ref.abs()).all())


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_structure(signed):
    m = dynamic_map(signed)
    assert m.dtype == torch.float32 and m.shape == (256,)
    assert bool((m.diff() > 0).all())
    assert m[-1].item() == 1.0 and 0.0 in m.tolist()
    if signed:
        assert m[0].item() == pytest.approx(-0.99296875)  # no -1 in the signed map
        assert (m < 0).sum().item() == 127
    else:
        assert m[0].item() == 0.0
    _assert_rel_close(m, _paper_dynamic_map(signed, 8))


@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_torchao(torchao_optim, signed):
    s8, s4, qu = torchao_optim.s8, torchao_optim.s4, torchao_optim.qu
    ref8 = s8.get_qmap_signed() if signed else s8.get_qmap_unsigned()
    ref4 = s4.get_qmap_signed() if signed else s4.get_qmap_unsigned()
    assert torch.equal(dynamic_map(signed), torch.tensor(ref8, dtype=torch.float32))
    assert torch.equal(
        dynamic_map(signed), torch.tensor(qu.create_dynamic_map(signed), dtype=torch.float32)
    )
    assert torch.equal(map_4bit(signed), torch.tensor(ref4, dtype=torch.float32))


def test_map_4bit_structure():
    signed, unsigned = map_4bit(True), map_4bit(False)
    assert signed.shape == unsigned.shape == (16,)
    assert signed.dtype == unsigned.dtype == torch.float32
    assert bool((signed.diff() > 0).all()) and bool((unsigned.diff() > 0).all())
    _assert_rel_close(signed, _paper_dynamic_map(True, 4))
    # Linear second-moment map without zero (Li et al. 2023, zero-point problem).
    assert torch.equal(unsigned, torch.arange(1, 17, dtype=torch.float32) / 16)


def test_constants():
    assert MIN_QUANTIZED_NUMEL == 4096
    assert BLOCK_SIZE_8BIT == 256 and BLOCK_SIZE_4BIT == 128


def test_map_device_keyword():
    assert dynamic_map(True, device="cpu").device.type == "cpu"
    assert map_4bit(False, device="cpu").device.type == "cpu"


# --------------------------------------------------------------------------------------------
# 8-bit against the reference
# --------------------------------------------------------------------------------------------

SHAPES = [(1536,), (3, 500), (7,), (1,), (257,), (2, 3, 129)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("heavy", [False, True])
def test_blockwise_matches_reference(device, shape, signed, heavy):
    x = _state(shape, seed=sum(shape) + 7 * signed + 3 * heavy, signed=signed, heavy=heavy)
    qmap = dynamic_map(signed)
    for block_size in (BLOCK_SIZE_8BIT, 64):
        codes, absmax = quantize_blockwise(x.to(device), qmap.to(device), block_size)
        assert codes.dtype == torch.uint8 and codes.shape == (x.numel(),)
        assert absmax.dtype == torch.float32
        assert absmax.shape == (math.ceil(x.numel() / block_size),)
        ref_codes, ref_absmax, scaled, dist = _ref_quantize(x, qmap, block_size)
        assert torch.equal(absmax.cpu(), ref_absmax)
        _assert_nearest_codes(codes, ref_codes, scaled, dist)

        out = dequantize_blockwise(codes, absmax, qmap.to(device), block_size, x.shape)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.equal(
            out.cpu().reshape(-1), _ref_dequantize(codes.cpu(), absmax.cpu(), qmap, block_size)
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1024,), (1001,), (3, 300), (1,), (5, 13)])
@pytest.mark.parametrize("signed", [True, False])
def test_4bit_matches_reference(device, shape, signed):
    x = _state(shape, seed=sum(shape) + 11 * signed, signed=signed, heavy=True)
    qmap = map_4bit(signed)
    for block_size in (BLOCK_SIZE_4BIT, 32):
        packed, absmax = quantize_4bit(x.to(device), qmap.to(device), block_size)
        assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(x.numel() / 2),)
        assert absmax.dtype == torch.float32
        assert absmax.shape == (math.ceil(x.numel() / block_size),)
        ref_codes, ref_absmax, scaled, dist = _ref_quantize(x, qmap, block_size)
        assert torch.equal(absmax.cpu(), ref_absmax)

        codes = []  # unpack by hand: even index in the high nibble
        for byte in packed.cpu().tolist():
            codes += [byte >> 4, byte & 0xF]
        codes = torch.tensor(codes[: x.numel()])
        _assert_nearest_codes(codes, ref_codes, scaled, dist)
        assert torch.equal(packed.cpu(), _ref_pack(codes.tolist()))
        if x.numel() % 2:
            assert packed[-1].item() & 0xF == 0  # padding nibble

        out = dequantize_4bit(packed, absmax, qmap.to(device), block_size, x.shape)
        assert out.shape == x.shape and out.dtype == torch.float32
        ref_out = _ref_dequantize(codes, absmax.cpu(), qmap, block_size)
        assert torch.equal(out.cpu().reshape(-1), ref_out)


# --------------------------------------------------------------------------------------------
# Against torchao
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("heavy", [False, True])
def test_blockwise_equals_torchao(torchao_optim, signed, heavy):
    qu, s8 = torchao_optim.qu, torchao_optim.s8
    x = _state((24, 512), seed=1 + signed + 2 * heavy, signed=signed, heavy=heavy)
    x[3] = 0.0  # two all-zero blocks
    qmap = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, qmap, 256)
    out = dequantize_blockwise(codes, absmax, qmap, 256, x.shape)

    # torchao's functional path.
    scaled, scale = qu.scale_tensor(x.reshape(-1), 256)
    assert torch.equal(codes, qu.quantize_8bit_with_qmap(scaled, qmap))
    # Its tensor subclass (what AdamW8bit stores).
    state = s8.OptimState8bit.zeros(x.shape, signed, 256)
    state.copy_(x)
    assert torch.equal(codes, state.codes.reshape(-1))
    assert torch.equal(out, state.dequantize())
    # Scales agree except that torchao clips all-zero blocks to 1e-12; we keep 0.
    zero = absmax == 0
    assert zero.sum().item() == 2
    assert torch.equal(absmax[~zero], state.scale[~zero])
    assert bool((state.scale[zero] == 1e-12).all()) and torch.equal(scale, state.scale)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("heavy", [False, True])
def test_4bit_equals_torchao(torchao_optim, signed, heavy):
    qu, s4 = torchao_optim.qu, torchao_optim.s4
    x = _state((20, 384), seed=5 + signed + 2 * heavy, signed=signed, heavy=heavy)
    x[7, :128] = 0.0  # one all-zero block
    qmap = map_4bit(signed)
    packed, absmax = quantize_4bit(x, qmap, 128)
    out = dequantize_4bit(packed, absmax, qmap, 128, x.shape)

    scaled, _ = qu.scale_tensor(x.reshape(-1), 128)
    codes = qu.quantize_4bit_with_qmap(scaled, qmap)
    assert torch.equal(packed, (codes[0::2] << 4) | codes[1::2])
    state = s4.OptimState4bit.zeros(x.shape, signed, 128)
    state.copy_(x)
    assert torch.equal(packed, state.codes)
    zero = absmax == 0
    assert zero.sum().item() == 1
    assert torch.equal(absmax[~zero], state.scale[~zero])
    # Dequantized values agree exactly outside zero blocks. Inside, ours are exact zeros while
    # torchao returns map[code] * 1e-12 (6.25e-14 with the zero-free unsigned map).
    theirs = state.dequantize()
    in_zero_block = zero.repeat_interleave(128).reshape(x.shape)
    assert torch.equal(out[~in_zero_block], theirs[~in_zero_block])
    assert bool((out[in_zero_block] == 0).all())
    assert bool((theirs[in_zero_block].abs() <= 1e-12).all())
    if not signed:
        assert bool((theirs[in_zero_block] == qmap[0] * 1e-12).all())


def test_tie_rounds_to_larger_entry_like_torchao(torchao_optim):
    qu = torchao_optim.qu
    qmap = map_4bit(False)  # entry i is (i + 1) / 16; midpoints (2i + 3) / 32 are exact
    mids = (2 * torch.arange(15, dtype=torch.float32) + 3) / 32
    x = torch.cat([torch.ones(1), mids])  # absmax 1, so the scaled values are the midpoints
    packed, _ = quantize_4bit(x, qmap, 128)
    codes = torch.stack((packed >> 4, packed & 0xF), 1).reshape(-1)[: x.numel()]
    assert codes.tolist() == [15] + list(range(1, 16))
    assert torch.equal(codes, qu.quantize_4bit_with_qmap(x, qmap))


# --------------------------------------------------------------------------------------------
# Against bitsandbytes (optional)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_against_bitsandbytes(signed):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_map(signed), bnb_f.create_dynamic_map(signed=signed))

    x = _state((40 * 256 + 77,), seed=3 + signed, signed=signed, heavy=True)
    x[256:512] = 0.0
    qmap = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, qmap, 256)
    bnb_codes, bnb_state = bnb_f.quantize_blockwise(x, code=qmap.clone(), blocksize=256)
    assert torch.equal(absmax, bnb_state.absmax)  # including the zero and partial blocks

    # bitsandbytes' CPU kernel searches the map approximately (BinSearch "Direct2" plus a
    # single right-neighbour check) and sometimes returns a code that is not the nearest
    # entry. Ours is always at least as near, and equal wherever bitsandbytes' is nearest.
    scaled = x / absmax.clamp_min(1e-30).repeat_interleave(256)[: x.numel()]
    ours = (qmap[codes.long()] - scaled).abs()
    theirs = (qmap[bnb_codes.long()] - scaled).abs()
    assert bool((ours <= theirs).all())
    same_dist = ours == theirs
    assert torch.equal(codes[same_dist], bnb_codes[same_dist])
    # Dequantization conventions agree exactly: bitsandbytes decodes our codes to our values.
    out = dequantize_blockwise(codes, absmax, qmap, 256, x.shape)
    bnb_out = bnb_f.dequantize_blockwise(codes, absmax=absmax, code=qmap, blocksize=256)
    assert torch.equal(out, bnb_out)


# --------------------------------------------------------------------------------------------
# Round-trip error bounds and edge cases
# --------------------------------------------------------------------------------------------


def _max_error_over_absmax(qmap: torch.Tensor, signed: bool) -> float:
    """Worst |x / absmax - nearest entry| over the domain [-1, 1] (signed) or [0, 1]."""
    q = qmap.double()
    low = -1.0 if signed else 0.0
    return max((q.diff().max() / 2).item(), abs(q[0].item() - low), abs(1.0 - q[-1].item()))


CODECS = {
    "8bit": (dynamic_map, quantize_blockwise, dequantize_blockwise, 256),
    "4bit": (map_4bit, quantize_4bit, dequantize_4bit, 128),
}


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("heavy", [False, True])
def test_round_trip_error_bound(codec, signed, heavy):
    make_map, quantize, dequantize, block_size = CODECS[codec]
    x = _state((33, 517), seed=17 + signed + 2 * heavy, signed=signed, heavy=heavy)
    qmap = make_map(signed)
    packed, absmax = quantize(x, qmap, block_size)
    out = dequantize(packed, absmax, qmap, block_size, x.shape)

    n, blocks = x.numel(), absmax.numel()
    err = torch.zeros(blocks * block_size, dtype=torch.float64)
    err[:n] = (out.double() - x.double()).abs().reshape(-1)
    rel = (err.view(blocks, block_size) / absmax.double()[:, None]).max()
    bound = _max_error_over_absmax(qmap, signed)
    # Slack: float32 rounding of x / absmax and of map[code] * absmax (a few 2^-24).
    assert rel.item() <= bound + 4 * 2.0**-24
    # The bound is attained up to sampling: the error is not trivially small.
    assert rel.item() >= 0.5 * bound
    # The block maximum itself is stored exactly (1 is a map entry, absmax is exact).
    flat, flat_out = x.reshape(-1), out.reshape(-1)
    for b in (0, blocks - 1):
        block = flat[b * block_size : (b + 1) * block_size]
        i = b * block_size + int(block.abs().argmax())
        if flat[i] > 0:
            assert flat_out[i] == flat[i]
    # Sign is preserved (the dynamic maps have zero, so small values may become 0).
    assert bool((out * x >= 0).all())


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("signed", [True, False])
def test_zero_blocks_dequantize_to_zero(codec, signed):
    make_map, quantize, dequantize, block_size = CODECS[codec]
    qmap = make_map(signed)
    x = torch.zeros(3 * block_size + 5)
    x[block_size : 2 * block_size] = _state((block_size,), 0, signed)
    packed, absmax = quantize(x, qmap, block_size)
    out = dequantize(packed, absmax, qmap, block_size, x.shape)
    assert absmax[0] == 0 and absmax[2] == 0 and absmax[3] == 0 and absmax[1] > 0
    assert not out.isnan().any()
    assert bool((out[:block_size] == 0).all()) and bool((out[2 * block_size :] == 0).all())

    all_zero = torch.zeros(10, 7)
    packed, absmax = quantize(all_zero, qmap, block_size)
    out = dequantize(packed, absmax, qmap, block_size, all_zero.shape)
    assert torch.equal(out, all_zero)


@pytest.mark.parametrize("codec", list(CODECS))
def test_partial_last_block_has_its_own_scale(codec):
    make_map, quantize, dequantize, block_size = CODECS[codec]
    qmap = make_map(True)
    x = torch.cat([100.0 * torch.ones(block_size), torch.tensor([0.5, -0.25, 0.125])])
    packed, absmax = quantize(x, qmap, block_size)
    assert absmax.tolist() == [100.0, 0.5]
    out = dequantize(packed, absmax, qmap, block_size, x.shape)
    assert out[block_size].item() == 0.5  # absmax of the partial block maps to entry 1.0
    assert (out[block_size:] - x[block_size:]).abs().max() <= 0.5 * _max_error_over_absmax(
        qmap, True
    )


@pytest.mark.parametrize("codec", list(CODECS))
def test_dtypes_and_shapes(codec):
    make_map, quantize, dequantize, block_size = CODECS[codec]
    qmap = make_map(True)
    x = _normal((6, 5, 11), seed=9)
    packed, absmax = quantize(x, qmap, block_size)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        out = dequantize(packed, absmax, qmap, block_size, x.shape, dtype)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, dequantize(packed, absmax, qmap, block_size, x.shape).to(dtype))
    # Low-precision inputs are quantized as their fp32 values.
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        p1, a1 = quantize(xl, qmap, block_size)
        p2, a2 = quantize(xl.float(), qmap, block_size)
        assert torch.equal(p1, p2) and torch.equal(a1, a2)
    # Non-contiguous input is read in logical (C) order.
    xt = x.transpose(0, 2)
    p1, a1 = quantize(xt, qmap, block_size)
    p2, a2 = quantize(xt.contiguous(), qmap, block_size)
    assert torch.equal(p1, p2) and torch.equal(a1, a2)
    # Input is not modified.
    before = x.clone()
    quantize(x, qmap, block_size)
    assert torch.equal(x, before)


@pytest.mark.parametrize("codec", list(CODECS))
def test_empty_tensor(codec):
    make_map, quantize, dequantize, block_size = CODECS[codec]
    qmap = make_map(False)
    packed, absmax = quantize(torch.empty(0, 4), qmap, block_size)
    assert packed.numel() == 0 and absmax.numel() == 0
    assert dequantize(packed, absmax, qmap, block_size, (0, 4)).shape == (0, 4)


def test_validation_errors():
    x = _normal(300, seed=0)
    with pytest.raises(ValueError):
        quantize_blockwise(x, map_4bit(True))
    with pytest.raises(ValueError):
        quantize_4bit(x, dynamic_map(True))
    with pytest.raises(ValueError):
        quantize_blockwise(x, dynamic_map(True), block_size=0)
    codes, absmax = quantize_blockwise(x, dynamic_map(True), 256)
    with pytest.raises(ValueError):
        dequantize_blockwise(codes, absmax, dynamic_map(True), 128, x.shape)
    with pytest.raises(ValueError):
        dequantize_blockwise(codes, absmax, dynamic_map(True), 256, (301,))
    packed, absmax = quantize_4bit(x, map_4bit(True), 128)
    with pytest.raises(ValueError):
        dequantize_4bit(packed, absmax, map_4bit(True), 128, (302,))


# --------------------------------------------------------------------------------------------
# bf16 stochastic rounding
# --------------------------------------------------------------------------------------------


def _bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns as non-negative int64."""
    return x.float().view(torch.int32).long() & 0xFFFFFFFF


def _bf16_bits(y: torch.Tensor) -> torch.Tensor:
    return _bits(y.float())


def _test_values(n: int, seed: int) -> torch.Tensor:
    """Finite fp32 values across magnitudes and signs, including fp32 subnormals."""
    g = _gen(seed)
    x = torch.randn(n, generator=g) * torch.exp(20 * torch.randn(n, generator=g))
    x[:8] = torch.tensor([1e-40, -3e-39, 1.0 + 2**-10, -(2.0**-130), 3.0e38, -3.0e38, 7.0, 0.1])
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("device", DEVICES)
def test_sr_returns_a_neighbouring_bf16(device):
    x = _test_values(20000, seed=1)
    y = bf16_stochastic_round(x.to(device), torch.Generator(device).manual_seed(0)).cpu()
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    b = _bits(x)
    down = b & 0xFFFF0000  # truncation: round toward zero
    up = down + 0x10000  # next bf16 away from zero
    yb = _bf16_bits(y)
    assert bool(((yb == down) | (yb == up)).all())
    # Both directions occur for non-representable values.
    inexact = (b & 0xFFFF) != 0
    assert (yb[inexact] == up[inexact]).any() and (yb[inexact] == down[inexact]).any()


def _reference_noise(index: int, seed: int) -> int:
    """The rounding noise of element ``index`` under ``seed``, in Python integers: the
    32-bit hash of ``quantize.bf16_noise``'s docstring, top 16 bits."""
    m = 0xFFFFFFFF
    h = (index * 0x61C88647 + seed) & m
    h ^= h >> 16
    h = (h * 0x7FEB352D) & m
    h ^= h >> 15
    h = (h * 0x7B935975) & m
    h ^= h >> 16
    return h >> 16


@pytest.mark.parametrize("n", [1000, 4097, 300_007])
def test_sr_matches_reference_with_the_hash(n):
    """Bitwise reference: one 16-bit integer r per element (row-major index j), the top bits
    of a 32-bit hash of (seed, j) with the seed drawn as ``torch.randint(0, 2**32, (1,),
    generator=g)``; the value rounds away from zero iff the dropped 16 bits plus r carry into
    bit 16. Checked on a sample of elements, across the eager path's chunks."""
    x = _test_values(n, seed=2)
    x = x.reshape(-1, 7) if n % 7 == 0 else x
    y = bf16_stochastic_round(x, _gen(123))
    seed = int(torch.randint(0, 1 << 32, (1,), dtype=torch.int64, generator=_gen(123)))
    flat_x, flat_y = x.reshape(-1), _bf16_bits(y).reshape(-1)
    n = flat_x.numel()
    sample = sorted({*range(min(n, 600)), *range(n - 50, n),
                     *torch.randint(0, n, (400,), generator=_gen(5)).tolist()})
    r = torch.tensor([_reference_noise(j, seed) for j in sample], dtype=torch.int64)
    b = _bits(flat_x[sample])
    carry = (b & 0xFFFF) + r >= 1 << 16
    expected = (b & 0xFFFF0000) + carry.long() * 0x10000
    assert torch.equal(flat_y[sample], expected)


def test_sr_noise_is_uniform_over_16_bits():
    """A chi-square test of the noise of 2^22 consecutive indices over the 65536 values, and
    of its low bit against the neighbouring index (no lattice from the index's structure)."""
    from llmvalley.optim.quantize import bf16_noise

    noise = bf16_noise(torch.arange(1 << 22), 99).long()
    counts = torch.bincount(noise, minlength=1 << 16).double()
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
    dof = (1 << 16) - 1
    assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof)
    pairs = (noise[:-1] & 1) * 2 + (noise[1:] & 1)
    counts = torch.bincount(pairs, minlength=4).double()
    assert ((counts - counts.mean()).abs() / counts.mean()).max() < 0.01


@pytest.mark.parametrize("value", [1.0 + 2.0**-10, -3.14159, 1.2345e-3, 4.56e-39, 1.3 * 2.0**-133])
def test_sr_is_unbiased(value):
    n = 200_000
    x = torch.full((n,), value, dtype=torch.float32)
    y = bf16_stochastic_round(x, _gen(7)).double()
    xv = x[0].double().item()  # the exact fp32 value being rounded
    lo = torch.tensor([xv]).float().view(torch.int32) & -(1 << 16)
    lo = lo.view(torch.float32).double().item()
    ulp = (torch.tensor([abs(lo)]).float().view(torch.int32) + (1 << 16)).view(torch.float32)
    ulp = ulp.double().item() - abs(lo)
    p = abs(xv - lo) / ulp  # exact probability of rounding away from zero
    assert 0 < p < 1
    sigma = ulp * math.sqrt(p * (1 - p) / n)
    assert abs(y.mean().item() - xv) <= 5 * sigma
    frac_up = (y.abs() > abs(lo)).double().mean().item()
    assert abs(frac_up - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_sr_agrees_in_distribution_with_torchao(torchao_optim):
    value, n = 0.7 + 3e-4, 200_000  # dropped bits are not a round fraction
    x = torch.full((n,), value)
    ours = bf16_stochastic_round(x, _gen(11)).float()
    with torch.random.fork_rng():
        torch.manual_seed(11)
        theirs = torchao_optim.qu._fp32_to_bf16_sr(x).float()
    assert set(ours.unique().tolist()) == set(theirs.unique().tolist())
    assert len(set(ours.unique().tolist())) == 2
    hi = ours.max()
    p_ours, p_theirs = (ours == hi).double().mean(), (theirs == hi).double().mean()
    p = p_theirs.item()
    assert abs(p_ours.item() - p) <= 6 * math.sqrt(2 * p * (1 - p) / n)


def test_sr_keeps_representable_values():
    g = _gen(3)
    exact = torch.randn(10000, generator=g).to(torch.bfloat16).float()
    big = torch.finfo(torch.bfloat16).max
    special = torch.tensor([0.0, -0.0, 1.0, -2.0, big, -big, 2.0**-133])
    x = torch.cat([exact, special.to(torch.bfloat16).float()])
    for seed in range(3):
        y = bf16_stochastic_round(x, _gen(seed))
        assert torch.equal(_bf16_bits(y), _bits(x))  # bitwise: also keeps the sign of -0.0


def test_sr_passes_non_finite_through():
    nan_payloads = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7F800001], dtype=torch.int32)
    x = torch.cat(
        [torch.tensor([float("inf"), float("-inf"), 1.5]), nan_payloads.view(torch.float32)]
    )
    y = bf16_stochastic_round(x, _gen(0)).float()
    assert y[0] == float("inf") and y[1] == float("-inf") and y[2] == 1.5
    assert bool(y[3:].isnan().all())


def test_sr_seeded_generator_is_deterministic():
    x = _test_values(4096, seed=4)
    a = bf16_stochastic_round(x, _gen(42))
    b = bf16_stochastic_round(x, _gen(42))
    c = bf16_stochastic_round(x, _gen(43))
    assert torch.equal(_bf16_bits(a), _bf16_bits(b))
    assert not torch.equal(_bf16_bits(a), _bf16_bits(c))


def test_sr_input_dtypes_and_layout():
    x = _normal((64, 33), seed=5)
    xb = x.to(torch.bfloat16)
    assert torch.equal(bf16_stochastic_round(xb, _gen(0)), xb)  # already bf16: unchanged
    xh = x.half()
    yh = bf16_stochastic_round(xh, _gen(0))
    assert torch.equal(yh, bf16_stochastic_round(xh.float(), _gen(0)))
    xt = x.t()  # non-contiguous
    yt = bf16_stochastic_round(xt, _gen(1))
    assert yt.shape == xt.shape
    assert torch.equal(yt, bf16_stochastic_round(xt.contiguous(), _gen(1)))
    big = _normal((128, 65), seed=6).t()  # non-contiguous, drawn three to a word
    assert torch.equal(bf16_stochastic_round(big, _gen(2)),
                       bf16_stochastic_round(big.contiguous(), _gen(2)))
    before = x.clone()
    bf16_stochastic_round(x, _gen(0))
    assert torch.equal(x, before)
    with pytest.raises(TypeError):
        bf16_stochastic_round(torch.arange(4))


@pytest.mark.parametrize("threads", [1, 2])
def test_sr_kernel_gives_the_torch_paths_bits(threads, monkeypatch):
    """The eager rounding's C++ kernel (``kernels/sr.cpp``) against the same hash in torch
    operations (the fallback where the kernel cannot be built, and what a compiled graph
    traces): the same bits, with inf, NaN of both signs, values that round up to inf, zeros,
    subnormals, on a size past one 2^17 chunk with a tail, on one and two threads."""
    from llmvalley.optim import quantize as q

    n = 300_007
    x = torch.randn(n, generator=_gen(4)) * torch.logspace(-40, 38, n)
    x[:8] = torch.tensor([float("inf"), float("-inf"), float("nan"), -float("nan"),
                          3.3895e38, -0.0, 0.0, 1e-40])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert q._sr_kernel(x) is not None
        got = q.bf16_round_with_seed(x, 2**32 - 5)
    finally:
        torch.set_num_threads(previous)
    monkeypatch.setattr(q, "_sr_kernel", lambda x: None)
    expected = q.bf16_round_with_seed(x, 2**32 - 5)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
