"""Stability methods (SPAM, Stable-SPAM, AdaGC and the ``adagc=True`` shell option).

The official implementations are not on PyPI, so each is compared, in float64 over 100 steps
with injected gradient spikes, with an independent reference written here from the official
code's update (TianjinYellow/SPAM-Optimizer ``SPAM.py``, TianjinYellow/StableSPAM
``stablespam.py``, lishuai-97/AdaGC's ``clip_grads.py``), in its own variable names and order
of operations. The only departures, each also in the catalogue notes, are marked ``DEPARTURE``.
Every run covers at least one momentum reset (and SPAM's warm-up after it) and asserts that
spikes were really clipped, so the tests fail if clipping or resetting is lost.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

import llmvalley
from tests.helpers import make_model

STEPS = 100
SHAPES = [(12, 8), (8,), (6, 3, 2)]
RTOL, ATOL = 1e-10, 1e-13


def initial(shapes=SHAPES, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def spiky_gradients(shapes=SHAPES, steps=STEPS, seed=1) -> list[list[torch.Tensor]]:
    """Drifting random gradients with spikes: every 7th step one tensor is scaled by 300, and
    every 11th step a few coordinates of another jump 1000-fold."""
    gen = torch.Generator().manual_seed(seed)
    drift = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    out = []
    for t in range(1, steps + 1):
        grads = [0.3 * d + torch.randn(s, generator=gen, dtype=torch.float64)
                 for d, s in zip(drift, shapes)]
        if t % 7 == 0:
            grads[t % len(shapes)] *= 300.0
        if t % 11 == 0:
            flat = grads[(t + 1) % len(shapes)].view(-1)
            flat[: 3] *= 1000.0
        out.append(grads)
    return out


def run_mine(name: str, shapes=SHAPES, **hp) -> list[torch.Tensor]:
    params = [p.requires_grad_(True) for p in initial(shapes)]
    opt = llmvalley.create_optimizer(name, params, **hp)
    for grads in spiky_gradients(shapes):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def assert_all_close(mine: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def cosine_annealing(base: float, t_max: int, eta_min: float, epoch: int) -> float:
    """The official codes' ``CosineDecay``: torch's CosineAnnealingLR read at ``epoch``."""
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(holder, t_max + 1, eta_min)
        sched.step(epoch)
    return holder.param_groups[0]["lr"]


# ---- SPAM ---------------------------------------------------------------------------------
class ReferenceSPAM:
    """The official SPAM step (density 1), on plain tensors."""

    def __init__(self, params, lr, betas, eps, weight_decay, warmup_steps, threshold, DeltaT,
                 grad_accu_steps):
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.warmup_steps, self.thres, self.DeltaT = warmup_steps, threshold, DeltaT
        self.grad_accu_steps = grad_accu_steps
        self.state = [{} for _ in params]
        self.total_step, self.current_step = 0, warmup_steps + 1
        self.clipped = 0
        self.scales = []

    def decay_rate(self, current: int) -> float:
        if current >= self.warmup_steps:
            return 0.0
        return cosine_annealing(0.99, self.warmup_steps, 0.0, current)

    def step(self, grads):
        scale_factor = 1 - self.decay_rate(self.current_step)
        self.scales.append(scale_factor)
        beta1, beta2 = self.betas
        for p, grad, state in zip(self.params, grads, self.state):
            grad = grad.clone()
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            if (self.total_step + 1) % self.DeltaT == 0:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            current = self.total_step + 1
            if self.thres != 0 and current >= self.grad_accu_steps \
                    and current % self.DeltaT >= self.grad_accu_steps:
                mask = grad**2 > self.thres * exp_avg_sq
                self.clipped += int(mask.sum())
                grad[mask] = grad[mask].sign() * torch.sqrt(exp_avg_sq[mask] * self.thres)
            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(self.eps)
            step_size = self.lr * math.sqrt(1.0 - beta2 ** state["step"]) \
                / (1.0 - beta1 ** state["step"])
            p.add_(exp_avg / denom, alpha=-step_size * scale_factor)
            if self.wd > 0:
                p.add_(p, alpha=-self.lr * self.wd)
        self.total_step += 1
        self.current_step += 1
        if (self.total_step + 1) % self.DeltaT == 0:
            self.current_step = 0


SPAM_HP = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, threshold=50,
               reset_interval=40, warmup_steps=15, clip_delay=5)


def test_spam_matches_the_official_update():
    params = initial()
    ref = ReferenceSPAM(params, lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1,
                        warmup_steps=15, threshold=50, DeltaT=40, grad_accu_steps=5)
    for grads in spiky_gradients():
        ref.step(grads)
    assert ref.clipped > 10  # spikes were clipped
    assert min(ref.scales) == pytest.approx(0.01) and sum(s < 1 for s in ref.scales) == 30
    assert_all_close(run_mine("spam", **SPAM_HP), params)


def test_spam_without_reset_or_clipping_is_hf_adamw():
    """threshold=0 and reset_interval=0 leave Adam (HF eps, decay after the update)."""
    hp = dict(SPAM_HP, threshold=0, reset_interval=0)
    params = initial()
    ref = ReferenceSPAM(params, lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1,
                        warmup_steps=15, threshold=0, DeltaT=10**9, grad_accu_steps=5)
    for grads in spiky_gradients():
        ref.step(grads)
    assert_all_close(run_mine("spam", **hp), params)
    assert not torch.allclose(run_mine("spam", **SPAM_HP)[0], params[0])


# ---- Stable-SPAM --------------------------------------------------------------------------
class ReferenceStableSPAM:
    """The official Stable-SPAM step, on plain tensors.

    DEPARTURE (a reference bug): the code binds ``exp_avg, exp_avg_sq`` before it replaces
    them with zeros at a reset step, so that step still updates the old moments. Here they are
    bound after the reset. DEPARTURE: the cosine factor is held at ``eta_min`` after
    ``total_T + 1`` steps (CosineAnnealingLR would climb back).
    """

    def __init__(self, params, lr, betas, eps, weight_decay, gamma1, gamma2, gamma3, total_T,
                 eta_min, update_proj_gap):
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.gamma1, self.gamma2, self.theta = gamma1, gamma2, gamma3
        self.total_T, self.eta_min, self.update_proj_gap = total_T, eta_min, update_proj_gap
        self.total_steps = 0
        self.state = [{} for _ in params]
        self.clipped = 0

    def step(self, grads):
        self.total_steps += 1
        scale = 1.0
        if self.total_T is not None:
            scale = cosine_annealing(1.0, self.total_T, self.eta_min,
                                     min(self.total_steps, self.total_T + 1))
        for p, grad, state in zip(self.params, grads, self.state):
            p.mul_(1 - self.lr * self.wd)
            grad = grad.clone()
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
                state["m_norm_t"], state["v_norm_t"], state["m_max_t"] = 0, 0, 0
            max_gradient = torch.max(grad.abs())
            state["step"] += 1
            m_max_t = self.theta * state["m_max_t"] + (1 - self.theta) * max_gradient
            m_max_hat = m_max_t / (1 - self.theta ** state["step"])
            mask = grad.abs() > m_max_hat
            self.clipped += int(mask.sum())
            if mask.sum() > 0:
                grad[mask] = grad[mask] / max_gradient * m_max_hat
            state["m_max_t"] = m_max_t
            grad_norm = torch.norm(grad)
            m_norm_t = self.gamma1 * scale * state["m_norm_t"] \
                + (1 - self.gamma1 * scale) * grad_norm
            v_norm_t = self.gamma2 * state["v_norm_t"] + (1 - self.gamma2) * grad_norm**2
            m_norm_hat = m_norm_t / (1 - (self.gamma1 * scale) ** state["step"])
            v_norm_hat = v_norm_t / (1 - self.gamma2 ** state["step"])
            c_norm_t = m_norm_hat / (torch.sqrt(v_norm_hat) + self.eps)
            if grad_norm > 0:
                grad = grad / grad_norm * c_norm_t
            state["m_norm_t"], state["v_norm_t"] = m_norm_t, v_norm_t
            if self.update_proj_gap != 0 and self.total_steps % self.update_proj_gap == 0:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] = 1
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]  # after the reset
            beta1, beta2 = self.betas
            beta1 = beta1 * scale
            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2 = 1 - beta2 ** state["step"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(self.eps)
            p.add_(exp_avg / denom, alpha=-self.lr / bias_correction1)


STABLE_HP = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, gamma1=0.7,
                 gamma2=0.9, gamma3=0.99, reset_interval=40, total_steps=70, eta_min=0.5)


@pytest.mark.parametrize("total_steps", [70, None])
def test_stable_spam_matches_the_official_update(total_steps):
    hp = dict(STABLE_HP, total_steps=total_steps)
    params = initial()
    ref = ReferenceStableSPAM(params, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                              gamma1=0.7, gamma2=0.9, gamma3=0.99, total_T=total_steps,
                              eta_min=0.5, update_proj_gap=40)
    for grads in spiky_gradients():
        ref.step(grads)
    assert ref.clipped > 10
    assert_all_close(run_mine("stable_spam", **hp), params)


def test_stable_spam_tensors_at_different_steps():
    """A tensor that starts later (its own step count) steps as it would alone."""
    shapes = [(5, 4), (3,)]
    together = [p.requires_grad_(True) for p in initial(shapes)]
    alone = [p.detach().clone().requires_grad_(True) for p in together]
    hp = dict(STABLE_HP, reset_interval=6, total_steps=None)
    opt = llmvalley.create_optimizer("stable_spam", together, **hp)
    solo = [llmvalley.create_optimizer("stable_spam", [p], **hp) for p in alone]
    for t, grads in enumerate(spiky_gradients(shapes, steps=20)):
        for i, (p, q, g) in enumerate(zip(together, alone, grads)):
            late = i == 1 and t < 5
            p.grad = None if late else g.clone()
            q.grad = None if late else g.clone()
            if not late:
                solo[i].step()
        opt.step()
    assert_all_close([p.detach() for p in together], [q.detach() for q in alone])


# ---- AdaGC --------------------------------------------------------------------------------
class ReferenceAdaGC:
    """The official ``AdaGC`` clipper (unsharded, L2), on lists of gradients, in place."""

    def __init__(self, clip_ratio, beta, max_norm, start_clip_steps, eps=1.0e-6):
        self.clip_ratio, self.beta, self.eps = clip_ratio, beta, eps
        self.max_norm, self.start_clip_steps = max_norm, start_clip_steps
        self.steps = 0
        self.state = {}
        self.clipped = 0

    def clip(self, keys, grads):
        self.steps += 1
        total_norm = math.sqrt(sum(float(torch.norm(g)) ** 2 for g in grads))
        if self.steps <= self.start_clip_steps:
            clip_coeff = self.max_norm / (total_norm + self.eps)
            if clip_coeff < 1.0:
                self.clipped += 1
                for g in grads:
                    g.mul_(clip_coeff)
            for key, g in zip(keys, grads):
                norm_value = torch.norm(g)
                if key not in self.state or norm_value < self.state[key]:
                    self.state[key] = norm_value
        else:
            for key, g in zip(keys, grads):
                norm_value = torch.norm(g)
                if key not in self.state:
                    self.state[key] = norm_value
                avg = self.state[key]
                if norm_value > self.clip_ratio * avg:
                    self.clipped += 1
                    g.mul_((self.clip_ratio * avg) / (norm_value + self.eps))
                    norm_value = self.clip_ratio * avg
                self.state[key] = avg * self.beta + norm_value * (1.0 - self.beta)


ADAGC = dict(adagc_lambda_rel=1.05, adagc_beta=0.9, adagc_lambda_abs=20.0, adagc_warmup=10)


def model_gradients(model, steps=STEPS, seed=3):
    """Spiky gradients for each parameter of ``model``."""
    shapes = [tuple(p.shape) for p in model.parameters()]
    return spiky_gradients(shapes, steps, seed)


@pytest.mark.parametrize("name,hp", [
    ("adamw", dict(lr=1e-3, weight_decay=0.1)),
    ("lion", dict(lr=1e-4, weight_decay=0.1)),
    ("muon", dict(lr=0.02, ns_dtype=torch.float64)),
])
def test_adagc_option_is_clipping_then_the_plain_recipe(name, hp):
    """create_optimizer(name, model, adagc=True) == the official clipper over the whole model
    in front of create_optimizer(name, model): the warm-up clips by the global norm of every
    group's gradients (the routed model has two or more groups)."""
    mine, theirs = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    opt = llmvalley.create_optimizer(name, mine, adagc=True, **ADAGC, **hp)
    plain = llmvalley.create_optimizer(name, theirs, **hp)
    assert len(plain.param_groups) > 1
    clipper = ReferenceAdaGC(1.05, 0.9, 20.0, 10)
    params = [p for group in plain.param_groups for p in group["params"]]
    for grads in model_gradients(mine):
        for p, q, g in zip(mine.parameters(), theirs.parameters(), grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        clipper.clip([id(p) for p in params], [p.grad for p in params])
        plain.step()
    assert clipper.clipped > 20
    assert_all_close(list(mine.parameters()), list(theirs.parameters()))


def test_adagc_one_group_uses_the_global_norm_and_the_recipe_is_adamw():
    params = initial()
    ref_params = [p.clone() for p in params]
    ref = torch.optim.AdamW(ref_params, lr=1e-3, weight_decay=0.1)
    clipper = ReferenceAdaGC(1.05, 0.9, 20.0, 10)
    for grads in spiky_gradients():
        grads = [g.clone() for g in grads]
        clipper.clip(list(range(len(grads))), grads)
        for p, g in zip(ref_params, grads):
            p.grad = g
        ref.step()
    assert clipper.clipped > 20
    assert_all_close(run_mine("adagc", lr=1e-3, weight_decay=0.1, **ADAGC), ref_params)
    # the official defaults (lambda_rel 1.04, beta 0.99, lambda_abs 1, 100 warm-up steps)
    params = initial()
    ref = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    clipper = ReferenceAdaGC(1.04, 0.99, 1.0, 100)
    for grads in spiky_gradients(steps=STEPS):
        grads = [g.clone() for g in grads]
        clipper.clip(list(range(len(grads))), grads)
        for p, g in zip(params, grads):
            p.grad = g
        ref.step()
    assert_all_close(run_mine("adamw", lr=1e-3, weight_decay=0.1, adagc=True), params)


def test_adagc_sees_the_clipped_gradient_downstream_and_leaves_grad_alone():
    """Transforms after the clip that read ctx.grads (Conda's second moment, in its basis)
    see the clipped gradient, as the reference clips .grad in place; .grad is untouched."""
    w = torch.nn.Parameter(initial([(6, 4)])[0])
    ref = w.detach().clone().requires_grad_(True)
    opt = llmvalley.create_optimizer("conda", [w], adagc=True, **ADAGC)
    plain = llmvalley.create_optimizer("conda", [ref])
    clipper = ReferenceAdaGC(1.05, 0.9, 20.0, 10)
    for (g,) in spiky_gradients([(6, 4)], steps=40):
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        assert torch.equal(w.grad, g)
        clipper.clip([0], [ref.grad])
        plain.step()
    assert clipper.clipped > 5
    assert_all_close([w.detach()], [ref.detach()])


@pytest.mark.parametrize("implementation, warmup, passes", [
    ("fused", 10, 1),  # the warm-up's global norm and the clip share one norm pass
    ("foreach", 10, 1),
    ("fused", 0, 1),
    ("foreach", 0, 1),
])
def test_adagc_reads_the_gradients_once_for_its_norms(implementation, warmup, passes,
                                                       monkeypatch):
    """One group: the per-tensor norms of the clip are the ones the global norm of the
    warm-up takes (one ``_foreach_norm`` over the gradients per step, not two)."""
    params = [torch.nn.Parameter(t) for t in initial()]
    opt = llmvalley.create_optimizer("adamw", [{"params": params}], adagc=True,
                                     adagc_warmup=warmup, implementation=implementation,
                                     nonfinite="ignore")
    calls = []
    norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm",
                        lambda tensors, *a, **k: calls.append(len(tensors)) or norm(
                            tensors, *a, **k))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == [len(params)] * passes


