"""Ranger21 against an independent reference of the official code's equations.

The official code (lessw2020/Ranger21) is not on PyPI, so :class:`Ranger21Reference` below
re-states its update in float64, step by step in the code's order, with the departures the
catalogue documents: the stable weight decay and norm loss reach every parameter (the code's
stale loop variable applies them to one; fixed upstream in PR 54), the gradient is
standardized once for both moments (the code does it twice, in place, for the first), and
there is no AMSGrad buffer (the code's maximum is a no-op).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import llmvalley
from llmvalley.optim import ChainOptimizer
from llmvalley.optim.catalogue.ranger import ENTRIES
from llmvalley.optim.recipes.ranger import SPECS
from llmvalley.optim.transforms.ranger import ranger21_lr, warmup_length
from tests.helpers import make_model, roundtrip, train


def ranger21_spec():
    """The registered spec, or this module's (with its catalogue entry) until it is wired."""
    if "ranger21" in {s.name for s in llmvalley.list_optimizers()}:
        return llmvalley.get_spec("ranger21")
    return replace(SPECS[0], about=ENTRIES["ranger21"], _chains={}, _full_chains={})


SPEC = ranger21_spec()


# ---- the reference ---------------------------------------------------------------------------
def ref_unit_norm(x: torch.Tensor) -> torch.Tensor:
    """The code's unit_norm: whole tensor up to 1-D, dim 1 for 2-D/3-D, dims 1.. from 4-D."""
    if x.dim() <= 1:
        return x.norm(p=2)
    if x.dim() in (2, 3):
        return x.norm(p=2, dim=1, keepdim=True)
    return x.norm(p=2, dim=tuple(range(1, x.dim())), keepdim=True)


class Ranger21Reference:
    """Ranger21's AdamW/PNM path with every component on, written from the code's equations."""

    def __init__(self, groups, *, lr, total_steps, betas=(0.9, 0.999), eps=1e-8,
                 agc_clip=1e-2, agc_eps=1e-3, warmdown_start_pct=0.72, min_lr=3e-5,
                 norm_loss=1e-4, softplus_beta=50.0, k=5, alpha=0.5):
        self.groups = groups  # [(params, weight_decay)]
        self.lr, self.total, self.betas, self.eps = lr, total_steps, betas, eps
        self.agc_clip, self.agc_eps = agc_clip, agc_eps
        self.min_lr, self.norm_loss, self.beta_sp = min_lr, norm_loss, softplus_beta
        self.k, self.alpha = k, alpha
        beta_iters = math.ceil(2 / (1 - betas[1]))  # Ma & Yarats, capped at 22% of short runs
        self.warmup = (int(0.22 * total_steps) if beta_iters / total_steps > 0.45
                       else beta_iters)
        self.start_warmdown = int(warmdown_start_pct * total_steps)
        self.t, self.merge_count = 0, 0
        self.state = {}
        for params, _ in groups:
            for p in params:
                self.state[p] = dict(m=torch.zeros_like(p), neg=torch.zeros_like(p),
                                     v=torch.zeros_like(p), slow=p.detach().clone())

    def schedule(self, t):
        lr = self.lr
        if t <= self.warmup:
            lr = lr * min(1.0, t / self.warmup)
        if t >= self.start_warmdown:
            pct = min((t + 1 - self.start_warmdown) / (self.total - self.start_warmdown + 1), 1)
            lr = max(self.lr - (self.lr - self.min_lr) * pct, self.min_lr)
        return lr

    @torch.no_grad()
    def step(self):
        beta1, beta2 = self.betas
        self.t += 1
        t = self.t
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        size, v_sum, grads = 0, 0.0, {}
        for params, _ in self.groups:  # phase 1: gradient, second moment, their sum
            for p in params:
                g = p.grad.clone()
                p_norm = ref_unit_norm(p).clamp(min=self.agc_eps)
                g_norm = ref_unit_norm(g)
                limit = p_norm * self.agc_clip
                g = torch.where(g_norm > limit, g * (limit / g_norm.clamp(min=1e-6)), g)
                if g.dim() > 1:
                    g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
                if g.numel() > 2:
                    g = g / (g.std() + 1e-8)
                st = self.state[p]
                st["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                v_sum += (st["v"] / bc2).sum().item()
                size += p.numel()
                grads[p] = g
        v_norm = math.sqrt(v_sum / size)
        lr = self.schedule(t)
        noise = math.sqrt((1 + beta2) ** 2 + beta2**2)
        for params, wd in self.groups:  # phase 2: decay, norm loss, PNM step
            for p in params:
                st = self.state[p]
                p.mul_(1 - wd * lr / v_norm)
                corr = 2 * self.norm_loss * (1 - 1 / (ref_unit_norm(p) + self.eps))
                p.mul_(1 - lr * corr)
                cur, other = (st["m"], st["neg"]) if t % 2 == 1 else (st["neg"], st["m"])
                cur.mul_(beta1**2).add_(grads[p], alpha=1 - beta1**2)
                denom = F.softplus(st["v"].sqrt() / math.sqrt(bc2) + self.eps,
                                   beta=self.beta_sp)
                pn = (2 * cur - other) / noise
                p.addcdiv_(pn, denom, value=-lr / bc1)
        self.merge_count += 1
        if self.merge_count >= self.k:  # Lookahead
            self.merge_count = 0
            for params, _ in self.groups:
                for p in params:
                    st = self.state[p]
                    p.mul_(self.alpha).add_(st["slow"], alpha=1 - self.alpha)
                    st["slow"].copy_(p)


SHAPES = [(6, 5), (5,), (2, 3, 4), (2, 2, 2, 2), ()]


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
            for s in SHAPES]


