"""Stable-SPAM's CPU kernel of the fused tier (``kernels/stable_spam.cpp``): two passes per
tensor (three while many elements come near the clipping limit). It must leave the foreach
chain's parameters, moments and three statistics to float32 rounding, through spikes that
the AdaClip clips, momentum resets, the cosine factor of ``total_steps``, weight decay,
``maximize``, a zero gradient, several threads and a resume across tiers; and step aside
where it cannot run.
"""

from __future__ import annotations

import pytest
import torch

import llmvalley
from llmvalley.optim import kernels
from llmvalley.optim.spec import execution_tier
from tests.helpers import max_moved, roundtrip

#: a matrix above a thread's 4096 kept elements (its first steps take the norm's own pass,
#: its later ones keep the elements near the peak aside), a vector with a tail, a tensor whose
#: gradient is zero (AdaGN leaves it alone), small tensors
SHAPES = [(300, 257), (4133,), (9, 5), (7,), ()]
ZERO = 2  # the index of the tensor with a zero gradient
STEPS = 14


def gradients(step: int, dtype=torch.float32) -> list[torch.Tensor]:
    """Drifting gradients with spikes: every 4th step a few coordinates of a tensor jump
    50-fold (the AdaClip clips them), every 5th step a whole tensor is scaled by 20."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for i, s in enumerate(SHAPES):
        g = torch.randn(s, generator=gen) * (1.0 + 0.1 * step)
        if i == ZERO:
            g = torch.zeros(s)
        elif step % 4 == 0 and g.numel() > 1:
            g.view(-1)[step % 3:: 997] *= 50.0
        if step % 5 == 0 and i == step % len(SHAPES):
            g = g * 20.0
        out.append(g.to(dtype))
    return out


def run(implementation: str, steps: int = STEPS, dtype=torch.float32, opt=None, params=None,
        start: int = 0, **hp):
    """``steps`` steps of stable_spam from ``start``; the parameters and the optimizer."""
    if params is None:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    if opt is None:
        opt = llmvalley.create_optimizer("stable_spam", params, implementation=implementation,
                                         nonfinite="ignore", lr=1e-2, **hp)
    for step in range(start, start + steps):
        for p, g in zip(params, gradients(step, dtype)):
            p.grad = g
        opt.step()
    return params, opt


def assert_same(got, expected, opt, ref) -> None:
    tol = dict(rtol=1e-5, atol=1e-6)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **tol)
    for a, b in zip(opt.state.values(), ref.state.values(), strict=True):
        assert a.keys() == b.keys()
        for k, v in b.items():
            torch.testing.assert_close(a[k], v, **tol, msg=k)


@pytest.mark.parametrize("hp", [
    {},
    {"reset_interval": 5, "weight_decay": 0.1, "maximize": True},
    {"total_steps": 10, "eta_min": 0.3, "reset_interval": 6},  # the cosine factor on beta1
])
def test_kernel_matches_the_foreach_chain(hp, kernel_calls):
    expected, ref = run("foreach", **hp)
    got, opt = run("fused", **hp)
    assert kernel_calls == ["stable_spam"] * (STEPS * len(SHAPES))
    assert max_moved(expected, SHAPES) > 1e-2
    assert_same(got, expected, opt, ref)
    # the spikes were clipped: the running maximum stays below the largest peak
    stats = list(opt.state.values())[0]
    assert stats["m_max"] < max(g[0].abs().max() for g in map(gradients, range(STEPS)))


def test_auto_runs_the_kernel(kernel_calls):
    spec = llmvalley.get_spec("stable_spam")
    for hp in ({}, {"total_steps": 100}):
        assert execution_tier(spec, spec.resolve(hp)) == "fused"
    run("auto", steps=2)
    assert kernel_calls == ["stable_spam"] * (2 * len(SHAPES))


def test_two_threads_match_one(monkeypatch):
    monkeypatch.setattr(kernels, "ELEMENTS_PER_THREAD", 1024)
    one, _ = run("fused")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two, _ = run("fused")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first, second", [("fused", "foreach"), ("foreach", "fused")])
def test_a_run_resumes_across_tiers(first, second):
    hp = dict(reset_interval=5)
    expected, ref = run("foreach", **hp)
    params, opt = run(first, steps=7, **hp)
    saved = roundtrip(opt.state_dict())
    resumed = llmvalley.create_optimizer("stable_spam", params, implementation=second,
                                         nonfinite="ignore", lr=1e-2, **hp)
    resumed.load_state_dict(saved)
    got, resumed = run(second, steps=STEPS - 7, opt=resumed, params=params, start=7)
    assert_same(got, expected, resumed, ref)


def test_other_dtypes_and_shell_options_run_the_chain(kernel_calls):
    run("auto", steps=2, dtype=torch.float64)
    run("auto", steps=2, state_precision="bf16")
    run("auto", steps=2, cautious=True)
    assert "stable_spam" not in kernel_calls
    with pytest.raises(ValueError, match="implementation='fused'"):
        run("fused", steps=1, cautious=True)
