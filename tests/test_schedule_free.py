"""Schedule-free, parameter-free and model-based methods, and Lookahead: differential tests
against their references (float64, 100 steps), train/eval iterates, resume, bad input."""

from __future__ import annotations

import math

import dadaptation
import dog
import prodigyopt
import pytest
import schedulefree
import torch

import llmvalley
from llmvalley.optim.recipes.wrappers import lookahead_spec
from tests.helpers import loss_fn, make_model, make_optimizer, roundtrip

SHAPES = ((6, 5), (4,), ())
STEPS = 100


def start_point(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def objective(params: list[torch.Tensor], t: int) -> torch.Tensor:
    """A non-convex, time-varying loss >= 0 (MoMo's lower bound 0 holds)."""
    return sum((torch.sin(p * (1 + 0.01 * t)) + 1 + p**2 / 3).sum() for p in params)


def step_all(params, opt, t: int, with_loss: bool = False) -> torch.Tensor:
    opt.zero_grad()
    loss = objective(params, t)
    loss.backward()
    opt.step(loss=loss) if with_loss else opt.step()
    return loss


def run_pair(ours, theirs, steps: int = STEPS, ours_loss: bool = False, theirs_loss=False,
             moved: float = 1e-3):
    """The same start and gradients for both; returns both parameter lists."""
    start = start_point()
    a = [p.clone().requires_grad_() for p in start]
    b = [p.clone().requires_grad_() for p in start]
    oa, ob = ours(a), theirs(b)
    for t in range(steps):
        step_all(a, oa, t, ours_loss)
        step_all(b, ob, t, theirs_loss)
    # a test that cannot fail is a defect: the runs must have gone somewhere
    assert max((p - q).abs().max().item() for p, q in zip(a, start)) > moved
    return a, b, oa, ob


def assert_close(a, b, tol=1e-11):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=tol, atol=tol)


# ---- schedule-free ------------------------------------------------------------------------
SF_CASES = [
    ("schedulefree_adamw", schedulefree.AdamWScheduleFree,
     dict(lr=0.02, weight_decay=0.1, warmup_steps=10, r=0.5, weight_lr_power=2.0)),
    ("schedulefree_adamw", schedulefree.AdamWScheduleFree,
     dict(lr=0.01, betas=(0.95, 0.99), eps=1e-6, weight_lr_power=0.0)),
    ("schedulefree_sgd", schedulefree.SGDScheduleFree,
     dict(lr=0.05, momentum=0.8, weight_decay=0.05, warmup_steps=20, r=1.0)),
]


@pytest.mark.parametrize("name,ref,hp", SF_CASES)
def test_schedule_free_matches_reference_in_train_and_eval_modes(name, ref, hp):
    def theirs(ps):
        opt = ref(ps, **hp)
        opt.train()
        return opt

    def both_modes(a, b, oa, ob):
        assert oa.training
        oa.eval()
        ob.eval()
        assert not oa.training
        assert_close(a, b)  # x, the evaluation point
        oa.train()
        ob.train()
        assert_close(a, b)  # back to y

    def ours(ps):
        return llmvalley.create_optimizer(name, ps, **hp)

    start = start_point()
    a = [p.clone().requires_grad_() for p in start]
    b = [p.clone().requires_grad_() for p in start]
    oa, ob = ours(a), theirs(b)
    for t in range(STEPS):
        step_all(a, oa, t)
        step_all(b, ob, t)
        assert_close(a, b)  # y, the training point
        if t in (0, 49):
            both_modes(a, b, oa, ob)
    both_modes(a, b, oa, ob)
    y = [p.detach().clone() for p in a]
    oa.eval()
    ob.eval()
    assert_close(a, b)  # the reference's .eval() parameters
    # the documented eval weights: x = y + (1 - 1/beta) (z - y), i.e. y = (1 - beta) z + beta x
    beta = hp.get("momentum", hp.get("betas", (0.9,))[0])
    for p, yp in zip(a, y):
        z = oa.state[p]["z"]
        torch.testing.assert_close(p.detach(), torch.lerp(yp, z, 1 - 1 / beta), rtol=0, atol=0)
        torch.testing.assert_close(yp, torch.lerp(z, p.detach(), beta), rtol=1e-12, atol=1e-12)
        assert (p.detach() - yp).abs().max() > 1e-4  # x and y differ


