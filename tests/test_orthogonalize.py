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
    resolve_dtype,
    shape_scale,
    use_gram,
)

ortho_module = importlib.import_module("llmvalley.optim.transforms.orthogonalize")


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
@pytest.mark.parametrize("method,steps,band,floor", [
    ("newton_schulz", 5, (0.67, 1.21), 2 / 3.4445**5),
    ("newton_schulz", 10, (0.67, 1.21), 2 / 3.4445**10),
    ("polar_express", 5, (0.85, 1.15), 4e-3),
])
def test_singular_values_lie_in_documented_band(dtype, method, steps, band, floor):
    if dtype == torch.bfloat16:  # bf16 (8 mantissa bits) cannot resolve smaller ones
        floor = max(floor, 4e-3)
    for x in inputs():
        sv_in = torch.linalg.svdvals(x) / x.norm()
        out = orthogonalize(x, method, steps, dtype=dtype)
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


@pytest.mark.parametrize("shape", [(24, 80), (80, 24), (20, 20), (3, 16, 40)])
@pytest.mark.parametrize("steps", [1, 3, 5, 12])
def test_gram_newton_schulz_equals_the_standard_iteration(shape, steps):
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    standard = newton_schulz(g if g.ndim == 3 else g[None], steps, form="standard")
    gram = newton_schulz(g if g.ndim == 3 else g[None], steps, form="gram")
    torch.testing.assert_close(gram, standard, rtol=0, atol=1e-12)
    # float32 on an ill-conditioned input: the Gram matrix squares the condition number, so
    # the error grows to ~1e-4 at 5 steps (the standard form's is ~1e-6; bf16's ~1e-2), ~3e-3
    # at 12, where the standard iteration lifts singular values below sqrt(eps); the restarts
    # keep it from diverging
    hard = ill_conditioned(16, 56, 6)[None]
    truth = newton_schulz(hard, steps, form="standard")
    gram32 = newton_schulz(hard.float(), steps, form="gram").double()
    assert (gram32 - truth).abs().max() < (1e-3 if steps <= 5 else 1e-2)


def test_gram_form_with_polar_express_coefficients():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 64, generator=gen, dtype=torch.float64)
    x = x / x.norm()
    standard = ortho_module._polynomial_iterations(x, POLAR_EXPRESS_COEFFICIENTS)
    gram = ortho_module._gram_iterations(x, POLAR_EXPRESS_COEFFICIENTS)
    torch.testing.assert_close(gram, standard, rtol=0, atol=1e-12)


def test_auto_form_picks_gram_for_wide_float_matrices_only():
    from llmvalley.optim.recipes.matrix import ORTHO_DEFAULTS

    assert ORTHO_DEFAULTS["ns_form"] == "standard"  # opt-in: see the module docstring
    assert use_gram("auto", (256, 688), torch.float32)
    assert use_gram("auto", (688, 256), torch.float64)  # tall: its wide orientation
    assert not use_gram("auto", (256, 400), torch.float32)  # too square to pay off
    assert not use_gram("auto", (256, 256), torch.float32)  # square: the standard is cheaper
    assert not use_gram("auto", (256, 688), torch.bfloat16)  # bf16 stays torch.optim.Muon's
    assert use_gram("gram", (8, 8), torch.bfloat16) and not use_gram("standard", (8, 80),
                                                                     torch.float32)


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
