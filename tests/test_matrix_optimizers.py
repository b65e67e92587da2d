"""Matrix and normalized optimizers: differential tests, memory, resume, bf16, routing, errors.

Differential tests run 50 steps on the same parameters and gradients. ``muon`` is compared
with ``torch.optim.Muon`` (bit for bit when both orthogonalize in bf16, as torch always does;
at bf16 rounding level with our CPU default of fp32), ``sgd_sai`` with the official
``sgd-sai`` 1.0.3 package, and the others with the independent references in
``tests/references_matrix.py`` in float64 (exact SVD / eigh polar factors where the method
allows it, so only floating-point order differs).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llmvalley
from tests import references_matrix as refs
from tests.helpers import assert_resume_bit_exact

MINE = ["muon", "adamuon", "namo", "namo_d", "auon", "auon_hybrid", "dion", "swan", "sinkgd",
        "scale", "sgd_sai", "polargrad", "conda", "cosmos"]
MATRIX_SHAPES = [(12, 8), (8, 20), (10, 10), (6, 3, 2, 2)]
STEPS = 50


def initial(shapes, dtype=torch.float64, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def gradients(shapes, dtype=torch.float64, seed=1, steps=STEPS) -> list[list[torch.Tensor]]:
    """Random gradients with a drifting mean (like training gradients)."""
    gen = torch.Generator().manual_seed(seed)
    drift = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    return [[0.5 * d + torch.randn(s, generator=gen, dtype=dtype) for d, s in
             zip(drift, shapes)] for _ in range(steps)]


def run_optimizer(make, shapes, dtype=torch.float64, seed=None) -> list[torch.Tensor]:
    params = [p.requires_grad_(True) for p in initial(shapes, dtype)]
    if seed is not None:
        torch.manual_seed(seed)
    opt = make(params)
    for grads in gradients(shapes, dtype):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def run_reference(cls, shapes, seed=None, names=None, **hp) -> list[torch.Tensor]:
    params = initial(shapes)
    if seed is not None:
        torch.manual_seed(seed)
    ref = cls(params, names=names, **hp)
    for grads in gradients(shapes):
        ref.step([g.clone() for g in grads])
    return params


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_close(ours, theirs, rtol):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = rel_err(a, b)
        assert err <= rtol, f"tensor {i} (shape {tuple(b.shape)}): relative error {err:.3e}"


# ---- muon against torch.optim.Muon ---------------------------------------------------------
TORCH_SHAPES = [(16, 8), (8, 24), (12, 12), (16, 8)]
MUON_CASES = [
    dict(lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True),
    dict(lr=0.01, momentum=0.9, weight_decay=0.1, nesterov=False),
    dict(lr=0.003, momentum=0.95, weight_decay=0.1, nesterov=True, adjust_lr_fn="match_rms_adamw"),
]


def _ours_muon(hp, **extra):
    hp = dict(hp)
    if "adjust_lr_fn" in hp:
        hp["shape_scale"] = hp.pop("adjust_lr_fn")
    return lambda ps: llmvalley.create_optimizer("muon", ps, **hp, **extra)


@pytest.mark.parametrize("hp", MUON_CASES)
def test_muon_matches_torch_muon_bit_for_bit_in_bf16(hp):
    theirs = run_optimizer(lambda ps: torch.optim.Muon(ps, **hp), TORCH_SHAPES, torch.float32)
    ours = run_optimizer(_ours_muon(hp, ns_dtype=torch.bfloat16), TORCH_SHAPES, torch.float32)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hp", MUON_CASES)
def test_muon_fp32_default_matches_torch_muon_at_bf16_rounding_level(hp):
    """Our CPU default orthogonalizes in fp32; torch in bf16 (relative rounding 2^-8 per
    entry), so 50-step trajectories agree to about 1e-3."""
    theirs = run_optimizer(lambda ps: torch.optim.Muon(ps, **hp), TORCH_SHAPES, torch.float32)
    ours = run_optimizer(_ours_muon(hp), TORCH_SHAPES, torch.float32)
    assert_close(ours, theirs, 5e-3)


def test_muon_state_is_torch_compatible():
    """Same state key and contents as torch.optim.Muon (a checkpoint can move across)."""
    params = [p.requires_grad_(True) for p in initial(TORCH_SHAPES, torch.float32)]
    ours = llmvalley.create_optimizer("muon", params, ns_dtype=torch.bfloat16)
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    theirs = torch.optim.Muon(twins, lr=0.02, weight_decay=0.0)
    for grads in gradients(TORCH_SHAPES, torch.float32, steps=3):
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])


# ---- the rest against independent references (float64) -----------------------------------
def test_adamuon_matches_reference_with_newton_schulz():
    hp = dict(lr=6e-3, momentum=0.95, weight_decay=0.1, eps=1e-8)
    ours = run_optimizer(lambda ps: llmvalley.create_optimizer("adamuon", ps, **hp),
                         MATRIX_SHAPES)
    theirs = run_reference(refs.AdaMuonRef, MATRIX_SHAPES, **hp)
    assert_close(ours, theirs, 1e-9)


def test_adamuon_matches_reference_with_exact_polar_factor():
    hp = dict(lr=6e-3, momentum=0.9, weight_decay=0.0, eps=1e-8)
    ours = run_optimizer(
        lambda ps: llmvalley.create_optimizer("adamuon", ps, orthogonalizer="svd", **hp),
        MATRIX_SHAPES)
    theirs = run_reference(refs.AdaMuonRef, MATRIX_SHAPES, exact=True, **hp)
    assert_close(ours, theirs, 1e-9)


NAMO_HP = dict(lr=0.01, momentum=0.95, mu2=0.99, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("name,extra", [
    ("namo", {}), ("namo", dict(orthogonalizer="svd")), ("namo_d", {}),
    ("namo_d", dict(orthogonalizer="svd", col_clamp=0.5, weight_decay=0.0)),
])
def test_namo_matches_reference(name, extra):
    hp = {**NAMO_HP, **extra}
    ours = run_optimizer(lambda ps: llmvalley.create_optimizer(name, ps, **hp), MATRIX_SHAPES)
    ref_hp = {k: v for k, v in hp.items() if k != "orthogonalizer"}
    theirs = run_reference(refs.NAMORef, MATRIX_SHAPES, columnwise=name == "namo_d",
                           exact="orthogonalizer" in extra, **ref_hp)
    # NS amplifies the ~1e-16 differences of operation order (3.4x per iteration)
    assert_close(ours, theirs, 1e-9 if "orthogonalizer" in extra else 1e-8)


@pytest.mark.parametrize("hp", [dict(lr=0.24, momentum=0.95, weight_decay=0.0, gamma=1.5),
                                dict(lr=0.05, momentum=0.9, weight_decay=0.1, gamma=40.0)])
def test_auon_matches_reference(hp):
    ours = run_optimizer(lambda ps: llmvalley.create_optimizer("auon", ps, **hp),
                         MATRIX_SHAPES)
    theirs = run_reference(refs.AuONRef, MATRIX_SHAPES, **hp)
    assert_close(ours, theirs, 1e-12)


@pytest.mark.parametrize("hp", [dict(lr=0.24, momentum=0.95, weight_decay=0.0, gamma=1.5,
                                     ns_steps=1),
                                dict(lr=0.05, momentum=0.9, weight_decay=0.1, gamma=20.0,
                                     ns_steps=5)])
def test_auon_hybrid_matches_reference(hp):
    shapes = MATRIX_SHAPES[:3]  # the reference orthogonalizes 4-D kernels slice by slice
    ours = run_optimizer(lambda ps: llmvalley.create_optimizer("auon_hybrid", ps, **hp),
                         shapes)
    theirs = run_reference(refs.HybridAuONRef, shapes, **hp)
    assert_close(ours, theirs, 1e-10)


def test_auon_hybrid_defaults_to_one_newton_schulz_step():
    """The paper's single NS iteration: the first update is the cosh-braked ns5 with 1 step,
    not the 5 steps of the repository's class default."""
    spec = llmvalley.get_spec("auon_hybrid")
    assert spec.defaults["ns_steps"] == 1
    one = run_optimizer(lambda ps: llmvalley.create_optimizer("auon_hybrid", ps),
                        MATRIX_SHAPES[:1])
    five = run_optimizer(lambda ps: llmvalley.create_optimizer("auon_hybrid", ps, ns_steps=5),
                         MATRIX_SHAPES[:1])
    assert rel_err(one[0], five[0]) > 1e-3


