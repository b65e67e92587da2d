"""MicroAdam (Modoranu et al., NeurIPS 2024, arXiv 2405.15593) against an independent
reference of the paper's Algorithm 1 with the official code's conventions.

The official optimizer (ista-daslab-optimizers 1.1.15, ``micro_adam.py``) runs only through
its CUDA kernels (ISTA-DASLab-Optimizers-CUDA), and only on bf16 tensors: it cannot run on this
CPU machine, and not in float64. The reference below is therefore written from Algorithm 1 and
the kernels' conventions (read, not run): error feedback added before Top-K; Top-K per block of
``topk_block_size`` (``ceil(density * block)`` per full block, ``ceil(density * rest)`` in the
last one); indices block-local int16, values bf16, row ``(t - 1) % m`` of the ring; the
residual quantized to 4 bits per bucket with bf16 min/max, ``u = (max - min) / 15`` and
``floor((x - min) / u + 1/2)``, two codes a byte with the even element in the high nibble;
``m = sum beta1^age V``, ``v = sum beta2^age V^2`` (newest age 0) and the step
``c1 m / (sqrt(c2 v) + eps)`` with ``c_j = (1 - beta_j) / (1 - beta_j^t)``; decoupled weight
decay before the update. It keeps the window as a list of dense global-index arrays and the
error feedback as Python lists of codes per bucket, so it shares no code with the transform.
"""

from __future__ import annotations

import io
import math
from collections import deque

import pytest
import torch

import llmvalley

F64 = torch.float64