def gradients(step, gen):
    """Random gradients whose scale alternates, so AGC clips some units and spares others."""
    scale = 0.01 if step % 3 == 0 else 1.0
    return [torch.randn(s, generator=gen, dtype=torch.float64) * scale
            * (1 + torch.arange(max(1, math.prod(s)), dtype=torch.float64)
               .reshape(s if s else ()).remainder(3)) for s in SHAPES]


DECAYED, PLAIN = [0, 2, 3], [1, 4]  # two groups: the normaliser spans both


def run_pair(steps=100, total_steps=100, reference=True, **hp):
    """Ours and (with ``reference``) the reference, from the same start and gradients."""
    ours_p, ref_p = make_params(), make_params()
    common = dict(lr=hp.pop("lr", 3e-2), total_steps=total_steps)
    opt = ChainOptimizer(
        [{"params": [ours_p[i] for i in DECAYED], "weight_decay": 0.05},
         {"params": [ours_p[i] for i in PLAIN], "weight_decay": 0.0}],
        SPEC, **common, **hp)
    ref = None
    if reference:
        ref_hp = {("min_lr" if k == "warmdown_min_lr" else k): v for k, v in hp.items()}
        ref = Ranger21Reference([([ref_p[i] for i in DECAYED], 0.05),
                                 ([ref_p[i] for i in PLAIN], 0.0)], **common, **ref_hp)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for a, b, g in zip(ours_p, ref_p, gradients(step, gen)):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        if ref is not None:
            ref.step()
    return ours_p, ref_p, opt


@pytest.mark.parametrize("hp", [
    {},  # the defaults: warm-up of 22 steps (2000 > 45% of 100), warm-down from step 72
    dict(norm_loss=1e-2, agc_clip=0.05, warmdown_min_lr=1e-3, alpha=0.8, k=3),
])
def test_matches_reference_over_warmup_warmdown_and_lookahead(hp):
    ours, ref, _ = run_pair(**hp)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)