@pytest.mark.parametrize("hp", [dict(lr=0.01, momentum=0.95, weight_decay=0.01, eps=1e-8),
                                dict(lr=0.02, momentum=0.8, weight_decay=0.0, eps=1e-8)])
def test_dion_matches_reference(hp):
    ours = run_optimizer(lambda ps: llmvalley.create_optimizer("dion", ps, **hp),
                         MATRIX_SHAPES, seed=7)
    theirs = run_reference(refs.DionRef, MATRIX_SHAPES, seed=7, **hp)
    assert_close(ours, theirs, 1e-9)


def test_dion_low_rank_keeps_rank_r_state():
    p = torch.nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
    opt = llmvalley.create_optimizer("dion", [p], rank_fraction=0.25)
    p.grad = torch.randn(12, 8, dtype=torch.float64)
    before = p.detach().clone()
    opt.step()
    assert opt.state[p]["Q"].shape == (8, 2)
    step = (before * (1 - 0.01 * 0.01) - p.detach())
    assert torch.linalg.matrix_rank(step, rtol=1e-8) == 2


def test_swan_matches_reference():
    hp = dict(lr=1e-3, weight_decay=0.1, eps=1e-8)
    ours = run_optimizer(
        lambda ps: llmvalley.create_optimizer("swan", ps, whitening="svd", **hp), MATRIX_SHAPES)
    theirs = run_reference(refs.SWANRef, MATRIX_SHAPES, **hp)
    assert_close(ours, theirs, 1e-10)