# ---- the reference ---------------------------------------------------------------------------
def bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bf16 and back (what the reference stores)."""
    return x.to(torch.bfloat16).to(x.dtype)


class Reference:
    """Algorithm 1 for one flat tensor, float64, written plainly."""

    def __init__(self, d: int, m: int, density: float, block: int, qsize: int) -> None:
        self.d, self.m, self.qsize = d, m, qsize
        self.block = min(d, block)
        self.full = d // self.block
        self.k_many = math.ceil(self.block * density)
        self.k_few = math.ceil((d - self.full * self.block) * density)
        self.window: deque = deque(maxlen=m)  # (global indices, values), newest last
        self.rows: list = [None] * m  # the same entries by ring row, for the layout test
        self.buckets = [(b, min(b + qsize, d)) for b in range(0, d, qsize)]
        self.codes = [[0] * (hi - lo) for lo, hi in self.buckets]
        self.ranges = [(0.0, 0.0)] * len(self.buckets)
        self.t = 0

    def dequantized(self) -> torch.Tensor:
        out = []
        for codes, (lo, hi) in zip(self.codes, self.ranges):
            u = (hi - lo) / 15
            out += [lo + c * u for c in codes]
        return torch.tensor(out, dtype=F64)

    def direction(self, g: torch.Tensor, beta1: float, beta2: float, eps: float) -> torch.Tensor:
        self.t += 1
        a = g.reshape(-1).clone() + self.dequantized()
        chosen = []
        starts = [b * self.block for b in range(self.full)]
        sizes = [self.k_many] * self.full
        if self.k_few:
            starts.append(self.full * self.block)
            sizes.append(self.k_few)
        for start, keep in zip(starts, sizes):
            part = a[start:start + self.block].abs()
            order = sorted(range(part.numel()), key=lambda j: -part[j].item())
            chosen += [start + j for j in order[:keep]]
        index = torch.tensor(chosen, dtype=torch.int64)
        values = bf16(a[index])
        self.window.append((index, values))
        self.rows[(self.t - 1) % self.m] = (index, values)
        a[index] = 0.0
        for b, (lo_i, hi_i) in enumerate(self.buckets):
            x = a[lo_i:hi_i]
            lo, hi = bf16(x.min()).item(), bf16(x.max()).item()
            u = (hi - lo) / 15
            self.ranges[b] = (lo, hi)
            self.codes[b] = [0 if u == 0 else min(15, max(0, math.floor((v - lo) / u + 0.5)))
                             for v in x.tolist()]
        m_acc = torch.zeros(self.d, dtype=F64)
        v_acc = torch.zeros(self.d, dtype=F64)
        for age, (idx, val) in enumerate(reversed(self.window)):
            m_acc[idx] += beta1**age * val
            v_acc[idx] += beta2**age * val**2
        c1 = (1 - beta1) / (1 - beta1**self.t)
        c2 = (1 - beta2) / (1 - beta2**self.t)
        return (c1 * m_acc / ((c2 * v_acc).sqrt() + eps)).reshape(g.shape)


def reference_run(params, grads_fn, steps, lr, wd, hp_by_param, betas=(0.9, 0.999), eps=1e-8):
    refs = [Reference(p.numel(), **hp) for p, hp in zip(params, hp_by_param)]
    ps = [p.detach().clone() for p in params]
    for step in range(steps):
        grads = grads_fn(step, ps)
        for i, (p, g) in enumerate(zip(ps, grads)):
            u = refs[i].direction(g, *betas, eps)
            ps[i] = p * (1 - lr * wd) - lr * u
    return ps, refs


def gradients(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=gen, dtype=F64) + 0.5 * p for p in params]


# ---- the optimizer under test ----------------------------------------------------------------
MATRIX_HP = dict(m=10, k_init=0.05, topk_block_size=256, quant_block_size=100)
VECTOR_HP = dict(m=10, k_init=0.1, topk_block_size=8, quant_block_size=10)


def ours(steps: int, lr=1e-2, wd=0.1):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40, 30, dtype=F64))  # 4 full Top-K blocks + a rest
    b = torch.nn.Parameter(torch.randn(37, dtype=F64))  # odd: a lone high nibble
    start = [w.detach().clone(), b.detach().clone()]
    opt = llmvalley.create_optimizer(
        "microadam", [{"params": [w], **MATRIX_HP}, {"params": [b], **VECTOR_HP}],
        lr=lr, weight_decay=wd)
    for step in range(steps):
        for p, g in zip((w, b), gradients(step, [w.detach(), b.detach()])):
            p.grad = g
        opt.step()
    return (w, b), start, opt


def decode_window(slot: torch.Tensor, m: int, k: int):
    raw = slot.view(torch.uint8)
    idx = raw[:2 * m * k].view(torch.int16).view(m, k)
    val = raw[2 * m * k:4 * m * k].view(torch.bfloat16).view(m, k)
    return idx.to(torch.int64), val.to(F64)


def test_matches_the_reference_over_100_steps():
    """100 steps (ten windows), two Top-K layouts (full blocks plus a shorter one; one
    block), quant buckets with a partial one and an odd count, weight decay."""
    steps, lr, wd = 100, 1e-2, 0.1
    (w, b), start, opt = ours(steps, lr, wd)
    expected, refs = reference_run(start, gradients, steps, lr, wd,
                                   [dict(m=10, density=0.05, block=256, qsize=100),
                                    dict(m=10, density=0.1, block=8, qsize=10)])
    torch.testing.assert_close(w.detach(), expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), expected[1], rtol=1e-12, atol=1e-12)
    assert not torch.equal(w.detach(), start[0] * (1 - lr * wd) ** steps)  # it did move

    # the stored state decodes to the reference's window, codes and bucket ranges
    for p, ref in zip((w, b), refs):
        st = opt.state[p]
        k = ref.full * ref.k_many + ref.k_few
        idx, val = decode_window(st["window"], ref.m, k)
        offsets = torch.arange(k) // ref.k_many * ref.block
        for row, (gidx, gval) in enumerate(ref.rows):
            got = sorted(zip((idx[row] + offsets).tolist(), val[row].tolist()))
            assert got == sorted(zip(gidx.tolist(), gval.tolist())), row
        raw = st["error"].view(torch.uint8)[:math.ceil(p.numel() / 2)]
        codes = torch.stack([raw >> 4, raw & 15], 1).reshape(-1)[:p.numel()]
        assert codes.tolist() == [c for bucket in ref.codes for c in bucket]
        nb = len(ref.buckets)
        both = st["error_range"].view(torch.uint8)[:4 * nb].view(torch.bfloat16).to(F64)
        assert list(zip(both[:nb].tolist(), both[nb:].tolist())) == ref.ranges


def test_update_is_sparse_and_error_feedback_keeps_the_rest():
    w = torch.nn.Parameter(torch.zeros(1000, dtype=F64))
    opt = llmvalley.create_optimizer("microadam", [w], lr=1.0, k_init=0.01,
                                     topk_block_size=250, quant_block_size=100)
    g = torch.randn(1000, dtype=F64, generator=torch.Generator().manual_seed(3))
    w.grad = g.clone()
    opt.step()
    moved = w.detach() != 0
    assert moved.sum() == 4 * 3  # ceil(2.5) per block of 250
    top = g.abs().view(4, 250).topk(3, dim=1).values
    assert (g.abs()[moved].view(4, 3).sort(dim=1).values
            == top.sort(dim=1).values).all()
    # step 1: c1 m / sqrt(c2 v) = V / |V| (up to eps): a unit step on the kept coordinates
    torch.testing.assert_close(w.detach()[moved], -torch.sign(g[moved]), rtol=1e-6, atol=0)
    # the error feedback holds the residual to half a quantization step
    raw = opt.state[w]["error"].view(torch.uint8)[:500]
    codes = torch.stack([raw >> 4, raw & 15], 1).reshape(-1).to(F64)
    ranges = opt.state[w]["error_range"].view(torch.uint8)[:40].view(torch.bfloat16).to(F64)
    lo, hi = ranges[:10].repeat_interleave(100), ranges[10:].repeat_interleave(100)
    residual = torch.where(moved, 0.0, g)
    err = lo + codes * (hi - lo) / 15
    assert ((err - residual).abs() <= (hi - lo) / 30 + 1e-2 * residual.abs().max()).all()


def test_state_bytes_is_the_papers_formula():
    """0.5 d + 4 m k bytes (4-bit error, int16 indices + bf16 values in the window) plus two
    bf16 numbers per quantization bucket, before and after the first step."""
    layer = torch.nn.Linear(512, 256)  # weight d = 131072 (8 | d), bias d = 256
    opt = llmvalley.create_optimizer("microadam", list(layer.parameters()))
    m, block, qsize = 10, 20864, 100_000

    def paper(d):
        blk = min(d, block)
        full = d // blk
        k = full * math.ceil(blk * 0.01) + math.ceil((d - full * blk) * 0.01)
        return d // 2 + 4 * m * k + 4 * math.ceil(d / qsize)

    expected = paper(131072) + paper(256)
    assert paper(131072) == 65536 + 4 * 10 * (6 * 209 + 59) + 4 * 2
    assert llmvalley.state_bytes(opt) == expected
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert llmvalley.state_bytes(opt) == expected
    assert expected < 0.95 * sum(p.numel() for p in layer.parameters())  # vs Adam's 8 d


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_resume_is_bit_exact_past_the_window():
    def make():
        torch.manual_seed(1)
        return [torch.nn.Parameter(torch.randn(24, 20)), torch.nn.Parameter(torch.randn(7))]

    def opt_for(ps):
        return llmvalley.create_optimizer("microadam", ps, lr=1e-2, m=4, k_init=0.1,
                                          topk_block_size=64, quant_block_size=32)

    def run(ps, opt, start, steps):
        for step in range(start, start + steps):
            for p, g in zip(ps, gradients(step, [p.detach().double() for p in ps])):
                p.grad = g.float()
            opt.step()

    ref = make()
    run(ref, opt_for(ref), 0, 25)
    ps = make()
    opt = opt_for(ps)
    run(ps, opt, 0, 11)
    ckpt = roundtrip({"p": [p.detach().clone() for p in ps], "opt": opt.state_dict()})
    fresh = [torch.nn.Parameter(p) for p in ckpt["p"]]
    fresh_opt = opt_for(fresh)
    fresh_opt.load_state_dict(ckpt["opt"])
    run(fresh, fresh_opt, 11, 14)
    for a, b in zip(ref, fresh):
        assert torch.equal(a, b)


def test_bf16_parameters_step_in_float32():
    torch.manual_seed(2)
    start = torch.randn(16, 12).to(torch.bfloat16)
    low = torch.nn.Parameter(start.clone())
    high = torch.nn.Parameter(start.float())
    hp = dict(lr=1e-2, k_init=0.2, quant_block_size=64)
    opts = [llmvalley.create_optimizer("microadam", [p], **hp) for p in (low, high)]
    g = torch.randn(16, 12).to(torch.bfloat16)
    low.grad, high.grad = g.clone(), g.float()
    for opt in opts:
        opt.step()
    assert low.dtype == torch.bfloat16
    assert torch.equal(low.detach(), high.detach().to(torch.bfloat16))
    assert not torch.equal(low.detach(), start)
    assert all(v.dtype == torch.float32 for v in opts[0].state[low].values()
               if isinstance(v, torch.Tensor))
    # and it learns: a bf16 regression
    x = torch.randn(64, 12)
    target = (x @ torch.randn(12, 4)).to(torch.bfloat16)
    w = torch.nn.Parameter(torch.zeros(12, 4, dtype=torch.bfloat16))
    opt = llmvalley.create_optimizer("microadam", [w], lr=3e-2, k_init=0.25)
    losses = []
    for _ in range(150):
        loss = ((x.to(torch.bfloat16) @ w - target).float() ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("key,value", [
    ("m", 0), ("m", 2.5), ("k_init", 0.0), ("k_init", 1.5), ("k_init", "0.01"),
    ("topk_block_size", 0), ("topk_block_size", 40_000), ("topk_block_size", True),
    ("quant_block_size", 3), ("quant_block_size", 0), ("betas", (0.9,)), ("eps", -1.0),
    ("lr", -1.0),
])
def test_bad_hyperparameters_are_named(key, value):
    with pytest.raises(ValueError, match=key):
        llmvalley.create_optimizer("microadam", [torch.nn.Parameter(torch.zeros(3, 2))],
                                   **{key: value})


def test_window_weights_are_not_rebuilt_from_host_memory(monkeypatch):
    """The ``beta**age`` weights of the window are made once per (beta, window, dtype,
    device), not built with ``torch.tensor(..., device=...)`` in every step: on CUDA that copy
    blocks until the stream has run its queued work. (The reference tests above check the
    steps' values.)"""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    opt = llmvalley.create_optimizer("microadam", list(layer.parameters()), lr=1e-2)
    made = []
    real = torch.tensor
    for step in range(4):
        if step == 2:
            monkeypatch.setattr(torch, "tensor",
                                lambda *a, **k: made.append(a) or real(*a, **k))
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        before = layer.weight.detach().clone()
        opt.step()
        assert not torch.equal(before, layer.weight)
    assert made == []