def test_reference_is_sensitive_to_each_component():
    """The comparison would catch a missing piece: turning one off moves the weights."""
    base, _, _ = run_pair(steps=30, reference=False)
    for change in (dict(norm_loss=0.0), dict(alpha=1.0), dict(softplus_beta=None),
                   dict(agc_clip=None), dict(warmup_steps=0), dict(centralize=False),
                   dict(normalize=False), dict(pnm_momentum=0.0)):
        other, _, _ = run_pair(steps=30, reference=False, **change)
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(base, other)), change


def test_schedule_points():
    lr, total = 1.0, 100
    w = warmup_length(total, 0.999, None)
    assert w == 22 and warmup_length(10_000, 0.999, None) == 2000
    assert warmup_length(total, 0.999, 7) == 7
    at = [ranger21_lr(lr, t, total, w, 0.72, 0.1) for t in (1, 22, 23, 71, 72, 100, 130)]
    assert at[:4] == pytest.approx([1 / 22, 1.0, 1.0, 1.0])
    assert at[4] == pytest.approx(1 - 0.9 / 29)  # first warm-down step: 1 of 29
    assert at[5:] == pytest.approx([0.1, 0.1])


def test_stable_decay_normalises_over_every_group():
    """One group alone gets another normaliser than the same group beside a second one."""
    def final(with_other):
        w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.float64))
        other = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        groups = [{"params": [w], "weight_decay": 0.5}]
        if with_other:
            groups.append({"params": [other], "weight_decay": 0.0})
        opt = ChainOptimizer(groups, SPEC, lr=0.1, total_steps=10, warmup_steps=0,
                             norm_loss=0.0, agc_clip=None, centralize=False, normalize=False)
        w.grad = torch.full((4, 4), 1e-3, dtype=torch.float64)
        other.grad = torch.full((3,), 1.0, dtype=torch.float64)
        opt.step()
        return w.detach().clone()

    assert not torch.allclose(final(False), final(True))


def test_state_gradient_and_memory():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = ChainOptimizer([w], SPEC, total_steps=10)
    g = torch.randn(4, 3)
    w.grad = g.clone()
    opt.step()
    assert torch.equal(w.grad, g)
    assert sorted(opt.state[w]) == ["exp_avg", "exp_avg_sq", "neg_exp_avg", "slow_param",
                                    "step"]
    assert SPEC.state_numel((4, 3), total_steps=10) == 4 * 12
    assert llmvalley.state_bytes(opt) == 4 * 12 * 4


@pytest.mark.parametrize("key,value", [
    ("total_steps", None), ("total_steps", 0), ("warmup_steps", -1),
    ("warmdown_start_pct", 1.5), ("warmdown_min_lr", -1.0), ("agc_clip", 0.0),
    ("agc_eps", -1.0), ("centralize", 1), ("pnm_momentum", -0.5), ("softplus_beta", 0.0),
    ("norm_loss", -1e-4), ("k", 0), ("alpha", 0.0), ("cautious", True), ("betas", (0.9,)),
])
def test_bad_hyperparameters_name_the_key(key, value):
    hp = {"total_steps": 10, key: value}
    with pytest.raises(ValueError, match=key):
        ChainOptimizer([torch.nn.Parameter(torch.zeros(3, 2))], SPEC, **hp)


def test_resume_is_bit_exact_across_sync_and_warmdown():
    hp = dict(total_steps=40, lr=1e-2)  # warm-up 8, warm-down from 28, syncs every 5 steps

    def make(seed):
        return make_model(seed=seed)

    ref = make(0)
    train(ref, llmvalley.create_optimizer(SPEC, ref, **hp), 0, 36)
    model = make(0)
    opt = llmvalley.create_optimizer(SPEC, model, **hp)
    train(model, opt, 0, 13)  # mid Lookahead cycle, mid warm-up/flat
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make(5)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = llmvalley.create_optimizer(SPEC, resumed, **hp)
    resumed_opt.load_state_dict(ckpt["opt"])
    train(resumed, resumed_opt, 13, 23)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