def test_step_in_eval_mode_raises_and_modes_round_trip():
    ps = [p.clone().requires_grad_() for p in start_point()]
    opt = llmvalley.create_optimizer("schedulefree_adamw", ps)
    opt.eval()  # before any step: nothing to move
    assert torch.equal(ps[0].detach(), start_point()[0])
    with pytest.raises(RuntimeError, match="eval mode"):
        step_all(ps, opt, 0)
    opt.train()
    for t in range(3):  # after one step x = y = z
        step_all(ps, opt, t)
    y = [p.detach().clone() for p in ps]
    opt.eval()
    opt.eval()  # idempotent
    assert not torch.equal(ps[0].detach(), y[0])
    opt.train()
    assert_close(ps, y, tol=1e-14)


@pytest.mark.parametrize("name", ["schedulefree_adamw", "schedulefree_sgd"])
@pytest.mark.parametrize("save_in_eval", [True, False])
def test_schedule_free_resumes_bit_exactly_in_either_mode(name, save_in_eval):
    lr = 0.01 if name == "schedulefree_adamw" else 0.1

    def run(model, opt, start, steps):
        for step in range(start, start + steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, step).backward()
            opt.step()

    def checkpoint_point(opt):
        if save_in_eval:
            opt.eval()

    ref = make_model(0)
    ref_opt = make_optimizer(name, ref, lr=lr, warmup_steps=5)
    run(ref, ref_opt, 0, 8)
    checkpoint_point(ref_opt)
    ref_opt.train()
    run(ref, ref_opt, 8, 8)
    ref_opt.eval()

    model = make_model(0)
    opt = make_optimizer(name, model, lr=lr, warmup_steps=5)
    run(model, opt, 0, 8)
    checkpoint_point(opt)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make_model(123)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = make_optimizer(name, resumed, lr=lr, warmup_steps=5)
    resumed_opt.load_state_dict(ckpt["opt"])
    assert resumed_opt.training is not save_in_eval
    resumed_opt.train()
    run(resumed, resumed_opt, 8, 8)
    resumed_opt.eval()
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: {n} differs after resume"


# ---- Prodigy, D-Adapt Adam, DoG -----------------------------------------------------------
PRODIGY_CASES = [
    dict(),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decouple=False, use_bias_correction=True),
    dict(betas=(0.0, 0.99), safeguard_warmup=True, slice_p=3),
    dict(growth_rate=1.05, d_coef=0.5, beta3=0.9, d0=1e-4),
]


@pytest.mark.parametrize("hp", PRODIGY_CASES)
def test_prodigy_matches_prodigyopt(hp, capsys):
    a, b, oa, ob = run_pair(lambda ps: llmvalley.create_optimizer("prodigy", ps, **hp),
                            lambda ps: prodigyopt.Prodigy(ps, **hp))
    # the d estimate feeds back through <g, p0 - p>, which amplifies rounding a little
    assert_close(a, b, tol=1e-8)
    d = {oa.state[p]["d"] for p in a}
    assert len(d) == 1 and math.isclose(d.pop(), ob.param_groups[0]["d"], rel_tol=1e-8)
    assert ob.param_groups[0]["d"] > 10 * ob.param_groups[0]["d0"]  # d was adapted


