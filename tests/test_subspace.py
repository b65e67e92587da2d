"""Subspace and compressed-state methods: Subset-Norm / Subspace-Momentum (and SNSM), DCT-AdamW,
SMMF.

None of the references is installable here (sn-sm and SMMF are not on PyPI, DCT-AdamW's
package needs CUDA), so each method is checked against an independent reference of its paper's
update written below, in float64, over ~100 steps that cross many subspace refreshes. When the
wheel of ista-daslab-optimizers 1.1.15 is unpacked at ``$ISTA_DASLAB_UNPACKED`` (default
``/tmp/ista/unpacked``; ``pip download --no-deps ista-daslab-optimizers==1.1.15`` and unzip),
DCT-AdamW is also checked against the reference's own ``DCTAdamW``, which runs on the CPU.
"""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import llmvalley
from llmvalley.optim.transforms.subspace import (
    pack_signs,
    square_shape,
    unpack_signs,
)
from tests.helpers import make_model, roundtrip, train

F64 = torch.float64
RANK_METHODS = ("subspace_momentum", "snsm", "dct_adamw")


def grad_fn(w: torch.Tensor, step: int) -> torch.Tensor:
    """A deterministic gradient that depends on the iterate (so trajectories matter)."""
    gen = torch.Generator().manual_seed(step)
    noise = torch.randn(w.shape, generator=gen, dtype=w.dtype)
    return torch.tanh(w - 0.3) + 0.5 * noise


def run_ours(name: str, w0: torch.Tensor, steps: int, **hp) -> torch.Tensor:
    w = torch.nn.Parameter(w0.clone())
    opt = llmvalley.create_optimizer(name, [w], **hp)
    for t in range(1, steps + 1):
        w.grad = grad_fn(w.detach(), t)
        opt.step()
    return w.detach()


# ---- Subset-Norm / Subspace-Momentum -------------------------------------------------------
def project(x, basis, tall, proj_type):
    """sn-sm's projection: ``X B^T`` / ``A^T X`` (svd), selected rows / columns (topk)."""
    if proj_type == "svd":
        return x @ basis.T if tall else basis.T @ x
    return x[basis] if tall else x[:, basis]


def project_back(y, basis, tall, proj_type, shape):
    if proj_type == "svd":
        return y @ basis if tall else basis @ y
    full = torch.zeros(shape, dtype=y.dtype)
    if tall:
        full[basis] = y
    else:
        full[:, basis] = y
    return full


def ref_snsm(w0, steps, *, lr, betas, eps, weight_decay, subset, subspace, rank=None, gap=None,
             proj_type="svd"):
    """GenericOptim's update (sn-sm) from the paper: HF bias correction on the whole numerator,
    decay after the step, the momentum reset *at* each subspace change (the paper's rule)."""
    w = w0.clone()
    b1, b2 = betas
    m_rows, n_cols = w.shape
    tall = m_rows >= n_cols
    mom = v = basis = None
    for t in range(1, steps + 1):
        g = grad_fn(w, t)
        if subspace:
            if t == 1 or t % gap == 0:
                if proj_type == "svd":
                    u, _, vh = torch.linalg.svd(g, full_matrices=False)
                    basis = vh[:rank] if tall else u[:, :rank]
                else:  # topk: rows of largest norm (tall) or columns
                    basis = torch.topk(g.norm(dim=1 if tall else 0), rank).indices
                if t > 1:
                    mom = torch.zeros_like(mom)
            low = project(g, basis, tall, proj_type)
            mom = (1 - b1) * low if mom is None else b1 * mom + (1 - b1) * low
            numerator = (project_back(mom, basis, tall, proj_type, g.shape)
                         + g - project_back(low, basis, tall, proj_type, g.shape))
        else:
            mom = (1 - b1) * g if mom is None else b1 * mom + (1 - b1) * g
            numerator = mom
        sq = (g * g).sum(dim=1 if tall else 0, keepdim=True) if subset else g * g
        v = (1 - b2) * sq if v is None else b2 * v + (1 - b2) * sq
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w = w - step * numerator / (v.sqrt() + eps)
        w = w - lr * weight_decay * w
    return w


