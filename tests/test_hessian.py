"""Curvature-aware optimizers: Sophia-G, Sophia-H, AdaHessian.

Differential tests in float64: Sophia-G against sophia-opt 0.2.2 (the official code) driven
with the same sampled-label gradients; Sophia-H and AdaHessian against independent references
written here from the papers' equations (and, for AdaHessian, the official code's spatial
averaging). The references take their own Hessian-vector products on their own parameter
copies; only the random probes are shared: the references rebuild them from the seed the
optimizer keeps in its state (``probe_seed``) with their own ``torch.Generator``, since the
official codes draw from torch's global generator, which a checkpoint does not hold.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmvalley
from llmvalley.optim import ChainOptimizer
from llmvalley.optim.transforms.hessian import next_probe_seed
from tests.helpers import VOCAB, batch, loss_fn, make_model, roundtrip

sophia_opt = pytest.importorskip("sophia_opt")


# ---- the curvature protocol, as a training loop follows it --------------------------------
def sampled_label_backward(model: nn.Module, step: int) -> None:
    """Sophia-G's estimator input: the mean loss on labels sampled from the model."""
    x, _ = batch(step)
    logits = model(x).reshape(-1, VOCAB)
    gen = torch.Generator().manual_seed(10_000 + step)
    labels = torch.multinomial(logits.detach().double().softmax(-1), 1, generator=gen)
    F.cross_entropy(logits, labels.reshape(-1)).backward()


def protocol_step(model: nn.Module, opt: ChainOptimizer, step: int) -> float:
    """One step: the step's backward with its graph when a Hessian-vector product is due,
    the sampled-label backward after the step when a Gauss-Newton estimate is due."""
    request = opt.curvature_request()
    loss = loss_fn(model, step)
    loss.backward(create_graph=request == "hessian_vector")
    if request == "hessian_vector":
        opt.update_curvature()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if opt.curvature_request() == "gauss_newton":
        sampled_label_backward(model, step)
        opt.update_curvature()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def protocol_train(model: nn.Module, opt: ChainOptimizer, start: int, steps: int) -> list[float]:
    return [protocol_step(model, opt, s) for s in range(start, start + steps)]


def double_model(seed: int = 0) -> nn.Module:
    return make_model(seed=seed, dtype=torch.float64)


# ---- schedules -----------------------------------------------------------------------------
def requests(name: str, steps: int, **hp) -> dict[int, str]:
    """The step numbers at which each kind of estimate is requested."""
    w = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    opt = ChainOptimizer([w], name, **hp)
    seen = {}
    for t in range(1, steps + 1):
        if opt.curvature_request() == "hessian_vector":
            seen[t] = "before"
        w.grad = torch.randn_like(w)
        opt.step()
        if opt.curvature_request() == "gauss_newton":
            seen[t] = "after"
    return seen


def test_estimates_are_requested_on_the_published_schedules():
    # Sophia-G: after steps k, 2k, ... (train_sophiag.py: iter_num % k == k - 1)
    assert requests("sophia", 35) == {10: "after", 20: "after", 30: "after"}
    assert requests("sophia", 7, hessian_interval=3) == {3: "after", 6: "after"}
    # Sophia-H: before steps with t mod k = 1 (Algorithm 3)
    assert requests("sophia_h", 25) == {1: "before", 11: "before", 21: "before"}
    # AdaHessian: before every step
    assert requests("adahessian", 4) == {t: "before" for t in range(1, 5)}