def two_groups(params, **hp):
    """Decay for matrices, none for vectors: the split create_optimizer makes for a model."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


# D-Adaptation's d grows to ~3 here and its steps amplify the rounding of the sums' order
# (the reference adds tensor by tensor across groups, the shell group by group): 25 steps
@pytest.mark.parametrize("name,ref,steps", [("prodigy", prodigyopt.Prodigy, STEPS),
                                            ("dadapt_adam", dadaptation.DAdaptAdam, 25)])
def test_d_is_shared_across_parameter_groups_as_in_the_reference(name, ref, steps):
    a, b, oa, ob = run_pair(
        lambda ps: llmvalley.create_optimizer(name, two_groups(ps), decouple=True),
        lambda ps: ref(two_groups(ps), decouple=True), steps=steps)
    assert_close(a, b, tol=1e-8)
    assert len({oa.state[p]["d"] for p in a}) == 1  # one d for the whole optimizer
    assert math.isclose(oa.state[a[0]]["d"], ob.param_groups[1]["d"], rel_tol=1e-8)


DADAPT_CASES = [
    dict(),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decouple=True, use_bias_correction=True),
    dict(growth_rate=1.05, betas=(0.8, 0.99), eps=1e-6),
]


@pytest.mark.parametrize("hp", DADAPT_CASES)
def test_dadapt_adam_matches_dadaptation(hp, capsys):
    a, b, oa, ob = run_pair(lambda ps: llmvalley.create_optimizer("dadapt_adam", ps, **hp),
                            lambda ps: dadaptation.DAdaptAdam(ps, **hp))
    assert_close(a, b, tol=1e-9)
    assert ob.param_groups[0]["d"] > 10 * 1e-6


@pytest.mark.parametrize("name,ref", [("dog", dog.DoG), ("ldog", dog.LDoG)])
@pytest.mark.parametrize("hp", [dict(), dict(weight_decay=0.1, reps_rel=1e-3),
                                dict(init_eta=1e-3, lr=0.5)])
def test_dog_matches_dog_optimizer(name, ref, hp):
    a, b, _, _ = run_pair(lambda ps: llmvalley.create_optimizer(name, ps, **hp),
                          lambda ps: ref(ps, **hp))
    assert_close(a, b, tol=1e-10)


def test_frozen_group_does_not_move_the_estimate():
    ps = [p.clone().requires_grad_() for p in start_point()]
    opt = llmvalley.create_optimizer("prodigy", ps, lr=0.0)
    for t in range(3):
        step_all(ps, opt, t)
    assert_close(ps, start_point(), tol=0)
    assert opt.state[ps[0]]["d"] == 1e-6


# ---- MoMo: an independent reference from the paper's equations ------------------------------
def momo_reference(params, steps, *, lr, beta, wd, lb, adam, bias_correction, fstar,
                   betas2=0.999, eps=1e-8, divide=True):
    """MoMo (Algorithm 1) and MoMo-Adam (Algorithm 3) of Schaipp et al., one parameter vector
    (the concatenation of all tensors), written from the equations."""
    x = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    sizes = [p.numel() for p in params]

    def unflat(v):
        return [c.reshape(p.shape) for c, p in zip(torch.split(v, sizes), params)]

    d = torch.zeros_like(x)
    v = torch.zeros_like(x)
    gamma = fbar = 0.0
    lb_k, lb0 = lb, lb
    zero = adam or bias_correction
    for k in range(1, steps + 1):
        xs = [c.clone().requires_grad_() for c in unflat(x)]
        f = objective(xs, k - 1)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(f, xs)])
        f = f.item()
        if k == 1 and not zero:
            d, gamma, fbar = g.clone(), float(x @ g), f
        d = beta * d + (1 - beta) * g
        gamma = beta * gamma + (1 - beta) * float(x @ g)
        fbar = beta * fbar + (1 - beta) * f
        rho = 1 - beta**k if zero else 1.0
        if adam:
            v = betas2 * v + (1 - betas2) * g * g
            precond = (v / (1 - betas2**k)).sqrt() + eps
        else:
            precond = torch.ones_like(x)
        dk = d / precond
        c = 1 + lr * wd
        if fstar:
            cap = c * fbar + float(x @ d) - c * gamma
            if cap < c * rho * lb_k:
                lb_k = max(cap / (2 * c * rho), lb0)
        h = c * (fbar - rho * lb_k) + float(d @ x) - c * gamma
        tau = min(lr / rho, max(h, 0.0) / float(d @ dk))
        if fstar:
            lb_k = max((fbar + float(x @ d) - gamma - 0.5 * tau * float(d @ dk)) / rho, lb0)
        if divide:
            x = (x - tau * dk) / c
        else:
            x = x * (1 - lr * wd) - tau * dk
    return unflat(x)


MOMO_CASES = [
    ("momo", dict(lr=1.0, momentum=0.9), dict(beta=0.9, bias_correction=False)),
    ("momo", dict(lr=0.5, momentum=0.8, weight_decay=0.05, bias_correction=True, lb=0.5),
     dict(beta=0.8, bias_correction=True)),
    ("momo", dict(lr=1.0, use_fstar=True, weight_decay=0.01), dict(beta=0.9,
                                                                   bias_correction=False)),
    ("momo_adam", dict(lr=0.05), dict(beta=0.9, bias_correction=True)),
    ("momo_adam", dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.1, divide=False,
                       use_fstar=True), dict(beta=0.8, betas2=0.99, bias_correction=True,
                                             divide=False)),
]


@pytest.mark.parametrize("name,hp,ref_hp", MOMO_CASES)
def test_momo_matches_the_papers_equations(name, hp, ref_hp):
    start = start_point()
    ps = [p.clone().requires_grad_() for p in start]
    opt = llmvalley.create_optimizer(name, ps, **hp)
    for t in range(STEPS):
        step_all(ps, opt, t, with_loss=True)
    ref_hp = {"lr": hp["lr"], "wd": hp.get("weight_decay", 0.0), "lb": hp.get("lb", 0.0),
              "fstar": hp.get("use_fstar", False), "adam": name == "momo_adam", **ref_hp}
    expected = momo_reference(start, STEPS, **ref_hp)
    assert max((p - q).abs().max().item() for p, q in zip(ps, start)) > 1e-2
    assert_close(ps, expected, tol=1e-10)


@pytest.mark.parametrize("name", ["momo", "momo_adam"])
def test_momo_needs_the_loss_and_resumes_bit_exactly(name):
    lr = 1.0 if name == "momo" else 0.01
    model = make_model()
    opt = make_optimizer(name, model, lr=lr)
    loss_fn(model, 0).backward()
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()

    def run(model, opt, start, steps):
        for step in range(start, start + steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, step)
            loss.backward()
            opt.step(loss=loss)

    ref = make_model(0)
    run(ref, make_optimizer(name, ref, lr=lr), 0, 16)
    model = make_model(0)
    opt = make_optimizer(name, model, lr=lr)
    run(model, opt, 0, 8)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make_model(123)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = make_optimizer(name, resumed, lr=lr)
    resumed_opt.load_state_dict(ckpt["opt"])
    run(resumed, resumed_opt, 8, 8)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(ref.q_proj.weight, make_model(0).q_proj.weight)


# ---- Lookahead ------------------------------------------------------------------------------
def lookahead_reference(params, steps, k, alpha, **adamw):
    """Lookahead over torch.optim.AdamW (Algorithm 1 of Zhang et al.)."""
    inner = torch.optim.AdamW(params, **adamw)
    slow = [p.detach().clone() for p in params]
    for t in range(steps):
        step_all(params, inner, t)
        if (t + 1) % k == 0:
            with torch.no_grad():
                for s, p in zip(slow, params):
                    s.add_(p - s, alpha=alpha)
                    p.copy_(s)


@pytest.mark.parametrize("make", [
    lambda ps, **hp: llmvalley.create_optimizer("lookahead", ps, **hp),
    lambda ps, **hp: llmvalley.create_optimizer(lookahead_spec("adamw"), ps, **hp),
])
def test_lookahead_matches_an_independent_reference(make):
    hp = dict(lr=0.05, weight_decay=0.1, betas=(0.9, 0.99))
    start = start_point()
    ref = [p.clone().requires_grad_() for p in start]
    lookahead_reference(ref, STEPS, 6, 0.4, **hp)
    ps = [p.clone().requires_grad_() for p in start]
    opt = make(ps, k=6, alpha=0.4, **hp)
    for t in range(STEPS):
        step_all(ps, opt, t)
    assert_close(ps, ref, tol=1e-12)
    plain = [p.clone().requires_grad_() for p in start]
    adamw = torch.optim.AdamW(plain, **hp)
    for t in range(STEPS):
        step_all(plain, adamw, t)
    assert max((p - q).abs().max().item() for p, q in zip(ps, plain)) > 1e-3


def test_lookahead_wraps_any_recipe_by_name():
    ps = [p.clone().requires_grad_() for p in start_point()]
    opt = llmvalley.create_optimizer("lookahead", ps, base="lion", lr=1e-3, betas=(0.9, 0.99),
                                     k=3)
    for t in range(7):
        step_all(ps, opt, t)
    assert sorted(opt.state[ps[0]]) == ["exp_avg", "slow_param", "step"]
    spec = llmvalley.get_spec("lookahead")
    assert spec.state_numel((4, 3), base="lion") == 24
    assert spec.state_numel((4, 3)) == 36  # adamw: two moments and the slow weights
    momo = [p.clone().requires_grad_() for p in start_point()]
    opt = llmvalley.create_optimizer("lookahead", momo, base="momo")
    with pytest.raises(ValueError, match="needs the loss"):
        step_all(momo, opt, 0)
    step_all(momo, opt, 0, with_loss=True)
    muon = llmvalley.create_optimizer(lookahead_spec("muon"), make_model())
    assert llmvalley.get_spec("muon").applies_to == "matrix"
    assert len(muon.param_groups) > 1  # routed: the fallback took the vectors


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,hp,key", [
    ("schedulefree_adamw", dict(warmup_steps=-1), "warmup_steps"),
    ("schedulefree_adamw", dict(betas=(0.0, 0.999)), "betas"),
    ("schedulefree_sgd", dict(momentum=0.0), "momentum"),
    ("schedulefree_sgd", dict(r=-1.0), "r"),
    ("prodigy", dict(d0=0.0), "d0"),
    ("prodigy", dict(slice_p=0), "slice_p"),
    ("prodigy", dict(beta3=1.5), "beta3"),
    ("prodigy", dict(growth_rate=0.5), "growth_rate"),
    ("dadapt_adam", dict(layer_scale=0.0), "layer_scale"),
    ("dadapt_adam", dict(decouple="yes"), "decouple"),
    ("dog", dict(reps_rel=0.0), "reps_rel"),
    ("ldog", dict(init_eta=-1.0), "init_eta"),
    ("momo", dict(lb=float("nan")), "lb"),
    ("momo_adam", dict(divide=1), "divide"),
    ("lookahead", dict(k=0), "k"),
    ("lookahead", dict(alpha=1.5), "alpha"),
    ("lookahead", dict(base="schedulefree_adamw"), "base"),
    ("lookahead", dict(base="muon"), "base"),
    ("lookahead", dict(base="lookahead"), "base"),
    ("lookahead", dict(cautious=True), "cautious"),
    ("lookahead", dict(base="lion", eps=1e-8), "eps"),
])
def test_bad_hyperparameters_are_named(name, hp, key):
    w = torch.nn.Parameter(torch.ones(3, 2))
    with pytest.raises(ValueError, match=key):
        llmvalley.create_optimizer(name, [w], **hp)
