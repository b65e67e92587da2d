"""The low-bit CPU kernel of the fused tier (``kernels/lowbit.cpp``): adamw8bit, adamw4bit and
lion8bit in one pass per tensor, and adamw and lion with bfloat16 or float32 moments. It must
leave the foreach chain's codes, block scales and bfloat16 moments bit for bit and its
parameters to float32 rounding: 8- and 4-bit slots, bfloat16 slots (stochastic rounding with
the codec's seeds), float32 slots (also tensors under the codec's 4096 elements), partial last
blocks, an odd 4-bit count, all-zero blocks, non-finite moments, each SIMD path (AVX512, AVX2
and scalar lanes), several threads; and the tier must step aside where it cannot run.
"""

from __future__ import annotations

import pytest
import torch

import llmvalley
from llmvalley.optim import kernels
from llmvalley.optim import quantize as q
from llmvalley.optim.fused import _tables
from llmvalley.optim.spec import execution_tier
from tests.helpers import max_moved, roundtrip

#: a matrix of several 8-bit blocks with a partial last one, an odd 4-bit count above the
#: quantization threshold, a tensor quantized as one partial block, small float32-state
#: tensors (one of them 0-d)
SHAPES = [(300, 257), (4133,), (64, 64), (7, 101), (5,), ()]
CASES = [
    ("adamw8bit", {}),
    ("adamw4bit", {}),
    ("lion8bit", {"weight_decay": 0.1}),
    ("adamw8bit", {"weight_decay": 0.0, "maximize": True}),
    ("adamw8bit", {"state_precision": "int4", "betas": (0.6, 0.7)}),  # lerp's other form
    ("lion8bit", {"state_precision": "int4", "betas": (0.95, 0.98)}),
    ("adamw4bit", {"state_precision": None}),  # float32 state on the same kernel
    ("adamw", {"state_dtype": torch.bfloat16}),
    ("adamw", {"state_precision": "bf16", "betas": (0.6, 0.7), "weight_decay": 0.0}),
    ("adamw8bit", {"state_precision": "bf16"}),
    ("lion", {"state_precision": "bf16", "weight_decay": 0.1}),
    ("lion", {}),  # float32 state
    ("lion8bit", {"state_dtype": "bfloat16", "state_precision": None}),
]


def precision_of(name: str, hp: dict) -> str | None:
    """The state precision a case stores its moments in (None: float32)."""
    precision = hp.get("state_precision", llmvalley.get_spec(name).defaults.get(
        "state_precision"))
    return precision if precision is not None else hp.get("state_dtype") and "bf16"


def gradient(p: torch.Tensor, gen: torch.Generator, step: int) -> torch.Tensor:
    """Gradients over several scales, with the first 600 elements of every tensor zero for
    the first steps (blocks whose moments stay 0: absmax 0)."""
    g = torch.randn(p.shape, generator=gen) * (1e-3 if step % 2 else 1.0)
    if step < 2 and p.numel() > 600:
        g.view(-1)[:600] = 0.0
    return g


