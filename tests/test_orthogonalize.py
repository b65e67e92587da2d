"""Orthogonalizers, normalizations and scale conventions (transforms/orthogonalize.py,
transforms/normalize.py)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from llmvalley.optim.transforms.normalize import (
    inverse_sqrt_newton_schulz,
    sinkhorn_normalize,
    standardize_rows,
    whiten,
)
from llmvalley.optim.transforms.orthogonalize import (
    NS_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    matrix_view,
    newton_schulz,
    orthogonalize,
    orthogonalize_matrices,
    resolve_dtype,
    resolve_form,
    shape_scale,
    symmetric_product,
)

ortho_module = importlib.import_module("llmvalley.optim.transforms.orthogonalize")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocked symmetric products and chunked batches at test sizes: 8-row blocks (so from 24
    rows on) and chunks of two matrices."""
    monkeypatch.setattr(ortho_module, "SYM_BLOCK", 8)
    monkeypatch.setattr(ortho_module, "NS_CHUNK_BYTES", 1)


def ill_conditioned(m: int, n: int, decades: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    k = min(m, n)
    s = torch.logspace(0, -decades, k, dtype=torch.float64)
    return (u[:, :k] * s) @ v[:, :k].T


def inputs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(64, 32, generator=gen, dtype=torch.float64),
            torch.randn(24, 80, generator=gen, dtype=torch.float64),
            ill_conditioned(48, 48, 2), ill_conditioned(40, 24, 5), ill_conditioned(16, 56, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,steps,band,floor,form", [
    ("newton_schulz", 5, (0.67, 1.21), 2 / 3.4445**5, "standard"),
    ("newton_schulz", 5, (0.67, 1.21), 2 / 3.4445**5, "symmetric"),
    ("newton_schulz", 5, (0.67, 1.21), 2 / 3.4445**5, "gram"),
    ("newton_schulz", 10, (0.67, 1.21), 2 / 3.4445**10, "standard"),
    ("newton_schulz", 10, (0.67, 1.21), 2 / 3.4445**10, "gram"),
    ("polar_express", 5, (0.85, 1.15), 4e-3, "standard"),
])
def test_singular_values_lie_in_documented_band(dtype, method, steps, band, floor, form,
                                                small_blocks):
    if dtype == torch.bfloat16:  # bf16 (8 mantissa bits) cannot resolve smaller ones
        floor = max(floor, 4e-3)
    for x in inputs():
        sv_in = torch.linalg.svdvals(x) / x.norm()
        out = orthogonalize(x, method, steps, dtype=dtype, form=form)
        assert out.dtype == dtype and out.shape == x.shape
        # singular vectors are preserved, so match output singular values to the input's
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        sv_out = torch.diagonal(u.T @ out.double() @ vh.T)
        covered = sv_in >= floor
        assert covered.any()
        lo, hi = band
        assert sv_out[covered].min() >= lo and sv_out[covered].max() <= hi, (
            f"{tuple(x.shape)}: [{sv_out[covered].min():.3f}, {sv_out[covered].max():.3f}]")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_svd_mode_is_the_exact_polar_factor(dtype, tol):
    # fp32 only on the well-conditioned inputs (U V^T of 1e-8-small directions is noise there)
    for x in inputs() if dtype == torch.float64 else inputs()[:3]:
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        out = orthogonalize(x.to(dtype), "svd", dtype=dtype)
        assert (out.double() - u @ vh).norm() / math.sqrt(min(x.shape)) < tol


def test_svd_mode_zeroes_the_null_space():
    x = torch.randn(6, 1, dtype=torch.float64) @ torch.randn(1, 9, dtype=torch.float64)
    out = orthogonalize(x, "svd")
    assert torch.allclose(torch.linalg.svdvals(out), torch.tensor([1.0, 0, 0, 0, 0, 0],
                                                                  dtype=torch.float64),
                          atol=1e-12)


def test_newton_schulz_matches_torch_muon_bitwise_in_bf16():
    gen = torch.Generator().manual_seed(2)
    for shape in [(32, 16), (16, 48), (20, 20)]:
        g = torch.randn(shape, generator=gen)
        ours = orthogonalize(g, "newton_schulz", 5, NS_COEFFICIENTS, 1e-7, torch.bfloat16)
        theirs = _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7)
        assert torch.equal(ours, theirs)