def test_swan_newton_schulz_whitening_approaches_exact_whitening():
    shapes = [(12, 8), (8, 20)]
    hp = dict(lr=1e-3, eps=1e-8)
    ours = run_optimizer(
        lambda ps: llmvalley.create_optimizer("swan", ps, ns_steps=40, **hp), shapes)
    theirs = run_reference(refs.SWANRef, shapes, **hp)
    assert_close(ours, theirs, 1e-6)


@pytest.mark.parametrize("steps", [1, 5])
def test_sinkgd_matches_reference(steps):
    hp = dict(lr=1e-3, weight_decay=0.1)
    ours = run_optimizer(
        lambda ps: llmvalley.create_optimizer("sinkgd", ps, sinkhorn_steps=steps, **hp),
        MATRIX_SHAPES)
    theirs = run_reference(refs.SinkGDRef, MATRIX_SHAPES, steps=steps, **hp)
    assert_close(ours, theirs, 1e-12)


SCALE_SHAPES = [(13, 8), (8, 8), (16, 8), (8,), (13, 8)]
SCALE_NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.0.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]


def test_scale_matches_reference_with_names():
    hp = dict(lr=1e-3, weight_decay=0.1)

    def make(ps):
        return llmvalley.create_optimizer(
            "scale", [{"params": ps, "param_names": SCALE_NAMES}], **hp)

    ours = run_optimizer(make, SCALE_SHAPES)
    # the reference's LLaMA scripts run 1-D tensors at 20x the matrix rate (our default)
    theirs = run_reference(refs.SCALERef, SCALE_SHAPES, names=SCALE_NAMES, adam_lr_ratio=20.0,
                           **hp)
    assert_close(ours, theirs, 1e-12)


def test_sgd_sai_matches_official_package():
    sgd_sai = pytest.importorskip("sgd_sai")
    shapes = [(12, 8), (7,), (3, 4, 5)]
    hp = dict(lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2)
    theirs = run_optimizer(lambda ps: sgd_sai.SGD_sai(ps, **hp), shapes)
    ours = run_optimizer(lambda ps: llmvalley.create_optimizer("sgd_sai", ps, **hp), shapes)
    assert_close(ours, theirs, 1e-12)