def run(name: str, implementation: str, steps: int = 6, shapes=SHAPES,
        dtype=torch.float32, **hp):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = llmvalley.create_optimizer(name, params, implementation=implementation,
                                     nonfinite="ignore", **{"lr": 1e-2, **hp})
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = gradient(p.detach(), gen, step).to(dtype)
        opt.step()
    return params, opt


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns (NaN equal to NaN of the same bits)."""
    return t.view(_BITS[t.dtype]) if t.dtype in _BITS else t


def assert_same_state(got: torch.optim.Optimizer, expected: torch.optim.Optimizer) -> int:
    """Every state tensor equal bit for bit; returns how many code tensors there were."""
    codes = 0
    for a, b in zip(got.state.values(), expected.state.values(), strict=True):
        assert a.keys() == b.keys()
        for k, v in b.items():
            if isinstance(v, torch.Tensor):
                assert a[k].dtype == v.dtype and torch.equal(bits(a[k]), bits(v)), k
                codes += v.dtype == torch.uint8
    return codes


@pytest.mark.parametrize("name, hp", CASES)
def test_kernel_leaves_the_chains_codes_and_parameters(name, hp, kernel_calls):
    expected, ref = run(name, "foreach", **hp)
    kernel_calls.clear()  # (the chain's bfloat16 rounding has a kernel of its own)
    got, opt = run(name, "fused", **hp)
    assert kernel_calls == ["lowbit"] * (6 * len(SHAPES))
    assert max_moved(expected, SHAPES) > 1e-3
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=2e-6, atol=1e-7)
    precision = precision_of(name, hp)
    slots = 1 if name.startswith("lion") else 2
    quantized = precision in ("int8", "int4")
    assert assert_same_state(opt, ref) == (3 * slots if quantized else 0)
    stored = {v.dtype for st in opt.state.values() for k, v in st.items() if k != "step"}
    assert stored == ({torch.uint8, torch.float32} if quantized else
                      {torch.bfloat16} if precision == "bf16" else {torch.float32})


@pytest.mark.parametrize("name, hp", [
    ("adamw8bit", {}), ("adamw4bit", {}), ("lion8bit", {}), ("lion", {}),
    ("adamw", {"state_dtype": torch.bfloat16}), ("lion", {"state_precision": "bf16"}),
])
def test_auto_runs_the_kernel_and_resolves_to_fused(name, hp, kernel_calls):
    spec = llmvalley.get_spec(name)
    assert execution_tier(spec, spec.resolve(hp)) == "fused"
    expected, ref = run(name, "foreach", steps=2, **hp)
    kernel_calls.clear()
    got, opt = run(name, "auto", steps=2, **hp)
    assert kernel_calls == ["lowbit"] * (2 * len(SHAPES))
    assert_same_state(opt, ref)


def test_plain_adamw_keeps_torchs_fused_kernel(kernel_calls, monkeypatch):
    """float32 moments: torch._fused_adamw_, not the low-bit kernel."""
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or real(*a, **k))
    run("adamw", "auto", steps=2)
    assert kernel_calls == [] and calls == [1, 1]


def test_non_finite_moments_round_as_the_chain_rounds(kernel_calls):
    """A NaN and an infinity in the gradients (``nonfinite="ignore"`` lets them through):
    bfloat16 moments with NaN (0xFFFF) and infinite elements, the same bits as the chain's."""
    def poisoned(name, implementation):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES[:3]]
        opt = llmvalley.create_optimizer(name, params, implementation=implementation,
                                         nonfinite="ignore", state_precision="bf16")
        for step in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
                p.grad.view(-1)[7 + step] = (float("nan"), float("inf"))[step]
            opt.step()
        return opt
    for name in ("adamw", "lion"):
        ref = poisoned(name, "foreach")
        kernel_calls.clear()
        got = poisoned(name, "fused")
        assert kernel_calls == ["lowbit"] * 6
        assert_same_state(got, ref)
        m = got.state[got.param_groups[0]["params"][0]]["exp_avg"]
        assert m.view(-1)[7].isnan() and m.view(-1)[8].isinf()


def direct_call(kernel, n: int, kind: int, mode: int, threads: int = 1) -> list[torch.Tensor]:
    """One kernel call on random state of ``n`` elements: the parameter, codes and scales
    (kind 8 or 4) or bfloat16 moments (kind 16) it leaves."""
    gen = torch.Generator().manual_seed(2)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-2
    m, v = torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-4
    if kind == 16:
        mc, vc = m.bfloat16(), v.bfloat16()
        kernel(p, g, mc, p, p, p, vc, p, p, p, n, 16, 16, 123, 0xFFFFFFFF, 0.9, 0.1, 0.999,
               0.001, 0.3, 1e-8, 1e-3, 0.99, 1, mode, threads)
        return [p, mc, vc]
    block = 256 if kind == 8 else 128
    encode = q.quantize_blockwise if kind == 8 else q.quantize_4bit
    precision = "int8" if kind == 8 else "int4"
    (mmap, mtab), (vmap, vtab) = _tables(precision, True), _tables(precision, False)
    mc, ma = encode(m, mmap, block)
    vc, va = encode(v, vmap, block)
    kernel(p, g, mc, ma, mmap, mtab, vc, va, vmap, vtab, n, kind, kind, 0, 0, 0.9, 0.1, 0.999,
           0.001, 0.3, 1e-8, 1e-3, 0.99, 1, mode, threads)
    return [p, mc, ma, vc, va]