def test_batched_equals_per_matrix_and_tall_is_transposed_wide():
    gen = torch.Generator().manual_seed(3)
    batch = torch.randn(4, 12, 7, generator=gen, dtype=torch.float64)
    out = orthogonalize(batch, "newton_schulz", 5)
    for b in range(4):
        single = orthogonalize(batch[b], "newton_schulz", 5)
        assert torch.allclose(out[b], single, rtol=0, atol=1e-14)
        assert torch.allclose(single, orthogonalize(batch[b].T, "newton_schulz", 5).T,
                              rtol=0, atol=1e-14)


@pytest.mark.parametrize("form", ["symmetric", "gram"])
@pytest.mark.parametrize("shape", [(24, 80), (80, 24), (32, 32), (3, 32, 56), (3, 56, 32)])
@pytest.mark.parametrize("steps", [1, 3, 5, 12])
def test_ns_forms_equal_the_standard_iteration(form, shape, steps, small_blocks):
    """Blocked (8-row blocks) and chunked (2 matrices) in float64: the same iteration."""
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    batch = g if g.ndim == 3 else g[None]
    standard = newton_schulz(batch, steps, form="standard")
    torch.testing.assert_close(newton_schulz(batch, steps, form=form), standard, rtol=0,
                               atol=1e-12)
    if form == "symmetric":
        return
    # float32 on an ill-conditioned input: the Gram matrix squares the condition number, so
    # the error grows to ~1e-4 at 5 steps (the standard form's is ~1e-6; bf16's ~1e-2), ~3e-3
    # at 12, where the standard iteration lifts singular values below sqrt(eps); the restarts
    # keep it from diverging
    hard = ill_conditioned(16, 56, 6)[None]
    truth = newton_schulz(hard, steps, form="standard")
    gram32 = newton_schulz(hard.float(), steps, form="gram").double()
    assert (gram32 - truth).abs().max() < (1e-3 if steps <= 5 else 1e-2)


def test_symmetric_product_multiplies_only_the_lower_blocks(small_blocks, monkeypatch):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 28, 40, generator=gen, dtype=torch.float64)  # 28 rows: blocks 8, 8, 8, 4
    a = x @ x.mT
    b = a @ a @ a + a  # a polynomial in a: commutes with it
    plain = {"gram": x @ x.mT, "product": a @ b, "poly": 0.5 * a + 2.0 * a @ a,
             "commuting": -1.5 * b + a @ b}
    calls = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            calls.append(tuple(args[-2].shape) if fn is torch_bmm else tuple(args[1].shape))
            return fn(*args, **kwargs)
        return wrapped

    torch_bmm, torch_baddbmm = torch.bmm, torch.baddbmm
    monkeypatch.setattr(torch, "bmm", spy(torch_bmm))
    monkeypatch.setattr(torch, "baddbmm", spy(torch_baddbmm))
    blocked = {"gram": symmetric_product(x, x, transpose_b=True),
               "product": symmetric_product(a, b),
               "poly": symmetric_product(a, a, c=a, alpha=2.0, beta=0.5),
               "commuting": symmetric_product(a, b, c=b, beta=-1.5)}
    # each product: one multiply per column block, with the rows from the block down
    assert [c[1] for c in calls] == [28, 20, 12, 4] * 4
    for key, value in blocked.items():
        torch.testing.assert_close(value, plain[key], rtol=0, atol=1e-12 * plain[key].abs().max())
        off_block = torch.ones(28, 28, dtype=torch.bool).triu(8)
        assert torch.equal(value[:, off_block], value.mT[:, off_block])  # mirrored exactly
    calls.clear()
    symmetric_product(x[:, :16], x[:, :16], transpose_b=True)  # 2 blocks: one plain product
    assert calls == [(2, 16, 40)]
    assert symmetric_product(x, x, transpose_b=True, blocked=False).equal(x @ x.mT)


