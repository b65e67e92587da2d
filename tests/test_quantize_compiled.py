"""The compiled codec of ``llmvalley.optim.quantize`` against the eager functions, bit for bit.

Codes, absmax and decoded values must be *equal* (``torch.equal``), not close: the compiled
kernels reproduce the eager nearest-entry rule through a per-map table built from the eager
function (:func:`_code_table`), and their only float operations are the division by the block
absmax and the decode's multiplication. The tests below check the table exhaustively where the
code changes, the kernels on data that would expose a reordered division (reciprocal-multiply),
zero, subnormal, partial and non-finite blocks, odd sizes, ties, and that one compilation per
kernel serves every size. Each kernel compiles once per process (a few seconds on 2 cores;
inductor's on-disk cache makes later runs faster).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import llmvalley
from llmvalley.optim import quantize as q
from llmvalley.optim import shell, state
from llmvalley.optim.quantize import (
    MIN_QUANTIZED_NUMEL,
    dequantize_4bit,
    dequantize_4bit_compiled,
    dequantize_blockwise,
    dequantize_blockwise_compiled,
    dynamic_map,
    map_4bit,
    quantize_4bit,
    quantize_4bit_compiled,
    quantize_blockwise,
    quantize_blockwise_compiled,
)
from llmvalley.optim.state import Codec
from llmvalley.optim.transforms.base import SlotSpec

# name: (map, eager encode, eager decode, compiled encode, compiled decode, block size)
CODECS = {
    "8bit": (dynamic_map, quantize_blockwise, dequantize_blockwise, quantize_blockwise_compiled,
             dequantize_blockwise_compiled, 256),
    "4bit": (map_4bit, quantize_4bit, dequantize_4bit, quantize_4bit_compiled,
             dequantize_4bit_compiled, 128),
}
SIGNED = [True, False]


def _table_codes(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The compiled kernel's code rule, evaluated eagerly on float32 ``x``."""
    bits = x.view(torch.int32)
    key = (bits ^ (bits >> 31)) & 0xFFFF
    entry = table[((bits >> 16) & 0xFFFF).long()]
    return ((entry >> 17) + (key >= (entry & 0x1FFFF)).int()).long()