# ---- Sophia-G against sophia-opt ----------------------------------------------------------
def test_sophia_g_matches_sophia_opt():
    """100 steps on the tiny LM in float64 with ten Hessian refreshes; each refresh's
    sampled-label gradients are computed once and fed to both optimizers. Bit for bit: the
    clip divides by rho * bs * h, which amplifies any rounding difference where h is small."""
    mine, ref = double_model(), double_model()
    hp = dict(lr=2e-2, betas=(0.9, 0.95), rho=0.03, weight_decay=0.1)
    bs = 24  # tokens per step: 4 sequences of 6
    opt = ChainOptimizer(mine.parameters(), "sophia", bs=bs, **hp)
    ref_opt = sophia_opt.SophiaG(ref.parameters(), **hp)
    refreshes = 0
    for step in range(100):
        for model, o in ((mine, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            loss_fn(model, step).backward()
        opt.step()
        ref_opt.step(bs=bs)
        if opt.curvature_request() == "gauss_newton":
            refreshes += 1
            opt.zero_grad(set_to_none=True)
            sampled_label_backward(mine, step)
            ref_opt.zero_grad(set_to_none=True)
            for p, q in zip(mine.parameters(), ref.parameters()):
                q.grad = p.grad.clone()
            opt.update_curvature()
            ref_opt.update_hessian()
    assert refreshes == 10
    clipped = 0
    for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(opt.state[p]["hessian"], ref_opt.state[q]["hessian"]), name
        assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"]), name
        m, h = ref_opt.state[q]["exp_avg"], ref_opt.state[q]["hessian"]
        clipped += int((m.abs() >= hp["rho"] * bs * h).sum())
    # the run exercises both regimes of the clip (a saturated-only run would not test h)
    total = sum(p.numel() for p in mine.parameters())
    assert 0 < clipped < total


def test_sophia_without_estimates_is_signed_momentum():
    """Before the first estimate h = 0 and the step is lr * sign(m), as in the reference."""
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    start = w.detach().clone()
    opt = ChainOptimizer([w], "sophia", lr=0.1, weight_decay=0.0)
    g = torch.randn(4, 3, dtype=torch.float64)
    w.grad = g
    opt.step()
    torch.testing.assert_close(w.detach(), start - 0.1 * g.sign(), rtol=0, atol=1e-15)


# ---- Sophia-H against the paper -----------------------------------------------------------
def hutchinson_probe(seed: int, like: torch.Tensor, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(like.shape, generator=gen, dtype=like.dtype)
    return (torch.randint(0, 2, like.shape, generator=gen) * 2 - 1).to(like.dtype)


def reference_hvp(model: nn.Module, step: int, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    """H v of the step's loss on the reference's own parameters."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model, step), params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, probes))
    return [h.detach() for h in torch.autograd.grad(dot, params)]


def test_sophia_h_matches_the_paper():
    """Algorithm 3 with Algorithm 1's estimator over 60 steps with k = 5 (h refreshed before
    steps 1, 6, 11, ...): theta <- theta - lr * wd * theta, then
    theta <- theta - lr * clip(m / max(gamma * h, eps), 1).

    The library divides by gamma * max(h, 0) + eps (sophia-opt's form); eps = 1e-30 makes the
    two forms agree to rounding (with the default 1e-15 they differ by eps / (gamma * h), about
    1e-11 here, which the clip's 1 / (gamma * h) then amplifies)."""
    mine, ref = double_model(), double_model()
    lr, (b1, b2), gamma, wd, k, eps = 2e-2, (0.9, 0.95), 0.05, 0.1, 5, 1e-30
    opt = ChainOptimizer(mine.parameters(), "sophia_h", lr=lr, betas=(b1, b2), rho=gamma,
                         weight_decay=wd, eps=eps, hessian_interval=k)
    opt.init_state()
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    negative, clipped = 0, 0
    for t in range(1, 61):
        seeds = [int(opt.state[p]["probe_seed"]) for p in mine.parameters()]
        protocol_step(mine, opt, t - 1)
        if t % k == 1:
            u = [hutchinson_probe(s, p, "gaussian") for s, p in zip(seeds, params)]
            hu = reference_hvp(ref, t - 1, u)
            for i in range(len(params)):
                h[i] = b2 * h[i] + (1 - b2) * u[i] * hu[i]
            assert [int(opt.state[p]["probe_seed"]) for p in mine.parameters()] == \
                [next_probe_seed(s) for s in seeds]
        grads = torch.autograd.grad(loss_fn(ref, t - 1), params)
        with torch.no_grad():
            for p, g, mi, hi in zip(params, grads, m, h):
                mi.mul_(b1).add_(g, alpha=1 - b1)
                p.mul_(1 - lr * wd)
                ratio = (mi / torch.clamp(gamma * hi, min=eps)).clamp(-1, 1)
                p.sub_(lr * ratio)
                negative += int((hi < 0).sum())
                clipped += int((ratio.abs() == 1).sum())
    # the two Hessian-vector products round differently (another order of operations), and
    # the EMA of signed estimates and the clip amplify it (~1e-10 after 100 steps); a wrong
    # formula or schedule moves the parameters by ~lr = 1e-2
    for (name, p), q in zip(mine.named_parameters(), params):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-8, msg=name)
    total = 60 * sum(p.numel() for p in params)
    assert negative > 0 and 0 < clipped < total  # both signs of h and both clip regimes


def test_maximize_flips_the_hessian_estimate_too():
    """Maximising -f takes exactly the steps of minimising f (gradient and Hessian negated)."""
    runs = []
    for maximize in (False, True):
        model = double_model()
        opt = llmvalley.create_optimizer("sophia_h", model, lr=1e-2, maximize=maximize)
        for step in range(12):
            request = opt.curvature_request()
            loss = loss_fn(model, step) * (-1 if maximize else 1)
            loss.backward(create_graph=request == "hessian_vector")
            if request:
                opt.update_curvature()
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- AdaHessian against the paper and the official code ---------------------------------
class ConvNet(nn.Module):
    """Parameters of every dimension AdaHessian averages: 1-D, 2-D, 3-D, 4-D."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv2 = nn.Conv2d(2, 4, 2)
        self.conv1 = nn.Conv1d(4, 4, 3, bias=False)
        self.fc = nn.Linear(8, 4)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(x))                 # (n, 4, 3, 4)
        h = torch.tanh(self.conv1(h.flatten(2)))      # (n, 4, 10)
        return self.fc(h[..., :8])


def conv_loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(5, 2, 4, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 4, 4, generator=gen, dtype=torch.float64)
    return ((model(x) - y) ** 2).mean()


def reference_trace(hv: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """The official get_trace (instruction/adahessian.py): |Hz| averaged per dimension rule."""
    d = hv.abs()
    b = blocks[max(d.ndim, 1) - 1]
    if b != -1:
        return d.reshape(-1, b).mean(dim=1).repeat_interleave(b).view(d.shape)
    if d.ndim <= 1:
        return d
    return d.mean(dim={2: [1], 3: [2], 4: [2, 3]}[d.ndim], keepdim=True)


@pytest.mark.parametrize("blocks,power", [((-1, -1, -1, -1), 1.0), ((2, 4, 3, 4), 0.5)])
def test_adahessian_matches_the_reference(blocks, power):
    mine, ref = ConvNet(), ConvNet()
    lr, (b1, b2), eps, wd = 0.05, (0.9, 0.99), 1e-4, 0.01
    opt = ChainOptimizer(mine.parameters(), "adahessian", lr=lr, betas=(b1, b2), eps=eps,
                         weight_decay=wd, hessian_power=power,
                         spatial_average_block_size=blocks)
    opt.init_state()
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, 61):
        seeds = [int(opt.state[p]["probe_seed"]) for p in mine.parameters()]
        loss = conv_loss(mine, t)
        loss.backward(create_graph=True)
        opt.update_curvature()
        opt.step()
        opt.zero_grad(set_to_none=True)

        z = [hutchinson_probe(s, p, "rademacher") for s, p in zip(seeds, params)]
        grads = torch.autograd.grad(conv_loss(ref, t), params, create_graph=True)
        hz = torch.autograd.grad(grads, params, grad_outputs=z)
        with torch.no_grad():
            for p, g, hv, mi, vi in zip(params, grads, hz, m, v):
                d = reference_trace(hv, blocks)
                mi.mul_(b1).add_(g, alpha=1 - b1)
                vi.mul_(b2).addcmul_(d, d, value=1 - b2)
                denom = (vi.sqrt() ** power) / math.sqrt(1 - b2**t) ** power + eps
                p.sub_(lr * (mi / (1 - b1**t) / denom + wd * p))
    for (name, p), q, vi in zip(mine.named_parameters(), params, v):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)
        stored = opt.state[p]["exp_hessian_diag_sq"]
        torch.testing.assert_close(stored.expand_as(p), vi, rtol=1e-9, atol=1e-14)


def test_adahessian_state_shapes_and_bytes():
    model = ConvNet()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    opt = ChainOptimizer(model.parameters(), "adahessian")
    kept = {  # exp_avg (full) + the averaged second moment
        "conv2.weight": (4, 2, 1, 1), "conv2.bias": (4,), "conv1.weight": (4, 4, 1),
        "fc.weight": (4, 1), "fc.bias": (4,)}
    expected = sum(math.prod(shapes[n]) + math.prod(kept[n]) for n in shapes)
    assert llmvalley.state_bytes(opt) == 8 * expected
    conv_loss(model, 0).backward(create_graph=True)
    opt.update_curvature()
    opt.step()
    for n, p in model.named_parameters():
        assert tuple(opt.state[p]["exp_hessian_diag_sq"].shape) == kept[n]
    assert llmvalley.state_bytes(opt) == 8 * expected
    blocked = ChainOptimizer(model.parameters(), "adahessian",
                             spatial_average_block_size=(1, 3, 4, 4))
    assert llmvalley.state_bytes(blocked) == 8 * 2 * sum(p.numel() for p in model.parameters())


# ---- protocol end to end: resume, bf16, convergence ---------------------------------------
@pytest.mark.parametrize("name,hp", [("sophia", {"hessian_interval": 3}),
                                     ("sophia_h", {"hessian_interval": 3}),
                                     ("adahessian", {})])
def test_resume_across_refreshes_is_bit_exact(name, hp):
    """8 + 8 steps through a checkpoint equal 16 straight, with Hessian refreshes (and probe
    draws) on both sides of the checkpoint."""
    ref = make_model(seed=0)
    protocol_train(ref, llmvalley.create_optimizer(name, ref, **hp), 0, 16)
    model = make_model(seed=0)
    opt = llmvalley.create_optimizer(name, model, **hp)
    protocol_train(model, opt, 0, 8)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make_model(seed=123)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = llmvalley.create_optimizer(name, resumed, **hp)
    resumed_opt.load_state_dict(ckpt["opt"])
    protocol_train(resumed, resumed_opt, 8, 8)
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: {n} differs after resume"


@pytest.mark.parametrize("name,lr", [("sophia", 1e-2), ("sophia_h", 1e-2),
                                     ("adahessian", 0.05)])
def test_protocol_trains_the_tiny_lm_and_bf16_tracks_fp32(name, lr):
    ref = make_model(dtype=torch.bfloat16).float()
    ref_losses = protocol_train(ref, llmvalley.create_optimizer(name, ref, lr=lr), 0, 40)
    model = make_model(dtype=torch.bfloat16)
    opt = llmvalley.create_optimizer(name, model, lr=lr)
    losses = protocol_train(model, opt, 0, 40)
    assert sum(ref_losses[-5:]) < 0.6 * sum(ref_losses[:5])
    assert abs(sum(losses[-5:]) - sum(ref_losses[-5:])) / 5 < 0.05 * ref_losses[0]
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        for v in opt.state[p].values():
            assert not isinstance(v, torch.Tensor) or v.dtype == torch.float32


# ---- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,hp,key", [
    ("sophia", {"rho": -0.1}, "rho"),
    ("sophia", {"bs": 0}, "bs"),
    ("sophia", {"hessian_interval": 0}, "hessian_interval"),
    ("sophia", {"betas": (0.9,)}, "betas"),
    ("sophia_h", {"hessian_interval": 2.5}, "hessian_interval"),
    ("sophia_h", {"rho": float("nan")}, "rho"),
    ("sophia_h", {"eps": 0.0}, "eps"),
    ("adahessian", {"hessian_power": 1.5}, "hessian_power"),
    ("adahessian", {"spatial_average_block_size": (-1, 0, -1, -1)},
     "spatial_average_block_size"),
    ("adahessian", {"spatial_average_block_size": (-1, -1)}, "spatial_average_block_size"),
])
def test_invalid_hyperparameters_name_the_key(name, hp, key):
    w = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=key):
        ChainOptimizer([w], name, **hp)


def test_hessian_vector_methods_need_the_graph():
    model = make_model()
    opt = llmvalley.create_optimizer("adahessian", model)
    loss_fn(model, 0).backward()  # no create_graph
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.update_curvature()


def test_adahessian_rejects_what_it_cannot_average():
    five = nn.Parameter(torch.zeros(2, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="5-D"):
        ChainOptimizer([five], "adahessian").init_state()
    w = nn.Parameter(torch.randn(3, 5))
    opt = ChainOptimizer([w], "adahessian", spatial_average_block_size=(-1, 4, -1, -1))
    (w**3).sum().backward(create_graph=True)
    with pytest.raises(ValueError, match="does not divide"):
        opt.update_curvature()
