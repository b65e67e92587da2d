"""Low-precision optimizer state end to end: adamw8bit / adamw4bit against torchao's AdamW8bit
/ AdamW4bit, and 8-bit AdamW against float32 AdamW on the ``nano`` language model.

torchao quantizes a tensor only when its size is a multiple of the block size, so the
comparison uses such shapes (ours also quantizes partial blocks). torchao compiles its step
with ``torch.compile``; the comparison runs it eagerly (same operations, no minutes of C++
compilation on a 2-core CI machine).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llmvalley

SHAPES = [(64, 128), (32, 256), (10,)]


def run(make, steps: int = 20) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) + 0.1
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("ours,theirs", [("adamw8bit", "AdamW8bit"), ("adamw4bit", "AdamW4bit")])
def test_matches_torchao(ours, theirs, monkeypatch):
    optim = pytest.importorskip("torchao.optim")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    expected, ref_opt = run(lambda ps: getattr(optim, theirs)(ps, **hp))
    got, opt = run(lambda ps: llmvalley.create_optimizer(ours, ps, **hp))
    plain, _ = run(lambda ps: llmvalley.create_optimizer("adamw", ps, **hp))
    for e, g, f in zip(expected, got, plain):
        step_ref = (e - f).norm()
        # the same quantized trajectory: ours is far closer to torchao than to fp32 AdamW
        # (a rare code flip where an fp32 rounding difference crosses a midpoint is allowed)
        assert (g - e).norm() <= 1e-3 * e.norm()
        if e.numel() >= 4096:
            assert (g - e).norm() < 0.05 * step_ref, (ours, tuple(e.shape))
    for p, q in zip(opt.param_groups[0]["params"], ref_opt.param_groups[0]["params"]):
        if p.numel() < 4096:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            codes = opt.state[p][key]
            assert codes.dtype == torch.uint8
            same = (codes.reshape(-1) == ref_opt.state[q][key].codes.reshape(-1)).float()
            same = same.mean().item()
            assert same > 0.999, (ours, key, same)


def test_adamw8bit_tracks_fp32_adamw_on_nano(tmp_path):
    """200 steps of nano (default data, batch and schedule): the final validation loss of 8-bit
    AdamW is within 0.02 nats of float32 AdamW's.

    At lr 1e-3. At the CLI's default 3e-3 this short run is chaotic: float32 AdamW itself lands
    0.015 nats apart with torch's fused kernel and with the foreach chain (the same math in
    another order), so a 0.02 bound would measure that, not quantization. At 1e-3 the two
    float32 runs agree to 1e-7 and 8-bit AdamW lands 0.006 nats from them (CPU, seed 0).
    """
    from llmvalley.bench import train

    common = dict(model="nano", steps=200, eval_every=200, eval_batches=8, quiet=True,
                  progress=False, out=str(tmp_path), lr=1e-3)
    fp32 = train({**common, "optimizer": "adamw", "name": "fp32"})
    int8 = train({**common, "optimizer": "adamw8bit", "name": "int8"})
    assert fp32["final_val_loss"] < 3.0  # it learned
    assert abs(int8["final_val_loss"] - fp32["final_val_loss"]) < 0.02, (int8, fp32)
    assert int8["state_bytes"] < 0.3 * fp32["state_bytes"]
