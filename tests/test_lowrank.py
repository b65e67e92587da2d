"""GaLore, Fira, APOLLO, APOLLO-Mini, FRUGAL and Online Subspace Descent.

Differential tests run ~100 float64 steps on tall, wide and square matrices with a small
``update_proj_gap``, so several projector refreshes are covered:

- ``galore``, ``fira``, ``apollo``, ``apollo_mini`` against the installed PyPI references
  (galore-torch 1.0, fira 1.0.2, apollo-torch 1.0.3). galore-torch and fira cast every
  non-float32 gradient to float32 for their SVD; the tests give their projector modules a
  ``torch`` whose ``float`` is float64 (:class:`Float64Native`), so the SVD runs in float64
  like ours and the comparison is at float64 rounding. APOLLO needs no patch: both sides draw
  its projections in float32 from the same seeds (1, 2, ... by position, advanced by
  ``next_seed`` at each refresh), so the random stream is the reference's, bit for bit.
- ``frugal`` and ``online_subspace_descent`` against independent references written here from
  the official code's equations (:class:`FrugalRef`, :class:`OSDRef`; OSD's projector
  gradient by autograd and its step by ``torch.optim.AdamW``, as the reference does).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import llmvalley
from llmvalley.models import build_model, model_config
from tests.helpers import roundtrip
from tests.test_matrix_optimizers import (
    assert_close,
    gradients,
    initial,
    llama,
    synthetic_steps,
    train,
)

NAMES = ["galore", "fira", "apollo", "apollo_mini", "frugal", "online_subspace_descent"]
SHAPES = [(12, 8), (8, 20), (10, 10)]
STEPS = 100
#: small-model settings (the defaults' rank 128 is for LLaMA-60M's 512-wide matrices)
SMALL = {"galore": dict(rank=2), "fira": dict(rank=2), "apollo": dict(rank=2),
         "apollo_mini": {}, "frugal": {}, "online_subspace_descent": dict(rank=2)}


class Float64Native:
    """Stands in for ``torch`` inside a reference projector module: ``torch.float`` is float64
    there, so the reference keeps float64 gradients in float64 for its SVD."""

    float = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def run_ours(name: str, shapes, steps: int = STEPS, **hp) -> list[torch.Tensor]:
    params = [p.requires_grad_(True) for p in initial(shapes)]
    opt = llmvalley.create_optimizer(name, params, **hp)
    for grads in gradients(shapes, steps=steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def run_torch_reference(make, shapes, steps: int = STEPS) -> list[torch.Tensor]:
    params = [p.requires_grad_(True) for p in initial(shapes)]
    opt = make(params)
    for grads in gradients(shapes, steps=steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def run_plain_reference(ref, shapes, steps: int = STEPS) -> list[torch.Tensor]:
    params = initial(shapes)
    state = [ref.new_state() for _ in params]
    for grads in gradients(shapes, steps=steps):
        for i, (p, g) in enumerate(zip(params, grads)):
            ref.update(p, g.clone(), state[i], i)
    return params


# ---- GaLore --------------------------------------------------------------------------------
GALORE_CASES = [
    dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=3, update_proj_gap=25,
         scale=0.25),
    dict(lr=0.003, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, rank=2, update_proj_gap=7,
         scale=1.0),
]


@pytest.mark.parametrize("hp", GALORE_CASES)
def test_galore_matches_galore_torch(hp, monkeypatch):
    from galore_torch import GaLoreAdamW, galore_projector

    monkeypatch.setattr(galore_projector, "torch", Float64Native())
    ours = run_ours("galore", SHAPES, **hp)
    theirs = run_torch_reference(lambda ps: GaLoreAdamW(
        [{"params": ps, "rank": hp["rank"], "update_proj_gap": hp["update_proj_gap"],
          "scale": hp["scale"], "proj_type": "std"}], lr=hp["lr"], betas=hp["betas"],
        eps=hp["eps"], weight_decay=hp["weight_decay"], no_deprecation_warning=True), SHAPES)
    assert_close(ours, theirs, 1e-10)


def test_galore_refreshes_the_basis_on_the_pre_increment_schedule():
    """Steps 1, 1 + gap, ...: the stored basis is the SVD of that step's gradient."""
    p = nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
    opt = llmvalley.create_optimizer("galore", [p], rank=3, update_proj_gap=3)
    gen = torch.Generator().manual_seed(0)
    bases = []
    for step in range(1, 8):
        g = torch.randn(12, 8, generator=gen, dtype=torch.float64)
        p.grad = g
        opt.step()
        bases.append(opt.state[p]["ortho_matrix"].clone())
        if step in (1, 4, 7):
            vh = torch.linalg.svd(g, full_matrices=False)[2][:3]
            torch.testing.assert_close(bases[-1], vh, rtol=0, atol=1e-12)
    assert torch.equal(bases[0], bases[2]) and not torch.equal(bases[2], bases[3])
    assert torch.equal(bases[3], bases[5]) and not torch.equal(bases[5], bases[6])