SNSM_HP = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)


@pytest.mark.parametrize("shape", [(10, 6), (5, 9)])
@pytest.mark.parametrize("name,subset,subspace,proj_type", [
    ("subset_norm", True, False, None),
    ("subspace_momentum", False, True, "svd"),
    ("snsm", True, True, "svd"),
    ("snsm", True, True, "topk"),
])
def test_snsm_matches_the_paper(shape, name, subset, subspace, proj_type):
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    extra = dict(rank=3, update_proj_gap=7, proj_type=proj_type) if subspace else {}
    ours = run_ours(name, w0, 100, **SNSM_HP, **extra)
    ref = ref_snsm(w0, 100, **SNSM_HP, subset=subset, subspace=subspace,
                   rank=extra.get("rank"), gap=extra.get("update_proj_gap"),
                   proj_type=proj_type or "svd")
    assert (ours - w0).abs().max() > 0.1  # it moved
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_subset_norm_integer_subsets():
    """subset_size=k: sums over k consecutive elements (12 x 5 = 60: k=7 -> subsets of 6)."""
    w = torch.nn.Parameter(torch.randn(12, 5, dtype=F64))
    opt = llmvalley.create_optimizer("subset_norm", [w], subset_size=7, lr=1e-2)
    w.grad = grad_fn(w.detach(), 1)
    g = w.grad.clone()
    before = w.detach().clone()
    opt.step()
    v = opt.state[w]["exp_avg_sq"]
    assert v.shape == (10, 1)
    torch.testing.assert_close(v, 0.001 * g.reshape(10, 6).square().sum(1, keepdim=True))
    denom = (v.sqrt() + 1e-6)
    step = (0.1 * g.reshape(10, 6) / denom).reshape(12, 5)
    torch.testing.assert_close(w.detach(), before - 1e-2 * math.sqrt(0.001) / 0.1 * step)


# ---- DCT-AdamW -------------------------------------------------------------------------------
def dct_matrix(n: int) -> torch.Tensor:
    """C[k, j] = sqrt(2/n) cos(pi k (2j+1) / 2n), row 0 scaled by 1/sqrt(2) (orthonormal)."""
    k = torch.arange(n, dtype=F64)
    c = math.sqrt(2 / n) * torch.cos(math.pi * torch.outer(k, 2 * k + 1) / (2 * n))
    c[0] /= math.sqrt(2)
    return c