# ---- a LLaMA-shaped model -------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q_proj(x) @ self.k_proj(x).mT / x.shape[-1] ** 0.5, dim=-1)
        return self.o_proj(att @ self.v_proj(x))


class MLP(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.self_attn, self.mlp = Attention(d), MLP(d, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """embed_tokens, layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, norms,
    lm_head: the names the routers look for."""

    VOCAB = 17

    def __init__(self, d: int = 8, f: int = 12, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(self.VOCAB, d)
        self.layers = nn.ModuleList(Layer(d, f) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, self.VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama().to(dtype)


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, steps: int) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randint(0, TinyLlama.VOCAB, (2, 6), generator=gen)
        y = (3 * x + 1) % TinyLlama.VOCAB
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).float().reshape(-1, TinyLlama.VOCAB),
                                           y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def synthetic_steps(model: nn.Module, opt: torch.optim.Optimizer, start: int,
                    steps: int) -> None:
    """Optimizer steps on deterministic per-step gradients (no forward pass: resume checks
    only need the same gradient at the same step)."""
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(10_000 + step)
        for p in model.parameters():
            p.grad = (0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype)
        opt.step()


HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_muon_routing_on_llama_shapes():
    opt = llmvalley.create_optimizer("muon", llama())
    by_opt: dict[str, list[str]] = {}
    for g in opt.param_groups:
        by_opt.setdefault(g["optimizer"], []).extend(g["param_names"])
        if g["optimizer"] == "adamw":  # Keller's MuonWithAuxAdam settings
            assert (g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]) == (
                3e-4, (0.9, 0.95), 1e-10, 0.0)
        else:
            assert g["lr"] == 0.02
    assert sorted(by_opt["muon"]) == sorted(
        f"layers.{i}.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}.weight"
        for i in range(2) for n in HIDDEN)
    assert "embed_tokens.weight" in by_opt["adamw"] and "lm_head.weight" in by_opt["adamw"]
    assert "norm.weight" in by_opt["adamw"] and "layers.1.input_layernorm.weight" in by_opt[
        "adamw"]


def test_fallback_hparams_can_be_overridden():
    opt = llmvalley.create_optimizer("muon", llama(), fallback_hparams=dict(lr=1e-3))
    fb = [g for g in opt.param_groups if g["optimizer"] == "adamw"]
    assert fb and all(g["lr"] == 1e-3 and tuple(g["betas"]) == (0.9, 0.999) for g in fb)


def test_scale_routes_the_head_to_its_momentum_group():
    opt = llmvalley.create_optimizer("scale", llama())
    heads = [g for g in opt.param_groups if g["momentum_layer"]]
    assert len(heads) == 1 and heads[0]["param_names"] == ["lm_head.weight"]
    assert {g["optimizer"] for g in opt.param_groups} == {"scale"}


@pytest.mark.parametrize("name", MINE)
def test_state_bytes_match_registry_formula_on_llama(name):
    model = llama()
    opt = llmvalley.create_optimizer(name, model)
    train(model, opt, 0, 2)
    expected, method_state = 0, 0
    for group in opt.param_groups:
        spec = llmvalley.get_spec(group["optimizer"])
        hp = {k: group[k] for k in spec.defaults}
        for p in group["params"]:
            n = spec.state_numel(tuple(p.shape), **hp) * 4
            expected += n
            if spec.name == name and p.ndim >= 2:
                method_state += n
    assert llmvalley.state_bytes(opt) == expected
    d, f, vocab = 8, 12, TinyLlama.VOCAB
    hidden = 2 * (4 * d * d + 3 * d * f)
    expected_matrix = {
        "muon": hidden, "adamuon": 2 * hidden, "swan": 0, "sinkgd": 0, "auon": hidden,
        "auon_hybrid": hidden,
        "namo": hidden + 14, "namo_d": hidden + 2 * (6 * d + f),  # + n per matrix
        "dion": hidden + 2 * (4 * d * d + 2 * d * d + f * d),  # mn + n * min(m, n)
        "scale": vocab * d,  # the lm_head momentum only
        "sgd_sai": hidden + 14 + 2 * vocab * d + 2,  # momentum + one gsnr per tensor
        "polargrad": hidden,  # the momentum, mn per matrix
        # 2mn + min(m, n)^2 per matrix
        "conda": 2 * hidden + 2 * (4 * d * d + 3 * d * d),
        # mn + mr + r^2 + nr with r = min(64, n) = n (the input dimension)
        "cosmos": hidden + 2 * (4 * 3 * d * d + 2 * (f * d + 2 * d * d) + (d * f + 2 * f * f)),
    }[name]
    assert method_state == 4 * expected_matrix


@pytest.mark.parametrize("name", MINE)
def test_resume_is_bit_exact_on_llama(name):
    assert_resume_bit_exact(name, llama, synthetic_steps)


@pytest.mark.parametrize("name", MINE)
def test_bf16_parameters(name):
    model = llama(dtype=torch.bfloat16)
    start = [p.detach().clone() for p in model.parameters()]
    opt = llmvalley.create_optimizer(name, model)
    losses = train(model, opt, 0, 10)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # the method's own matrices move (steps below half a bf16 ulp, e.g. the fallback's
    # 3e-4 on norm gains of 1.0, round away as they must with bf16 storage)
    spec = llmvalley.get_spec(name)
    moved = [not torch.equal(p, s) for g in opt.param_groups if g["optimizer"] == name
             for p, s in zip(g["params"], [start[i] for i in _indices(model, g["params"])])
             if p.ndim >= 2 or spec.applies_to == "any"]
    assert moved and sum(moved) >= 0.5 * len(moved)
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                assert v.dtype == torch.float32


def _indices(model: nn.Module, params: list[torch.Tensor]) -> list[int]:
    ids = [id(p) for p in model.parameters()]
    return [ids.index(id(p)) for p in params]


@pytest.mark.parametrize("name", ["muon", "adamuon", "namo", "namo_d", "auon", "auon_hybrid",
                                  "dion", "swan", "sinkgd", "polargrad", "conda", "cosmos"])
def test_matrix_methods_name_the_offending_parameter(name):
    bias = nn.Parameter(torch.zeros(8))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.bias"):
        llmvalley.create_optimizer(
            name, [{"params": [bias], "param_names": ["layers.0.mlp.up_proj.bias"]}])


@pytest.mark.parametrize("name,bad", [
    ("muon", dict(shape_scale="spectral")), ("muon", dict(orthogonalizer="qr")),
    ("muon", dict(ns_steps=0)), ("muon", dict(momentum=1.0)),
    ("auon_hybrid", dict(ns_eps_form="plus")),
    ("dion", dict(rank_fraction=0.0)), ("swan", dict(whitening="eig")),
    ("sinkgd", dict(sinkhorn_steps=0)),
])
def test_invalid_hyperparameters_are_named(name, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        llmvalley.create_optimizer(name, [nn.Parameter(torch.zeros(4, 4))], **bad)


def test_conv_kernels_are_viewed_as_matrices():
    conv = nn.Conv2d(3, 6, 3)
    opt = llmvalley.create_optimizer("muon", [conv.weight], orthogonalizer="svd")
    conv.weight.grad = torch.randn_like(conv.weight)
    before = conv.weight.detach().clone()
    opt.step()
    step = (before - conv.weight.detach()).reshape(6, -1) / 0.02
    assert torch.allclose(step @ step.T, torch.eye(6), atol=1e-5)


def test_polar_express_muon_runs():
    model = llama()
    opt = llmvalley.create_optimizer("muon", model, orthogonalizer="polar_express", lr=0.01)
    losses = train(model, opt, 0, 20)
    assert sum(losses[-3:]) < sum(losses[:3])