# ---- Fira ----------------------------------------------------------------------------------
FIRA_CASES = [
    dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=3, update_proj_gap=25,
         scale=0.25),
    dict(lr=0.002, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, rank=2, update_proj_gap=10,
         scale=1.0),
]


@pytest.mark.parametrize("hp", FIRA_CASES)
def test_fira_matches_fira(hp, monkeypatch):
    from fira import FiraAdamW, gradient_projection

    monkeypatch.setattr(gradient_projection, "torch", Float64Native())
    ours = run_ours("fira", SHAPES, **hp)
    theirs = run_torch_reference(lambda ps: FiraAdamW(
        [{"params": ps, "rank": hp["rank"], "update_proj_gap": hp["update_proj_gap"],
          "alpha": hp["scale"], "proj_type": "std"}], lr=hp["lr"], betas=hp["betas"],
        eps=hp["eps"], weight_decay=hp["weight_decay"], no_deprecation_warning=True), SHAPES)
    assert_close(ours, theirs, 1e-10)


def test_fira_limiter_engages():
    """A gradient that jumps 10x: the stored residual norm grows by at most gamma."""
    p = nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
    opt = llmvalley.create_optimizer("fira", [p], rank=2)
    gen = torch.Generator().manual_seed(0)
    norms = []
    for step in range(4):
        p.grad = torch.randn(12, 8, generator=gen, dtype=torch.float64) * (10 ** step)
        opt.step()
        norms.append(float(opt.state[p]["scaling_grad"]))
    for a, b in zip(norms, norms[1:]):  # the residual grows ~10x a step: capped each time
        assert b == pytest.approx(1.01 * (a + 1e-8), rel=1e-12)


# ---- APOLLO --------------------------------------------------------------------------------
APOLLO_CASES = [
    ("apollo", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=3,
                    update_proj_gap=20, scale=1.0), {}),
    ("apollo", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1, rank=2,
                    update_proj_gap=7, scale=4.0, scale_front=True), {}),
    ("apollo", dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, rank=2,
                    update_proj_gap=30, scale=2.0, norm_growth_limiter=False), {}),
    ("apollo_mini", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                         update_proj_gap=15, scale=128.0), {}),
    ("apollo", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=3,
                    update_proj_gap=20, scale=1.0, proj="svd"), {"svd": True}),
]


@pytest.mark.parametrize("name,hp,extra", APOLLO_CASES)
def test_apollo_matches_apollo_torch(name, hp, extra, monkeypatch):
    from apollo_torch import APOLLOAdamW, svd_projector

    if extra.get("svd"):
        monkeypatch.setattr(svd_projector, "torch", Float64Native())
    spec = llmvalley.get_spec(name)
    full = {**spec.defaults, **hp}
    ours = run_ours(name, SHAPES, **hp)
    theirs = run_torch_reference(lambda ps: APOLLOAdamW(
        [{"params": ps, "rank": full["rank"], "update_proj_gap": full["update_proj_gap"],
          "scale": full["scale"], "proj_type": "std", "proj": full["proj"],
          "scale_type": full["scale_type"]}], lr=full["lr"], betas=full["betas"],
        eps=full["eps"], weight_decay=full["weight_decay"], scale_front=full["scale_front"],
        disable_nl=not full["norm_growth_limiter"]), SHAPES)
    assert_close(ours, theirs, 1e-10)