def ref_dct(w0, steps, *, lr, betas, eps, weight_decay, rank, gap, rotate):
    """The paper's DCT-AdamW (right projection for m >= n, left otherwise)."""
    w = w0.clone()
    b1, b2 = betas
    tall = w.shape[0] >= w.shape[1]
    q = dct_matrix(min(w.shape))
    idx = mom = v = None
    for t in range(1, steps + 1):
        g = grad_fn(w, t)
        if t == 1 or t % gap == 0:
            s = g @ q if tall else q.T @ g
            new = torch.topk(s.abs().sum(dim=0 if tall else 1), rank, sorted=False).indices
            if idx is not None and rotate:
                rot = q[:, idx].T @ q[:, new] if tall else q[:, new].T @ q[:, idx]
                mom, v = (mom @ rot, (v @ rot).abs()) if tall else (rot @ mom, (rot @ v).abs())
            idx = new
        basis = q[:, idx]
        low = g @ basis if tall else basis.T @ g
        mom = (1 - b1) * low if mom is None else b1 * mom + (1 - b1) * low
        v = (1 - b2) * low**2 if v is None else b2 * v + (1 - b2) * low**2
        u = (mom / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        w = w * (1 - lr * weight_decay)
        w = w - lr * (u @ basis.T if tall else basis @ u)
    return w


DCT_HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("shape", [(12, 8), (6, 10)])
@pytest.mark.parametrize("rotate", [True, False])
def test_dct_adamw_matches_the_paper(shape, rotate):
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    ours = run_ours("dct_adamw", w0, 100, rank=3, update_proj_gap=6, rotate_subspace=rotate,
                    **DCT_HP)
    ref = ref_dct(w0, 100, rank=3, gap=6, rotate=rotate, **DCT_HP)
    assert (ours - w0).abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_dct_basis_is_orthogonal_and_makhoul_is_its_transpose():
    from llmvalley.optim.transforms.subspace import dct_basis

    q = dct_basis(16, "matmul", F64, torch.device("cpu"))
    torch.testing.assert_close(q @ q.T, torch.eye(16, dtype=F64))
    torch.testing.assert_close(dct_basis(16, "makhoul", F64, torch.device("cpu")), q.T)
    # the makhoul basis is the DCT-II one: x @ C^T is the orthonormal DCT-II of the rows
    x = torch.randn(3, 16, dtype=F64)
    n = torch.arange(16, dtype=F64)
    direct = torch.stack([(x * torch.cos(math.pi * k * (2 * n + 1) / 32)).sum(1)
                          for k in range(16)], dim=1) * math.sqrt(2 / 16)
    direct[:, 0] /= math.sqrt(2)
    torch.testing.assert_close(x @ q.T, direct)


UNPACKED = Path(os.environ.get("ISTA_DASLAB_UNPACKED", "/tmp/ista/unpacked"))


def load_reference_dct():
    """ista-daslab-optimizers' DCTAdamW, imported from the unpacked wheel without running the
    package's ``__init__`` (which imports its CUDA extensions); None when absent."""
    if not (UNPACKED / "ista_daslab_optimizers" / "fft_low_rank" / "dct_adamw.py").exists():
        return None
    if "ista_daslab_optimizers" not in sys.modules:
        pkg = types.ModuleType("ista_daslab_optimizers")
        pkg.__path__ = [str(UNPACKED / "ista_daslab_optimizers")]
        sys.modules["ista_daslab_optimizers"] = pkg
    from ista_daslab_optimizers.fft_low_rank import dct_adamw

    return dct_adamw


def fixed_rotation(self, rot, w):
    """The reference's ``rotate_subspace`` without its bug: it writes ``torch.matmul(w, R,
    out=w)``, whose output aliases its input, so the product is computed from partly
    overwritten rows (wrong on the CPU by O(1)). The paper's ``m R`` (``R m`` on the left)."""
    w.copy_(w @ rot if self.is_right_proj else rot @ w)


@pytest.mark.parametrize("shape,sim_type,rotate", [
    ((12, 8), "matmul", True), ((6, 10), "matmul", True), ((12, 8), "makhoul", True),
    ((12, 8), "matmul", False), ((6, 10), "makhoul", False),
])
def test_dct_adamw_matches_the_reference_code(shape, sim_type, rotate, monkeypatch, capsys):
    module = load_reference_dct()
    if module is None:
        pytest.skip(f"ista-daslab-optimizers 1.1.15 not unpacked at {UNPACKED}")
    # the reference builds its DCT matrix in float32; use the float64 one so the comparison
    # can be tight (both are the same matrix up to float32 rounding)
    monkeypatch.setattr(module, "dct3_matrix",
                        lambda n, dtype, device: dct_matrix(n).to(device=device, dtype=dtype))
    monkeypatch.setattr(module.FFTLowRankProjector, "rotate_subspace", fixed_rotation)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref = torch.nn.Parameter(w0.clone())
    opt = module.DCTAdamW([ref], lr=1e-2, weight_decay=0.1, rank=3, proj="dct",
                          update_proj_gap=6, rotate_subspace=rotate, sim_type=sim_type,
                          betas=(0.9, 0.999), eps=1e-8)
    for t in range(1, 101):
        ref.grad = grad_fn(ref.detach(), t)
        opt.step()
    capsys.readouterr()  # the reference prints
    ours = run_ours("dct_adamw", w0, 100, rank=3, update_proj_gap=6, sim_type=sim_type,
                    rotate_subspace=rotate, **DCT_HP)
    # makhoul: the reference takes the selected columns from its FFT, we from a matmul
    tol = 1e-10 if sim_type == "matmul" else 1e-7
    torch.testing.assert_close(ours, ref.detach(), rtol=tol, atol=tol)


def test_the_reference_rotation_bug_is_real():
    """Why the test above replaces the reference's rotation: matmul into its own input."""
    m = torch.randn(12, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    rot = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = m @ rot
    torch.matmul(m, rot, out=m)
    assert (m - expected).abs().max() > 1e-3


# ---- SMMF ------------------------------------------------------------------------------------
def ref_smmf(w0, steps, *, lr, beta, eps, weight_decay, decay_rate, growth_rate, factored=True):
    """SMMF's Algorithm (paper): square-matricize, decompress, update, NNMF-compress."""
    w = w0.clone()
    n = w.numel()
    b = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    a = n // b
    r_m = torch.zeros(a, dtype=F64)
    c_m = torch.zeros(b, dtype=F64)
    r_v, c_v = r_m.clone(), c_m.clone()
    sign = torch.zeros(a, b, dtype=torch.bool)
    m_full = v_full = torch.zeros_like(w)

    def nnmf(x):
        r, c = x.sum(1), x.sum(0)
        if a < b:
            r = r / r.sum() if r.sum() != 0 else r
        else:
            c = c / c.sum() if c.sum() != 0 else c
        return r, c

    for t in range(1, steps + 1):
        g = grad_fn(w, t)
        beta_m = beta * growth_rate ** (t - 1)
        beta_v = 1 - t**decay_rate
        if factored:
            gm = g.reshape(a, b)
            m = torch.outer(r_m, c_m)
            m = torch.where(sign, m, -m)
            v = torch.outer(r_v, c_v)
            m = beta_m * m + (1 - beta_m) * gm
            v = beta_v * v + (1 - beta_v) * gm**2
            sign = m > 0
            r_m, c_m = nnmf(m.abs())
            r_v, c_v = nnmf(v)
            u = (m / (v.sqrt() + eps)).reshape(w.shape)
        else:
            m_full = beta_m * m_full + (1 - beta_m) * g
            v_full = beta_v * v_full + (1 - beta_v) * g**2
            u = m_full / (v_full.sqrt() + eps)
        w = w * (1 - lr * weight_decay)
        w = w - lr * u
    return w


SMMF_HP = dict(lr=1e-2, eps=1e-8, weight_decay=0.1, decay_rate=-0.8, growth_rate=0.999)


@pytest.mark.parametrize("shape", [(12, 10), (7,), (3, 4, 5), ()])
def test_smmf_matches_the_paper(shape):
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    ours = run_ours("smmf", w0, 100, betas=(0.9,), **SMMF_HP)
    ref = ref_smmf(w0, 100, beta=0.9, **SMMF_HP)
    assert (ours - w0).abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_smmf_without_vector_reshape_keeps_full_vector_moments():
    w0 = torch.randn(9, generator=torch.Generator().manual_seed(5), dtype=F64)
    ours = run_ours("smmf", w0, 50, betas=(0.9,), vector_reshape=False, **SMMF_HP)
    torch.testing.assert_close(ours, ref_smmf(w0, 50, beta=0.9, factored=False, **SMMF_HP),
                               rtol=1e-10, atol=1e-10)


def test_sign_bits_round_trip():
    for n in (1, 31, 32, 33, 100):
        bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
        bits[-1] = True  # bit 31 of a full word: the int32 sign bit
        for dtype in (torch.float32, F64):
            words = torch.zeros(-(-n // 32), dtype=dtype)
            pack_signs(bits, words)
            assert torch.equal(unpack_signs(words, n), bits)
    assert square_shape(120) == (12, 10) and square_shape(49) == (7, 7)
    assert square_shape(13) == (13, 1)


# ---- memory ----------------------------------------------------------------------------------
def state_bytes_of(name: str, shape, **hp) -> int:
    w = torch.nn.Parameter(torch.randn(shape))
    opt = llmvalley.create_optimizer(name, [w], **hp)
    w.grad = torch.randn(shape)
    opt.step()
    return llmvalley.state_bytes(opt)


@pytest.mark.parametrize("m,n", [(40, 24), (24, 40)])
def test_state_bytes_follow_each_papers_memory(m, n):
    r, big, small = 4, max(m, n), min(m, n)
    # SN: full first moment + one second moment per row/column of the long side
    assert state_bytes_of("subset_norm", (m, n)) == 4 * (m * n + big)
    # SM (SVD): momentum r x long side + the r x short side basis, Adam's full v
    assert state_bytes_of("subspace_momentum", (m, n), rank=r) == 4 * (r * big + r * small
                                                                        + m * n)
    # SNSM: r x long + basis + max(m, n): the paper's "more than 80% below Adam"
    snsm = state_bytes_of("snsm", (m, n), rank=r)
    assert snsm == 4 * (r * big + r * small + big)
    # SNSM with top-k rows/columns: momentum r x short side + r indices
    assert state_bytes_of("snsm", (m, n), rank=r, proj_type="topk") == 4 * (r * small + r + big)
    # DCT-AdamW: Adam's two moments r x long side and only the r selected indices
    assert state_bytes_of("dct_adamw", (m, n), rank=r) == 4 * (2 * r * big + r)


def test_smmf_state_is_one_bit_per_element_plus_factors():
    a, b = square_shape(4096 * 3)
    assert (a, b) == (128, 96)
    # sign: 1 bit per element (a*b/8 bytes); four factor vectors of a and b floats
    assert state_bytes_of("smmf", (64, 192)) == a * b // 8 + 4 * 2 * (a + b)
    assert state_bytes_of("smmf", (64, 192)) < 0.05 * 8 * 64 * 192  # Adam: 8 bytes/param


# ---- resume, random subspaces ----------------------------------------------------------------
RESUME_CASES = [
    ("subspace_momentum", dict(rank=2, update_proj_gap=5, proj_type="uniform", seed=3)),
    ("snsm", dict(rank=2, update_proj_gap=5)),
    ("snsm", dict(rank=2, update_proj_gap=5, proj_type="topk")),
    ("dct_adamw", dict(rank=2, update_proj_gap=5)),
    ("smmf", {}),
]


@pytest.mark.parametrize("name,hp", RESUME_CASES)
def test_resume_across_a_subspace_change_is_bit_exact(name, hp):
    def make():
        return torch.nn.Parameter(torch.randn(9, 6, generator=torch.Generator().manual_seed(6)))

    def run(w, opt, start, stop):
        for t in range(start, stop):
            w.grad = grad_fn(w.detach(), t)
            opt.step()

    straight = make()
    run(straight, llmvalley.create_optimizer(name, [straight], lr=1e-2, **hp), 1, 13)
    w = make()
    opt = llmvalley.create_optimizer(name, [w], lr=1e-2, **hp)
    run(w, opt, 1, 8)  # the subspace changes at step 10, after the checkpoint
    ckpt = roundtrip({"w": w.detach().clone(), "opt": opt.state_dict()})
    resumed = torch.nn.Parameter(ckpt["w"])
    opt2 = llmvalley.create_optimizer(name, [resumed], lr=1e-2, **hp)
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, 8, 13)
    assert torch.equal(resumed.detach(), straight.detach())


def test_uniform_subspaces_are_seeded_and_change_on_schedule():
    def indices(seed, steps):
        w = torch.nn.Parameter(torch.randn(12, 6))
        opt = llmvalley.create_optimizer("subspace_momentum", [w], rank=2, update_proj_gap=4,
                                         proj_type="uniform", seed=seed)
        seen = []
        for t in range(1, steps + 1):
            w.grad = grad_fn(w.detach(), t)
            opt.step()
            seen.append(tuple(opt.state[w]["indices"].tolist()))
        return seen

    a, b, c = indices(0, 9), indices(0, 9), indices(1, 9)
    assert a == b and a != c
    assert a[0] == a[2] and a[3] != a[2] and a[3] == a[6] and a[7] != a[6]  # t = 4, 8


# ---- models, bf16 ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["subset_norm", "subspace_momentum", "snsm", "dct_adamw",
                                  "smmf"])
def test_trains_tiny_lm_in_fp32_and_bf16(name):
    hp = dict(rank=4) if name in RANK_METHODS else {}
    lr = 1e-2 if name in ("smmf", "subspace_momentum") else 3e-2
    ref = make_model(dtype=torch.bfloat16).float()
    ref_losses = train(ref, llmvalley.create_optimizer(name, ref, lr=lr, **hp), 0, 30)
    model = make_model(dtype=torch.bfloat16)
    opt = llmvalley.create_optimizer(name, model, lr=lr, **hp)
    losses = train(model, opt, 0, 30)
    assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref_end, end = sum(ref_losses[-5:]) / 5, sum(losses[-5:]) / 5
    assert ref_end < 0.8 * ref_losses[0]
    assert abs(end - ref_end) < 0.05 * ref_losses[0]


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RANK_METHODS)
def test_rank_at_or_above_the_smaller_side_is_refused_naming_the_parameter(name):
    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    opt = llmvalley.create_optimizer(name, model, rank=4)
    model[0].weight.grad = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"rank=4 .*0\.weight.*4 x 6"):
        opt.step()
    with pytest.raises(ValueError, match="rank=4"):
        llmvalley.state_bytes(llmvalley.create_optimizer(name, model, rank=4))