def test_adagc_state_is_declared_and_counted():
    spec = llmvalley.get_spec("lion")
    assert spec.state_numel((8, 4), adagc=True) == spec.state_numel((8, 4)) + 1
    assert llmvalley.get_spec("adagc").state_numel((8, 4)) == 2 * 32 + 1
    model = make_model()
    opt = llmvalley.create_optimizer("muon", model, adagc=True)
    assert llmvalley.state_bytes(opt) == sum(
        4 * llmvalley.get_spec(g["optimizer"]).state_numel(
            tuple(p.shape), **{k: g[k] for k in llmvalley.get_spec(g["optimizer"]).defaults},
            adagc=True)
        for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize("name", ["adamw", "muon", "spam", "stable_spam"])
def test_resume_is_bit_exact_with_adagc(name):
    hp = dict(adagc=True, adagc_warmup=20)
    if name == "spam":
        hp.update(reset_interval=30, warmup_steps=10, clip_delay=3)
    if name == "stable_spam":
        hp.update(reset_interval=30, total_steps=80)

    def run(model, opt, start, stop):
        for grads in model_gradients(model, steps=stop)[start:]:
            for p, g in zip(model.parameters(), grads):
                p.grad = g.float()
            opt.step()

    ref = make_model()
    run(ref, llmvalley.create_optimizer(name, ref, **hp), 0, 60)
    model = make_model()
    opt = llmvalley.create_optimizer(name, model, **hp)
    run(model, opt, 0, 25)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = make_model(seed=7)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = llmvalley.create_optimizer(name, resumed, **hp)
    resumed_opt.load_state_dict(ckpt["opt"])
    run(resumed, resumed_opt, 25, 60)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,key,value", [
    ("spam", "threshold", -1.0), ("spam", "threshold", "big"), ("spam", "reset_interval", 1.5),
    ("spam", "reset_interval", -1), ("spam", "warmup_steps", -1), ("spam", "clip_delay", None),
    ("spam", "betas", (0.9, 0.99, 0.9)),
    ("stable_spam", "gamma1", 1.0), ("stable_spam", "gamma2", -0.1),
    ("stable_spam", "gamma3", "0.999"), ("stable_spam", "eta_min", 1.5),
    ("stable_spam", "total_steps", 0), ("stable_spam", "reset_interval", True),
    ("adagc", "adagc", False),
    ("adamw", "adagc", "yes"), ("adamw", "adagc_beta", 1.0), ("lion", "adagc_lambda_rel", 0),
    ("muon", "adagc_lambda_abs", -1.0), ("adamw", "adagc_warmup", -1),
    ("adamw", "adagc_warmup", 2.5), ("adamw", "adagc_lambda_rel", float("nan")),
])
def test_bad_hyperparameters_are_named(name, key, value):
    with pytest.raises(ValueError, match=rf"{name}: invalid {key}="):
        llmvalley.create_optimizer(name, [torch.nn.Parameter(torch.zeros(3, 2))],
                                   **{key: value})