def test_apollo_projection_is_the_reference_stream():
    """The stored basis after k refreshes is stable_randn(seed_k) / sqrt(r) with seed_0 = the
    tensor's position + 1 and seed_{k+1} = next_seed(seed_k), drawn in float32."""
    from apollo_torch.random_projector import next_seed as ref_next
    from apollo_torch.random_projector import stable_randn

    ps = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in SHAPES]
    opt = llmvalley.create_optimizer("apollo", ps, rank=2, update_proj_gap=2)
    seeds = [1, 2, 3]
    for step in range(1, 6):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        if (step - 1) % 2:
            continue
        for i, p in enumerate(ps):
            m, n = p.shape
            shape = (2, n) if m >= n else (m, 2)
            want = (stable_randn(shape, seed=seeds[i]) / math.sqrt(2)).double()
            assert torch.equal(opt.state[p]["ortho_matrix"], want)
            seeds[i] = ref_next(seeds[i])
            assert opt.state[p]["seed"] == seeds[i]


# ---- FRUGAL --------------------------------------------------------------------------------
def ref_next_seed(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**63 - 1, (15,), generator=gen).tolist()[-1]


class FrugalRef:
    """FRUGAL (GaloreOptimizer / CoordOptimizer + AdamW of the official code): Adam (torch
    eps form) on the selected subspace, the residual by signSGD / SGD / nothing, both at
    lr * proj_params_lr_scale (the residual also * inactive_lr_scale); decay before; every
    gap steps a new subspace and, with reset_statistics, zero moments and step 0."""

    def __init__(self, **hp):
        self.hp = hp

    def new_state(self):
        return {"t": 0}

    def select(self, g, st, i):
        hp, (m, n) = self.hp, g.shape
        kind, rho = hp["proj_type"], hp["density"]
        if kind == "svd":
            r = round(min(m, n) * rho)
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            st["P"], st["right"] = (vh[:r], True) if m >= n else (u[:, :r], False)
            return
        seed = st.get("seed", i + 1)
        st["seed"] = ref_next_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        total = {"columns": n, "rows": m, "randk": m * n}[kind]
        st["idx"] = torch.randperm(total, generator=gen)[:int(total * rho)]

    def down(self, x, st):
        kind = self.hp["proj_type"]
        if kind == "svd":
            return x @ st["P"].T if st["right"] else st["P"].T @ x
        if kind == "columns":
            return x[:, st["idx"]]
        if kind == "rows":
            return x[st["idx"]]
        return x.reshape(-1)[st["idx"]]

    def up(self, y, st, shape):
        kind = self.hp["proj_type"]
        if kind == "svd":
            return y @ st["P"] if st["right"] else st["P"] @ y
        out = torch.zeros(shape, dtype=y.dtype)
        if kind == "columns":
            out[:, st["idx"]] = y
        elif kind == "rows":
            out[st["idx"]] = y
        else:
            out.view(-1)[st["idx"]] = y
        return out

    def update(self, p, g, st, i):
        hp = self.hp
        b1, b2 = hp["betas"]
        st["t"] += 1
        if (st["t"] - 1) % hp["update_proj_gap"] == 0:
            self.select(g, st, i)
            if st["t"] == 1 or hp["reset_statistics"]:
                low = self.down(g, st)
                st["m"], st["v"], st["k"] = torch.zeros_like(low), torch.zeros_like(low), 0
        p.mul_(1 - hp["lr"] * hp["weight_decay"])
        st["k"] += 1
        k = st["k"]
        low = self.down(g, st)
        st["m"] = b1 * st["m"] + (1 - b1) * low
        st["v"] = b2 * st["v"] + (1 - b2) * low * low
        denom = st["v"].sqrt() / math.sqrt(1 - b2**k) + hp["eps"]
        lr = hp["lr"] * hp["proj_params_lr_scale"]
        step = self.up(-lr / (1 - b1**k) * st["m"] / denom, st, g.shape)
        rest = g - self.up(low, st, g.shape)
        rule = hp["inactive_update_rule"]
        if rule == "sign_sgd":
            step = step - lr * hp["inactive_lr_scale"] * rest.sign()
        elif rule == "sgd":
            step = step - lr * hp["inactive_lr_scale"] * rest
        p.add_(step)


