"""AdaFisher / AdaFisherW: differential test against an independent reference written from
the paper's equations and the official code's conventions (AtlasAnalyticsLab/AdaFisher), hooks
on a LLaMA-style model, resume, fallbacks and bad input.

The official code is not installable (no PyPI package), so it cannot run in CI; it was run by
hand on an MLP of Linear layers (where it pairs every parameter with its layer), and matched
this implementation to 1e-15 over 100 float64 steps.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from llmvalley.models.llama import Llama, LlamaConfig
from llmvalley.optim import ChainOptimizer
from llmvalley.optim.recipes.fisher import adafisher, adafisherw
from llmvalley.optim.transforms.fisher import attach_fisher

D = torch.float64


class Net(nn.Module):
    """Embedding -> Linear (bias) -> tanh -> RMSNorm -> Linear (no bias): both supported and
    unsupported modules."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.RMSNorm(8)
        self.fc2 = nn.Linear(8, 5, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.tanh(self.fc1(self.embed(idx)))))


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 10, (3, 4), generator=g), torch.randn(3, 4, 5, generator=g,
                                                                     dtype=D))
            for _ in range(n)]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-6)


def reference_run(net: Net, batches, lr: float, beta: float, gamma: float, damping: float,
                  interval: int, wd: float, decoupled: bool) -> None:
    """AdaFisher from the equations: a manual forward pass keeps each Linear's input and output
    gradient; H, S start at ones and take 0.1 gamma * old + 0.01 gamma * normalised new on
    steps t - 1 = 0 mod interval; m_hat / (S H^T + damping); F = 1 for other parameters."""
    E, W1, b1, g, W2 = (net.embed.weight, net.fc1.weight, net.fc1.bias, net.norm.weight,
                        net.fc2.weight)
    params = [E, W1, b1, g, W2]
    m = [torch.zeros_like(p) for p in params]
    H1, S1 = torch.ones(7, dtype=D), torch.ones(8, dtype=D)
    H2, S2 = torch.ones(8, dtype=D), torch.ones(5, dtype=D)
    for t, (idx, y) in enumerate(batches, start=1):
        e = E[idx]
        z1 = e @ W1.T + b1
        n = nn.functional.rms_norm(torch.tanh(z1), (8,), g)
        z2 = n @ W2.T
        z1.retain_grad()
        z2.retain_grad()
        for p in params:
            p.grad = None
        ((z2 - y) ** 2).mean().backward()
        with torch.no_grad():
            if (t - 1) % interval == 0:
                a1 = torch.cat([e.reshape(-1, 6), torch.ones(12, 1, dtype=D)], 1)
                for fac, new in ((H1, a1.square().mean(0)),
                                 (S1, z1.grad.reshape(-1, 8).square().mean(0)),
                                 (H2, n.reshape(-1, 8).square().mean(0)),
                                 (S2, z2.grad.reshape(-1, 5).square().mean(0))):
                    fac.copy_(0.1 * gamma * fac + 0.01 * gamma * _normalize(new))
            fishers = [1.0, torch.outer(S1, H1[:-1]) + damping, S1 * H1[-1] + damping, 1.0,
                       torch.outer(S2, H2) + damping]
            for p, mi, F in zip(params, m, fishers):
                grad = p.grad if decoupled else p.grad + wd * p
                mi.copy_(beta * mi + (1 - beta) * grad)
                p.sub_(lr * (mi / (1 - beta**t) / F + (wd * p if decoupled else 0.0)))