@pytest.mark.parametrize("lanes", ["8", "1"])
def test_narrower_simd_paths_give_the_same_bits(lanes):
    """The AVX2 (8 lanes) and scalar paths of the lookups, built on this machine, against
    the default build (AVX512 here where the CPU has it): the same parameters, codes and
    scales, on sizes with tails of every length class."""
    default = kernels.load("lowbit")
    narrow = kernels.load("lowbit", (f"LLMVALLEY_LANES {lanes}",))
    assert default is not None and narrow is not None
    for n in (5003, 4096 + 13, 256 * 40):
        for kind in (8, 4):
            for mode in (0, 1):
                a = direct_call(default, n, kind, mode)
                b = direct_call(narrow, n, kind, mode)
                for x, y in zip(a, b):
                    assert torch.equal(x, y), (n, kind, mode)


def test_threads_split_blocks_without_changing_a_bit():
    kernel = kernels.load("lowbit")
    for kind in (8, 4, 16):
        one = direct_call(kernel, 300_001, kind, 0, threads=1)
        two = direct_call(kernel, 300_001, kind, 0, threads=2)
        for x, y in zip(one, two):
            assert torch.equal(x, y)


@pytest.mark.parametrize("name, hp", [
    ("adamw8bit", {}), ("adamw4bit", {}), ("lion8bit", {}),
    ("adamw", {"state_dtype": torch.bfloat16}),
])
def test_a_run_resumes_across_tiers(name, hp):
    """Three fused steps, the state saved and loaded into a foreach optimizer, three more:
    the uninterrupted foreach run's codes (or bfloat16 moments) and parameters."""
    expected, ref = run(name, "foreach", steps=6, **hp)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = llmvalley.create_optimizer(name, params, implementation="fused", nonfinite="ignore",
                                     lr=1e-2, **hp)
    grads = torch.Generator().manual_seed(1)
    for step in range(6):
        if step == 3:
            saved = roundtrip(opt.state_dict())
            opt = llmvalley.create_optimizer(name, params, implementation="foreach",
                                             nonfinite="ignore", lr=1e-2, **hp)
            opt.load_state_dict(saved)
        for p in params:
            p.grad = gradient(p.detach(), grads, step)
        opt.step()
    for g, e in zip(params, expected):
        torch.testing.assert_close(g, e, rtol=2e-6, atol=1e-7)
    assert_same_state(opt, ref)


@pytest.mark.parametrize("name, hp, dtype", [
    ("adamw8bit", {"amsgrad": True}, torch.float32),
    ("lion8bit", {}, torch.float64),
])
def test_what_the_kernel_does_not_cover_runs_the_chain(name, hp, dtype, kernel_calls):
    expected, ref = run(name, "foreach", steps=3, dtype=dtype, **hp)
    got, opt = run(name, "auto", steps=3, dtype=dtype, **hp)
    assert kernel_calls == []
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert_same_state(opt, ref)


def test_bf16_parameters_run_the_kernel_on_their_float32_working_copy(kernel_calls):
    expected, ref = run("adamw8bit", "foreach", steps=3, dtype=torch.bfloat16)
    got, opt = run("adamw8bit", "auto", steps=3, dtype=torch.bfloat16)
    assert kernel_calls == ["lowbit"] * (3 * len(SHAPES))
    for g, e in zip(got, expected):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, e, rtol=1e-2, atol=0)
    assert_same_state(opt, ref)


def test_a_state_precision_the_kernel_does_not_store_runs_the_chain(kernel_calls):
    spec = llmvalley.get_spec("adamw8bit")
    assert execution_tier(spec, spec.resolve({"state_precision": "fp16"})) == "foreach"
    assert execution_tier(spec, spec.resolve(
        {"state_precision": {"exp_avg": "int8", "exp_avg_sq": "int4"}})) == "foreach"
    adamw = llmvalley.get_spec("adamw")
    assert execution_tier(adamw, adamw.resolve({"state_precision": "int8"})) == "foreach"
    assert execution_tier(adamw, adamw.resolve({"state_dtype": torch.float16})) == "foreach"
    with pytest.raises(ValueError, match="implementation='fused'"):
        run("adamw8bit", "fused", steps=1, state_precision="fp16")
    run("adamw8bit", "auto", steps=1, state_precision="fp16")
    run("adamw", "auto", steps=1, state_dtype=torch.float16)
    assert kernel_calls == []


def test_a_missing_compiler_runs_the_chain(monkeypatch):
    expected, ref = run("adamw8bit", "foreach", steps=3)
    monkeypatch.setattr(kernels, "load", lambda name, defines=(): None)
    got, opt = run("adamw8bit", "fused", steps=3)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert_same_state(opt, ref)