def _eager_codes(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    return q._nearest_codes(x, qmap).long()


def _floats(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of int64 bit patterns in [0, 2^32)."""
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return bits.to(torch.int32).view(torch.float32)


def _step_buckets(table: torch.Tensor) -> torch.Tensor:
    """Top-16-bit patterns of the buckets where the code changes inside the bucket."""
    return ((table & 0x1FFFF) != 1 << 16).nonzero().flatten().long()


def _edge_values(table: torch.Tensor) -> torch.Tensor:
    """Every float32 of the buckets where the code changes inside, and both ends of every
    bucket (a code may also change between two buckets), within [-1, 1]."""
    inside = (_step_buckets(table)[:, None] << 16) | torch.arange(1 << 16)[None, :]
    top = torch.arange(1 << 16) << 16
    x = _floats(torch.cat([inside.reshape(-1), top, top | 0xFFFF]))
    return x[x.abs() <= 1]


def _assert_same(compiled, eager) -> None:
    for c, e in zip(compiled, eager):
        assert c.dtype == e.dtype and c.shape == e.shape
        assert torch.equal(c, e)


def _assert_same_or_nan(a: torch.Tensor, b: torch.Tensor) -> None:
    """NaN at the same places, equal elsewhere (a NaN's sign and payload may differ: the
    kernel's max propagates the pattern 0xFFFFFFFF where torch's eager amax gives 0x7FC00000)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(0.0, 7.0, -7.0), b.nan_to_num(0.0, 7.0, -7.0))
    assert bool(a.isnan().any())  # the test holds NaN


# --------------------------------------------------------------------------------------------
# The table (no compilation)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("signed", SIGNED)
def test_code_table_is_the_eager_code(codec, signed):
    qmap = CODECS[codec][0](signed)
    table = q._code_table(tuple(qmap.tolist()), "cpu")
    assert table is not None and table.dtype == torch.int32 and table.numel() == 1 << 16
    # each threshold (a code change) lies inside a bucket or between two: at most one each
    assert _step_buckets(table).numel() <= qmap.numel() - 1
    # every float32 of every bucket where the code changes (65536 patterns each) and the ends
    # of all buckets; then the codes of [-1, 1] change exactly once between neighbouring map
    # entries
    x = _edge_values(table).sort().values
    codes = _eager_codes(x, qmap)
    assert torch.equal(_table_codes(x, table), codes)
    assert codes.diff().tolist().count(1) == qmap.numel() - 1
    assert int(codes.diff().max()) == 1
    # both ends of every bucket, and random finite patterns of every exponent
    top = torch.arange(1 << 16) << 16
    ends = _floats(torch.cat([top, top | 0xFFFF]))
    ends = ends[ends.isfinite()]
    assert torch.equal(_table_codes(ends, table), _eager_codes(ends, qmap))
    gen = torch.Generator().manual_seed(0)
    x = _floats(torch.randint(0, 1 << 32, (1 << 20,), generator=gen))
    x = x[x.isfinite()]
    assert torch.equal(_table_codes(x, table), _eager_codes(x, qmap))
    # NaN, -0.0, 0.0: as eagerly (NaN: the next-to-last entry)
    special = torch.tensor([float("nan"), -0.0, 0.0])
    assert torch.equal(_table_codes(special, table), _eager_codes(special, qmap))


# --------------------------------------------------------------------------------------------
# The compiled kernels against the eager functions
# --------------------------------------------------------------------------------------------


def _data(n: int, signed: bool, block: int, seed: int) -> torch.Tensor:
    """Heavy-tailed state with a zero block, a subnormal block, -0.0s, and a block of map
    entries and exact midpoints (its absmax is 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) / torch.randn(n, generator=g)
    x = x * torch.exp(2.0 * torch.randn(n, generator=g))
    if not signed:
        x = x.square()
    x[block : 2 * block] = 0.0
    x[2 * block : 3 * block] *= 1e-40  # subnormal values (and their absmax)
    x[3 * block : 3 * block + 9] = -0.0
    ties = map_4bit(False)  # (i + 1) / 16: its midpoints (2i + 3) / 32 are exact
    mids = (2 * torch.arange(15, dtype=torch.float32) + 3) / 32
    special = torch.cat([torch.ones(1), mids, ties, dynamic_map(signed)[::4]])
    x[4 * block : 4 * block + special.numel()] = special if signed else special.abs()
    return x


SIZES = [4096, 4097, 5000, 40 * 256 + 77, 33 * 517, 12345]


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("signed", SIGNED)
@pytest.mark.parametrize("n", SIZES)
def test_compiled_is_bit_identical(codec, signed, n):
    make_map, enc, dec, cenc, cdec, block = CODECS[codec]
    qmap = make_map(signed)
    x = _data(n, signed, block, seed=n + signed)
    got, want = cenc(x, qmap, block), enc(x, qmap, block)
    _assert_same(got, want)
    packed, absmax = want
    shape = (n,) if n % 7 else (7, n // 7)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        out = cdec(packed, absmax, qmap, block, shape, dtype)
        assert torch.equal(out, dec(packed, absmax, qmap, block, shape, dtype))
        assert out.shape == shape and out.dtype == dtype


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("signed", SIGNED)
def test_compiled_is_exact_at_every_threshold(codec, signed):
    """Every float32 of every bucket where the code changes and the ends of every bucket (the
    ties and their neighbours included) go through the kernel with absmax 1 (scaled
    exactly): codes as eagerly."""
    make_map, enc, dec, cenc, cdec, block = CODECS[codec]
    qmap = make_map(signed)
    values = _edge_values(q._code_table(tuple(qmap.tolist()), "cpu"))
    per_block = block - 1
    values = torch.cat([values, torch.zeros(-values.numel() % per_block)])
    x = torch.cat([torch.ones(values.numel() // per_block, 1),
                   values.view(-1, per_block)], dim=1).reshape(-1)
    got, want = cenc(x, qmap, block), enc(x, qmap, block)
    _assert_same(got, want)
    assert bool((want[1] == 1).all())


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("signed", SIGNED)
def test_compiled_division_is_not_a_reciprocal_multiply(codec, signed):
    """Values whose code differs between ``x / absmax`` and ``x * (1 / absmax)``: a kernel
    that multiplied by the reciprocal would change them."""
    make_map, enc, dec, cenc, cdec, block = CODECS[codec]
    qmap = make_map(signed)
    # the thresholds: the first float32 of each code (up to the sign of -0.0)
    x = _edge_values(q._code_table(tuple(qmap.tolist()), "cpu")).sort().values
    thresholds = x[1:][_eager_codes(x, qmap).diff() == 1]
    assert thresholds.numel() == qmap.numel() - 1
    g = torch.Generator().manual_seed(1)
    scales = torch.exp(torch.empty(4000).uniform_(-20, 20, generator=g))
    x = (thresholds[None, :] * scales[:, None]).reshape(-1)
    a = scales.repeat_interleave(thresholds.numel())
    # nudge x by one ulp either way so that x / a lands on both sides of the threshold
    x = torch.cat([torch.nextafter(x, x + d) if d else x for d in (-1.0, 0.0, 1.0)])
    a = a.repeat(3)
    keep = (x.abs() <= a) & (x != 0)
    x, a = x[keep], a[keep]
    divided = _eager_codes(x / a, qmap)
    reciprocal = _eager_codes(x * (1 / a), qmap)
    sensitive = divided != reciprocal
    assert int(sensitive.sum()) >= 20  # the data can tell the two apart
    x, a = x[sensitive], a[sensitive]
    # one value per block, with its absmax as the block's first element
    blocks = torch.zeros(x.numel(), block)
    blocks[:, 0], blocks[:, 1] = a, x
    got = cenc(blocks.reshape(-1), qmap, block)
    want = enc(blocks.reshape(-1), qmap, block)
    _assert_same(got, want)
    assert torch.equal(want[1], a)


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("signed", SIGNED)
def test_compiled_non_finite_blocks_match_eager(codec, signed):
    """Garbage in, the same garbage out: blocks holding inf, -inf or NaN give the eager codes,
    and absmax and decoded values NaN where eager's are."""
    make_map, enc, dec, cenc, cdec, block = CODECS[codec]
    qmap = make_map(signed)
    x = _data(20 * block + 3, signed, block, seed=5)
    x[5 * block + 3] = float("inf")
    x[7 * block + 1] = -float("inf")
    x[9 * block + 7] = float("nan")
    x[11 * block : 12 * block] = float("nan")
    (gp, ga), (wp, wa) = cenc(x, qmap, block), enc(x, qmap, block)
    assert torch.equal(gp, wp)
    _assert_same_or_nan(ga, wa)
    out = cdec(wp, wa, qmap, block, x.shape)
    _assert_same_or_nan(out, dec(wp, wa, qmap, block, x.shape))
    _assert_same_or_nan(cdec(gp, ga, qmap, block, x.shape), out)


def test_compiled_input_layouts_and_dtypes():
    qmap = dynamic_map(True)
    x = torch.randn(96, 77)
    for xi in (x.t(), x.to(torch.bfloat16), x.double(), x[:, 5:]):
        _assert_same(quantize_blockwise_compiled(xi, qmap), quantize_blockwise(xi, qmap))
        _assert_same(quantize_4bit_compiled(xi, map_4bit(True)), quantize_4bit(xi, map_4bit(True)))
    # output owns its storage (no padding kept) and the input is not modified
    before = x.clone()
    codes, absmax = quantize_blockwise_compiled(x, qmap)
    assert codes.untyped_storage().nbytes() == x.numel() and torch.equal(x, before)
    packed, _ = quantize_4bit_compiled(x[:, 2:], map_4bit(True))
    assert packed.untyped_storage().nbytes() == (96 * 75 + 1) // 2


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_one_compilation_serves_every_size():
    """After one call of each kernel, other sizes (partial blocks, odd counts), maps and input
    layouts compile nothing more."""
    def run_all(n: int, signed: bool) -> None:
        x = torch.randn(n)
        for make_map, _, _, cenc, cdec, block in CODECS.values():
            qmap = make_map(signed)
            packed, absmax = cenc(x if signed else x.square(), qmap, block)
            cdec(packed, absmax, qmap, block, x.shape)

    before = _graphs()
    run_all(8192, True)
    assert _graphs() - before <= 4  # at most one graph a kernel (none if compiled earlier)
    before = _graphs()
    for n in (4096, 4097, 8191, 12345, 70_001, 256 * 300, 1_000_003):
        for signed in SIGNED:
            run_all(n, signed)
    assert _graphs() == before


def test_small_tensors_and_other_devices_do_not_compile(monkeypatch):
    def boom(graph):
        raise AssertionError("compiled")

    monkeypatch.setattr(q, "_compiled", boom)
    for n in (0, 1, 100, MIN_QUANTIZED_NUMEL - 1):
        x = torch.randn(n)
        for make_map, enc, dec, cenc, cdec, block in CODECS.values():
            qmap = make_map(True)
            got = cenc(x, qmap, block)
            _assert_same(got, enc(x, qmap, block))
            assert torch.equal(cdec(*got, qmap, block, x.shape), dec(*got, qmap, block, x.shape))
    x = torch.randn(MIN_QUANTIZED_NUMEL)
    with pytest.raises(AssertionError, match="compiled"):
        quantize_blockwise_compiled(x, dynamic_map(True))
    monkeypatch.setattr(q, "_use_compiled", lambda x, n: False)  # as on a CUDA tensor
    _assert_same(quantize_blockwise_compiled(x, dynamic_map(True)),
                 quantize_blockwise(x, dynamic_map(True)))


def test_validation_as_eager():
    x = torch.randn(5000)
    with pytest.raises(ValueError):
        quantize_blockwise_compiled(x, dynamic_map(True), 0)
    with pytest.raises(ValueError):
        quantize_4bit_compiled(x, dynamic_map(True))
    codes, absmax = quantize_blockwise(x, dynamic_map(True))
    with pytest.raises(ValueError):
        dequantize_blockwise_compiled(codes, absmax[:-1], dynamic_map(True), 256, x.shape)
    with pytest.raises(ValueError):
        dequantize_blockwise_compiled(codes, absmax, dynamic_map(True), 256, (5001,))


# --------------------------------------------------------------------------------------------
# Codec(compiled=True)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("role", ["signed", "unsigned"])
def test_codec_compiled_switch(precision, role):
    assert Codec("int8").compiled is False
    assert Codec("int8", compiled=True).compiled is True
    spec = SlotSpec("exp_avg", (33, 517), role)
    x = torch.randn(spec.shape)
    x = x if role == "signed" else x.square()
    stores = []
    for compiled in (False, True):
        codec = Codec(precision, compiled=compiled)
        st: dict = {}
        codec.create(st, "exp_avg", spec, torch.float32, torch.device("cpu"))
        codec.store(st, "exp_avg", spec, x)
        value, copied = codec.load(st, "exp_avg", spec, torch.float32)
        assert copied
        stores.append((st, value))
    (st0, v0), (st1, v1) = stores
    assert st0.keys() == st1.keys()
    for k in st0:
        assert torch.equal(st0[k], st1[k])
    assert torch.equal(v0, v1)
    # the quantizer caches keep eager and compiled apart
    kind = precision
    eager = state._quantizer(kind, role == "signed", torch.device("cpu"))
    comp = state._quantizer(kind, role == "signed", torch.device("cpu"), True)
    assert eager is not comp and not eager.compiled and comp.compiled
    assert eager._enc in (q.quantize_blockwise, q.quantize_4bit)
    assert comp._enc in (q.quantize_blockwise_compiled, q.quantize_4bit_compiled)


@pytest.mark.parametrize("recipe", ["adamw8bit", "adamw4bit"])
def test_low_bit_adamw_with_compiled_codec_is_bit_identical(recipe, monkeypatch):
    """The whole optimizer with every codec compiled (as the shell will wire it for the
    compiled tier) takes exactly the eager codec's steps."""
    shapes = [(64, 128), (33, 517), (10,)]

    kernel_calls = []
    run_compiled = q._run_compiled

    def counted(graph, *args):
        kernel_calls.append(graph.__name__)
        return run_compiled(graph, *args)

    def run(compiled: bool):
        if compiled:
            monkeypatch.setattr(shell, "_codec", lambda g: Codec(
                g.get("state_precision"), g.get("state_dtype"), compiled=True))
            monkeypatch.setattr(q, "_run_compiled", counted)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        # the chain's codec (auto would run the fused tier's kernel, which has its own test)
        opt = llmvalley.create_optimizer(recipe, params, lr=1e-2, weight_decay=0.1,
                                         implementation="foreach")
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        monkeypatch.undo()
        return params, opt

    (pe, oe), (pc, oc) = run(False), run(True)
    # 2 quantized tensors x 2 slots: created (encode), then each step decoded and encoded
    assert len(kernel_calls) == 4 * (1 + 2 * 6)
    for a, b in zip(pe, pc):
        assert torch.equal(a, b)
    for a, b in zip(pe, pc):
        assert oe.state[a].keys() == oc.state[b].keys()
        for key, value in oe.state[a].items():
            other = oc.state[b][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
        assert oe.state[a]["exp_avg"].dtype == torch.uint8 or a.numel() < MIN_QUANTIZED_NUMEL


@pytest.mark.parametrize("n", [100, 4096, 4097, 300_001])
def test_stochastic_rounding_traced_into_a_graph_is_bit_identical(n):
    """The compiled tier rounds bfloat16 slots inside its graph, hashing the noise there from
    a seed passed as a 0-d tensor: traced as one graph (no break), the same bits as the eager
    rounding (which hashes in chunks) for the same seed, and those of ``bf16_stochastic_round``
    whose generator drew that seed; inf, NaN, values that round up to inf and exact bf16
    values among them."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=gen) * torch.logspace(-30, 30, n)
    x[:6] = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.3895e38, 1.0, -0.0])
    seed = torch.randint(0, 1 << 32, (1,), dtype=torch.int64,
                         generator=torch.Generator().manual_seed(7))
    got = torch.compile(q.bf16_round_with_seed, fullgraph=True)(x, seed[0])
    expected = q.bf16_stochastic_round(x, torch.Generator().manual_seed(7))
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    assert torch.equal(q.bf16_round_with_seed(x, int(seed)).view(torch.int16),
                       expected.view(torch.int16))