def _run(opt: torch.optim.Optimizer, net: nn.Module, batches) -> None:
    for idx, y in batches:
        opt.zero_grad()
        ((net(idx) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("spec", [adafisher, adafisherw], ids=lambda s: s.name)
def test_matches_reference_across_refreshes(spec):
    torch.manual_seed(0)
    mine, ref = Net().to(D), Net().to(D)
    ref.load_state_dict(mine.state_dict())
    hp = dict(lr=2e-3, betas=(0.9,), gamma=0.8, damping=1e-3, fisher_interval=7,
              weight_decay=0.05)
    opt = ChainOptimizer(mine.parameters(), spec, **hp)
    attach_fisher(opt, mine)
    batches = _batches(100)
    _run(opt, mine, batches)
    reference_run(ref, batches, 2e-3, 0.9, 0.8, 1e-3, 7, 0.05,
                  decoupled=spec.name == "adafisherw")
    for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    assert opt.state[mine.fc1.weight]["fisher_bound"] == 1.0
    assert opt.state[mine.embed.weight]["fisher_bound"] == 0.0


def test_without_hooks_warns_and_differs():
    torch.manual_seed(0)
    a, b = Net().to(D), Net().to(D)
    b.load_state_dict(a.state_dict())
    hooked = ChainOptimizer(a.parameters(), adafisher)
    attach_fisher(hooked, a)
    bare = ChainOptimizer(b.parameters(), adafisher)
    batches = _batches(1)  # one step: the same gradients on both sides
    _run(hooked, a, batches)
    with pytest.warns(UserWarning, match="no module hooks"):
        _run(bare, b, batches)
    assert not torch.allclose(a.fc1.weight, b.fc1.weight)  # F = 1 is a different step
    torch.testing.assert_close(a.norm.weight, b.norm.weight)  # unsupported: F = 1 in both


def test_llama_every_parameter_steps_and_state_is_declared():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, ffn_hidden=24,
                      max_seq_len=8)
    model = Llama(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = ChainOptimizer(model.parameters(), adafisherw, fisher_interval=2)
    hooks = attach_fisher(opt, model)
    assert len(hooks.modules) == 7 * cfg.n_layers + 1  # q k v o gate up down, lm_head
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            idx = torch.randint(0, 32, (2, 8))
            opt.zero_grad()
            model(idx, idx).backward()
            opt.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name  # the official code skips the last ones
        bound = opt.state[p].get("fisher_bound", 0.0)
        assert bound == (1.0 if name.endswith(("_proj.weight", "lm_head.weight")) else 0.0), name
    declared = sum(adafisherw.state_numel(p.shape) for p in model.parameters())
    assert declared == sum(p.numel() + (p.shape[-1] if p.ndim == 2 else 1) + p.shape[0]
                           for p in model.parameters())
    from llmvalley.optim import state_bytes
    assert state_bytes(opt) == 4 * declared
    hooks.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_resume_is_bit_exact_across_a_refresh():
    torch.manual_seed(0)
    batches = _batches(12, seed=1)
    full = Net().to(D)
    start = {k: v.clone() for k, v in full.state_dict().items()}
    opt = ChainOptimizer(full.parameters(), adafisher, fisher_interval=4)
    attach_fisher(opt, full)
    _run(opt, full, batches)

    first = Net().to(D)
    first.load_state_dict(start)
    opt1 = ChainOptimizer(first.parameters(), adafisher, fisher_interval=4)
    attach_fisher(opt1, first)
    _run(opt1, first, batches[:6])
    saved_model, saved_opt = first.state_dict(), opt1.state_dict()
    second = Net().to(D)
    second.load_state_dict(saved_model)
    opt2 = ChainOptimizer(second.parameters(), adafisher, fisher_interval=4)
    attach_fisher(opt2, second)
    opt2.load_state_dict(saved_opt)
    _run(opt2, second, batches[6:])  # refreshes at steps 9
    for p, q in zip(full.parameters(), second.parameters()):
        assert torch.equal(p, q)


def test_tied_weight_takes_the_fallback():
    emb = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = ChainOptimizer(model.parameters(), adafisher)
    assert attach_fisher(opt, model).modules == []


def test_refuses_modules_whose_statistics_are_not_implemented():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = ChainOptimizer(model.parameters(), adafisher)
    with pytest.raises(ValueError, match="LayerNorm"):
        attach_fisher(opt, model)
    # routed to another optimizer, the LayerNorm is no obstacle
    opt = ChainOptimizer([{"params": model[0].parameters()},
                          {"params": model[1].parameters(), "optimizer": "adamw"}], adafisher)
    assert len(attach_fisher(opt, model).modules) == 1


@pytest.mark.parametrize("key, value", [("gamma", 1.0), ("gamma", -0.1), ("damping", 0.0),
                                        ("damping", float("inf")), ("fisher_interval", 0),
                                        ("fisher_interval", 2.5), ("betas", (0.9, 0.99)),
                                        ("betas", (1.0,))])
def test_bad_hyperparameters_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        ChainOptimizer([nn.Parameter(torch.zeros(2, 2))], adafisherw, **{key: value})