@pytest.mark.parametrize("name,key,value", [
    ("subset_norm", "subset_size", 0),
    ("subset_norm", "subset_size", "rows"),
    ("subset_norm", "betas", (0.9,)),
    ("snsm", "rank", 0),
    ("snsm", "update_proj_gap", 1.5),
    ("snsm", "proj_type", "srht"),
    ("subspace_momentum", "seed", "zero"),
    ("dct_adamw", "rank", -1),
    ("dct_adamw", "sim_type", "fft"),
    ("dct_adamw", "ell_norm", 0),
    ("dct_adamw", "rotate_subspace", 1),
    ("smmf", "betas", (0.9, 0.999)),
    ("smmf", "decay_rate", 0.5),
    ("smmf", "growth_rate", 1.5),
    ("smmf", "vector_reshape", "yes"),
    ("smmf", "weight_decay_mode", "l2"),
])
def test_bad_hyperparameters_are_named(name, key, value):
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=key):
        llmvalley.create_optimizer(name, [w], **{key: value})


@pytest.mark.parametrize("name", ["subset_norm", "snsm", "dct_adamw"])
def test_matrix_methods_refuse_vectors(name):
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        llmvalley.create_optimizer(name, [torch.nn.Parameter(torch.randn(5))])


def test_smmf_weight_decay_mode_adam_is_coupled():
    w0 = torch.randn(4, 4, dtype=F64)
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone())
    coupled = llmvalley.create_optimizer("smmf", [a], weight_decay=0.5,
                                         weight_decay_mode="adam")
    plain = llmvalley.create_optimizer("smmf", [b], weight_decay=0.0)
    g = torch.randn(4, 4, dtype=F64)
    a.grad, b.grad = g.clone(), g + 0.5 * w0
    coupled.step()
    plain.step()
    torch.testing.assert_close(a.detach(), b.detach())