def test_blocked_forms_are_as_accurate_as_the_standard_one_in_bf16(small_blocks):
    """Against the float64 iteration: ``"symmetric"`` within rounding of the standard form's
    error (a X stays out of the bf16 product), ``"gram"`` within 2x on wide inputs (its ``a``
    also stays out of the bf16 ``Q``, ``R`` updates: folded, wide Gaussian errors grew to
    ~2.3x), and less than that on ill-conditioned ones."""
    gen = torch.Generator().manual_seed(7)
    cases = {"gaussian": torch.randn(2, 48, 128, generator=gen, dtype=torch.float64),
             "ill-conditioned": ill_conditioned(48, 128, 4)[None],
             "square": torch.randn(2, 48, 48, generator=gen, dtype=torch.float64)}
    for name, g in cases.items():
        truth = newton_schulz(g, 5)
        err = {form: (newton_schulz(g.float(), 5, dtype=torch.bfloat16, form=form).double()
                      - truth).abs().max().item() for form in ("standard", "symmetric", "gram")}
        assert err["symmetric"] <= 1.1 * err["standard"], (name, err)
        if name != "square":  # auto keeps square matrices out of the Gram form
            assert err["gram"] <= 2.0 * err["standard"], (name, err)


@pytest.mark.parametrize("form", ["standard", "symmetric", "gram", "auto"])
def test_orthogonalize_matrices_batches_by_shape_in_chunks(form, small_blocks):
    """The optimizers' path (stacked per shape in chunks, cast back) gives each matrix's own
    Newton-Schulz result, in its dtype and shape."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(24, 40), (40, 24), (24, 40), (32, 32), (40, 24), (24, 40), (40, 24), (6, 10)]
    mats = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    group = dict(orthogonalizer="newton_schulz", ns_steps=5, ns_eps=1e-7, ns_dtype=None,
                 ns_form=form, ns_eps_form="add")
    outs = orthogonalize_matrices(mats, group)
    for m, o in zip(mats, outs):
        assert o.shape == m.shape and o.dtype == m.dtype
        single = newton_schulz(m[None], 5, eps_form="add", form=form)[0]
        torch.testing.assert_close(o, single, rtol=0, atol=1e-13)
    group["ns_dtype"] = torch.float32  # computed in float32, returned in float64
    for m, o in zip(mats, orthogonalize_matrices(mats, group)):
        assert o.dtype == torch.float64
        # float32 rounding apart (a tall matrix is normalised after its transposing copy)
        torch.testing.assert_close(o, newton_schulz(m[None], 5, dtype=torch.float32,
                                                    eps_form="add", form=form)[0].double(),
                                   rtol=0, atol=1e-5)


def test_standard_form_stays_torch_muon_bit_for_bit_in_chunks(small_blocks):
    gen = torch.Generator().manual_seed(9)
    mats = [torch.randn(s, generator=gen) for s in [(32, 16)] * 3 + [(16, 48)] * 2 + [(24, 24)]]
    group = dict(orthogonalizer="newton_schulz", ns_steps=5, ns_eps=1e-7,
                 ns_dtype=torch.bfloat16, ns_form="standard")
    for m, o in zip(mats, orthogonalize_matrices(mats, group)):
        assert torch.equal(o, _zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7).float())


def test_gram_form_with_polar_express_coefficients():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 64, generator=gen, dtype=torch.float64)
    x = x / x.norm()
    standard = ortho_module._polynomial_iterations(x, POLAR_EXPRESS_COEFFICIENTS)
    gram = ortho_module._gram_iterations(x, POLAR_EXPRESS_COEFFICIENTS)
    torch.testing.assert_close(gram, standard, rtol=0, atol=1e-12)


def test_auto_form_picks_gram_for_wide_matrices_and_symmetric_otherwise():
    assert resolve_form("auto", (256, 688), torch.float32) == "gram"
    assert resolve_form("auto", (688, 256), torch.float64) == "gram"  # tall: its wide side
    assert resolve_form("auto", (256, 688), torch.bfloat16) == "gram"  # as accurate (above)
    assert resolve_form("auto", (256, 384), torch.bfloat16) == "gram"  # aspect 1.5
    assert resolve_form("auto", (256, 320), torch.float32) == "symmetric"  # too square
    assert resolve_form("auto", (256, 256), torch.float32) == "symmetric"
    for form in ("standard", "symmetric", "gram"):
        assert resolve_form(form, (8, 80), torch.float32) == form
    assert resolve_form("gram", (8, 8), torch.bfloat16) == "gram"
    assert resolve_form("symmetric", (8, 80), torch.float32) != "gram"
    # blocks only on CPU and from three blocks on
    assert ortho_module._block_rows(512, torch.device("cpu")) == ortho_module.SYM_BLOCK
    assert ortho_module._block_rows(256, torch.device("cpu")) == 0
    assert ortho_module._block_rows(512, torch.device("meta")) == 0


def test_muon_rejects_an_unknown_ns_form():
    import llmvalley

    with pytest.raises(ValueError, match="ns_form"):
        llmvalley.create_optimizer("muon", [torch.nn.Parameter(torch.randn(4, 4))],
                                   ns_form="fast")


def test_cpu_precision_rule(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("LLMVALLEY_CPU_BF16", "1")
    assert resolve_dtype(None, cpu, torch.float32) == torch.bfloat16
    assert resolve_dtype(None, cpu, torch.float64) == torch.float64  # tests stay float64
    monkeypatch.setenv("LLMVALLEY_CPU_BF16", "0")
    assert resolve_dtype(None, cpu, torch.float32) == torch.float32
    assert resolve_dtype("float16", cpu, torch.float32) == torch.float16  # forced
    monkeypatch.delenv("LLMVALLEY_CPU_BF16")
    monkeypatch.setattr(ortho_module, "_CPU_BF16", None)
    first = ortho_module.cpu_has_native_bf16()  # the probe: a bool, cached
    assert isinstance(first, bool) and ortho_module._CPU_BF16 is first
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        assert first is False  # no bf16 instructions: no probe needed


def test_conv_kernels_flatten_trailing_dims_and_vectors_are_rejected():
    k = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    assert matrix_view(k).shape == (8, 27)
    with pytest.raises(ValueError, match="bias of layer 3"):
        matrix_view(torch.randn(8), "bias of layer 3")


def test_shape_scale_conventions():
    assert shape_scale("keller", (1024, 256)) == 2.0
    assert shape_scale("keller", (256, 1024)) == 1.0
    assert shape_scale("original", (256, 1024)) == 1.0
    assert shape_scale("moonlight", (256, 1024)) == pytest.approx(0.2 * 32)
    assert shape_scale("match_rms_adamw", (1024, 256)) == pytest.approx(0.2 * 32)
    assert shape_scale("dion", (256, 1024)) == 0.5
    assert shape_scale("keller", (64, 16, 2, 2)) == 1.0  # viewed as (64, 64)
    with pytest.raises(ValueError, match="unknown shape_scale"):
        shape_scale("spectral", (4, 4))


def test_coupled_newton_schulz_whitening_converges_to_polar_factor():
    gen = torch.Generator().manual_seed(4)
    for shape in [(12, 40), (40, 12)]:
        x = standardize_rows(torch.randn(shape, generator=gen, dtype=torch.float64))[None]
        exact = whiten(x, "svd")
        approx = whiten(x, "newton_schulz", 30)
        assert (approx - exact).norm() / exact.norm() < 1e-7
    a = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    a = (a @ a.T)[None]
    z = inverse_sqrt_newton_schulz(a, 40)
    assert torch.allclose(z @ a @ z, torch.eye(5, dtype=torch.float64)[None], atol=1e-10)


def test_standardize_rows_and_sinkhorn_normalize():
    gen = torch.Generator().manual_seed(5)
    x = 3 + 2 * torch.randn(6, 50, generator=gen, dtype=torch.float64)
    s = standardize_rows(x, eps=0.0)
    assert torch.allclose(s.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.square().mean(1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    y = sinkhorn_normalize(torch.randn(2, 6, 10, generator=gen, dtype=torch.float64), 50)
    # after the final column step columns have norm sqrt(m); rows converge to sqrt(n)
    assert torch.allclose(y.norm(dim=-2), torch.full((2, 10), math.sqrt(6),
                                                     dtype=torch.float64))
    assert torch.allclose(y.norm(dim=-1), torch.full((2, 6), math.sqrt(10),
                                                     dtype=torch.float64), atol=1e-6)