FRUGAL_BASE = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, density=0.25,
                   update_proj_gap=25, proj_type="svd", reset_statistics=True,
                   inactive_update_rule="sign_sgd", inactive_lr_scale=1.0,
                   proj_params_lr_scale=1.0)
FRUGAL_CASES = [
    {},
    dict(reset_statistics=False, inactive_update_rule="sgd", inactive_lr_scale=0.1,
         proj_params_lr_scale=0.25, weight_decay=0.1, update_proj_gap=7, density=0.5),
    dict(inactive_update_rule="no", update_proj_gap=10),
    dict(proj_type="columns", update_proj_gap=10),
    dict(proj_type="rows", update_proj_gap=10, density=0.3),
    dict(proj_type="randk", update_proj_gap=10, reset_statistics=False),
]


@pytest.mark.parametrize("case", FRUGAL_CASES)
def test_frugal_matches_reference(case):
    hp = {**FRUGAL_BASE, **case}
    ours = run_ours("frugal", SHAPES, **hp)
    theirs = run_plain_reference(FrugalRef(**hp), SHAPES)
    assert_close(ours, theirs, 1e-10)


@pytest.mark.parametrize("kind", ["random", "randperm"])
def test_frugal_random_bases(kind):
    """Semi-orthogonal ('random') and coordinate ('randperm') bases on the short side, redrawn
    at each re-selection; the residual takes a sign step on what the basis leaves out."""
    p = nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
    opt = llmvalley.create_optimizer("frugal", [p], proj_type=kind, density=0.5,
                                     update_proj_gap=2)
    bases = []
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
        bases.append(opt.state[p]["ortho_matrix"].clone())
    basis = bases[-1]
    assert basis.shape == (4, 8)
    torch.testing.assert_close(basis @ basis.T, torch.eye(4, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    if kind == "randperm":
        assert set(basis.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(bases[0], bases[1]) and not torch.equal(bases[1], bases[2])


# ---- Online Subspace Descent ---------------------------------------------------------------
class OSDRef:
    """Liang et al.'s galore_adamw with proj_type 'continuous': GaLore's HF Adam step in the
    basis P, P from the first gradient's SVD, then after each later weight step one
    torch.optim.AdamW step (lr 1/gap; torch's defaults betas (0.9, 0.999), eps 1e-8, wd 0.01,
    written out here) on ||Gh P^T P - Gh||^2 (right) or ||P P^T Gh - Gh||^2 (left), the
    gradient taken by autograd at the P the step used."""

    @staticmethod
    def adamw_step(P, grad, st, lr):
        st["pt"] = st.get("pt", 0) + 1
        t = st["pt"]
        if t == 1:
            st["pm"], st["pv"] = torch.zeros_like(P), torch.zeros_like(P)
        P.mul_(1 - lr * 0.01)
        st["pm"] = 0.9 * st["pm"] + 0.1 * grad
        st["pv"] = 0.999 * st["pv"] + 0.001 * grad * grad
        denom = (st["pv"] / (1 - 0.999**t)).sqrt() + 1e-8
        P.sub_(lr / (1 - 0.9**t) * st["pm"] / denom)

    def __init__(self, **hp):
        self.hp = hp

    def new_state(self):
        return {"t": 0}

    def update(self, p, g, st, i):
        hp = self.hp
        b1, b2 = hp["betas"]
        r = hp["rank"]
        st["t"] += 1
        t = st["t"]
        right = g.shape[0] >= g.shape[1]
        if t == 1:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            st["P"] = (vh[:r] if right else u[:, :r]).clone()
        P = st["P"]
        pgrad = None
        if t > 1:
            with torch.enable_grad():
                leaf = P.detach().requires_grad_(True)
                gh = g / torch.norm(g)
                recon = gh @ leaf.T @ leaf if right else leaf @ leaf.T @ gh
                loss = torch.norm(recon - gh) ** 2
                pgrad = torch.autograd.grad(loss, leaf)[0]
        low = g @ P.T if right else P.T @ g
        if t == 1:
            st["m"], st["v"] = torch.zeros_like(low), torch.zeros_like(low)
        st["m"] = b1 * st["m"] + (1 - b1) * low
        st["v"] = b2 * st["v"] + (1 - b2) * low * low
        n = st["m"] / (st["v"].sqrt() + hp["eps"])
        step = hp["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
        back = n @ P if right else P @ n
        p.add_(back * hp["scale"], alpha=-step)
        p.add_(p, alpha=-hp["lr"] * hp["weight_decay"])
        if pgrad is not None:
            self.adamw_step(P, pgrad, st, 1 / hp["update_proj_gap"])


OSD_CASES = [
    dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=3, update_proj_gap=20,
         scale=0.25),
    dict(lr=0.005, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rank=2, update_proj_gap=5,
         scale=1.0),
]


@pytest.mark.parametrize("hp", OSD_CASES)
def test_online_subspace_descent_matches_reference(hp):
    ours = run_ours("online_subspace_descent", SHAPES, **hp)
    theirs = run_plain_reference(OSDRef(**hp), SHAPES)
    assert_close(ours, theirs, 1e-10)


def test_online_subspace_descent_moves_its_basis_every_step():
    p = nn.Parameter(torch.randn(8, 20, dtype=torch.float64))
    opt = llmvalley.create_optimizer("online_subspace_descent", [p], rank=2)
    seen = []
    for _ in range(4):
        p.grad = torch.randn_like(p)
        opt.step()
        seen.append(opt.state[p]["ortho_matrix"].clone())
    assert seen[0].shape == (8, 2)
    assert all(not torch.equal(a, b) for a, b in zip(seen[1:], seen[2:]))


# ---- memory --------------------------------------------------------------------------------
def test_state_numel_is_each_papers_memory():
    """GaLore (Table 1, W in R^{m x n}, m <= n): projection m r + moments 2 n r. Fira adds one
    scalar (the limiter's norm); APOLLO keeps GaLore's layout (the reference stores its random
    projection) plus the scalar; OSD adds the projector's AdamW moments, 2 m r; FRUGAL:
    Adam on rho of the short side, 2 n (rho m), plus the basis m (rho m)."""
    for m, n in [(64, 256), (256, 64)]:
        short, long = min(m, n), max(m, n)
        r = 16

        def numel(name, shape=(m, n), **hp):
            return llmvalley.get_spec(name).state_numel(shape, **hp)

        assert numel("galore", rank=r) == short * r + 2 * long * r
        assert numel("fira", rank=r) == short * r + 2 * long * r + 1
        assert numel("apollo", rank=r) == short * r + 2 * long * r + 1
        assert numel("apollo_mini") == short + 2 * long + 1
        assert numel("online_subspace_descent", rank=r) == 3 * short * r + 2 * long * r
        rr = round(short * 0.25)
        assert numel("frugal") == short * rr + 2 * long * rr
        assert numel("frugal", proj_type="columns") == int(n * 0.25) * (1 + 2 * m)
        assert numel("frugal", proj_type="randk") == 4 * int(m * n * 0.25)


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_matches_the_formula(name):
    model = llama()
    opt = llmvalley.create_optimizer(name, model, **SMALL[name])
    before = llmvalley.state_bytes(opt)
    synthetic_steps(model, opt, 0, 2)
    expected = 0
    for group in opt.param_groups:
        spec = llmvalley.get_spec(group["optimizer"])
        hp = {k: group[k] for k in spec.defaults}
        expected += sum(spec.state_numel(tuple(p.shape), **hp) * 4 for p in group["params"])
    assert llmvalley.state_bytes(opt) == before == expected


# ---- resume --------------------------------------------------------------------------------
RESUME_CASES = [
    ("galore", {}), ("fira", {}), ("apollo", {}), ("online_subspace_descent", {}),
    ("frugal", dict(proj_type="random")), ("frugal", dict(proj_type="randk")),
]


@pytest.mark.parametrize("name,extra", RESUME_CASES)
def test_resume_across_a_projector_refresh_is_bit_exact(name, extra):
    """gap 20, split at 30: the refresh at step 41 draws from the checkpointed basis, seed and
    (FRUGAL) restarted Adam state."""
    hp = {**SMALL[name], **extra, "update_proj_gap": 20}

    def make(seed):
        return llama(seed)

    ref = make(0)
    synthetic_steps(ref, llmvalley.create_optimizer(name, ref, **hp), 0, 60)
    model = make(0)
    opt = llmvalley.create_optimizer(name, model, **hp)
    synthetic_steps(model, opt, 0, 30)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make(123)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = llmvalley.create_optimizer(name, resumed, **hp)
    resumed_opt.load_state_dict(ckpt["opt"])
    synthetic_steps(resumed, resumed_opt, 30, 30)
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: {n} differs after resume"


# ---- precision, routing, errors ------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_bf16_parameters_learn(name):
    """bf16 weights keep float32 state (bases included) and the loss falls."""
    model = llama(dtype=torch.bfloat16)
    opt = llmvalley.create_optimizer(name, model, lr=0.01, **SMALL[name])
    losses = train(model, opt, 0, 30)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for st in opt.state.values():
        assert all(v.dtype == torch.float32 for v in st.values() if isinstance(v, torch.Tensor))
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_routing_on_a_llama_preset_sends_only_hidden_matrices(name):
    """LLaMA-60M (built on the meta device) at the defaults: 8 layers x 7 projections go to
    the method, embeddings, head and norms to the AdamW fallback."""
    model = build_model(model_config("llama-60m"), device="meta")
    opt = llmvalley.create_optimizer(name, model)
    spec = llmvalley.get_spec(name)
    routed = set()
    for group in opt.param_groups:
        if group["optimizer"] == name:
            assert all(p.ndim == 2 for p in group["params"])
            routed.update(group["param_names"])
        else:
            assert group["optimizer"] == "adamw"
            assert group["lr"] == spec.fallback_hparams["lr"]
    assert len(routed) == 8 * 7
    assert all(n.endswith("proj.weight") and "layers" in n for n in routed)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in routed)


@pytest.mark.parametrize("name", ["galore", "fira", "apollo", "online_subspace_descent"])
def test_rank_at_or_above_the_short_side_is_refused_naming_the_parameter(name):
    model = build_model(model_config("nano"), device="meta")  # d_model 128 = default rank
    with pytest.raises(ValueError, match=r"rank=128.*layers\.0\..*\(128\)"):
        llmvalley.create_optimizer(name, model)
    with pytest.raises(ValueError, match="rank=8"):
        llmvalley.create_optimizer(name, [nn.Parameter(torch.zeros(8, 12))], rank=8)


def test_frugal_density_too_small_for_a_matrix_is_refused():
    with pytest.raises(ValueError, match="density"):
        llmvalley.create_optimizer("frugal", [nn.Parameter(torch.zeros(2, 12))])


@pytest.mark.parametrize("name", NAMES)
def test_tensors_that_are_not_matrices_are_refused(name):
    kernel = nn.Parameter(torch.zeros(16, 8, 3, 3))
    with pytest.raises(ValueError, match=r"shape \(16, 8, 3, 3\).*2-D"):
        llmvalley.create_optimizer(name, [kernel], **SMALL[name])


@pytest.mark.parametrize("name,bad", [
    ("galore", dict(rank=0)), ("galore", dict(update_proj_gap=0)), ("galore", dict(scale=0.0)),
    ("galore", dict(proj_type="full")), ("fira", dict(gamma=0.5)),
    ("apollo", dict(scale_type="row")), ("apollo", dict(proj="qr")),
    ("apollo_mini", dict(scale_front=1)), ("frugal", dict(density=1.0)),
    ("frugal", dict(proj_type="block")), ("frugal", dict(inactive_update_rule="lion")),
    ("frugal", dict(inactive_lr_scale=-1.0)),
    ("online_subspace_descent", dict(proj_betas=(0.9, 1.0))),
    ("online_subspace_descent", dict(proj_weight_decay=-0.1)),
])
def test_invalid_hyperparameters_are_named(name, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        llmvalley.create_optimizer(name, [nn.Parameter(torch.zeros(16, 16))], **bad)
