"""The schedule-free CPU kernel of the fused tier (``kernels/schedule_free.cpp``): schedule-free
SGD and AdamW in one pass per tensor. It must leave the foreach chain's parameters (y) and
state (z, AdamW's second moment, the float state the prelude advances) to float32 rounding,
through warmup, weight decay, ``maximize``, switches to ``eval()`` and back, a z created
mid-run, several threads, a resume across tiers; and step aside where it cannot run.
"""

from __future__ import annotations

import pytest
import torch

import llmvalley
from llmvalley.optim import kernels
from llmvalley.optim.spec import execution_tier
from tests.helpers import max_moved, roundtrip

NAMES = ["schedulefree_sgd", "schedulefree_adamw"]
#: a matrix, a vector above one span of work (1024 elements) with a tail, small tensors
SHAPES = [(300, 257), (4133,), (7,), ()]


def run(name: str, implementation: str, steps: int = 6, switch_at: int | None = 2,
        dtype=torch.float32, opt=None, params=None, start: int = 0, **hp):
    """``steps`` steps from ``start`` (gradients seeded by step), with ``eval()`` and
    ``train()`` after step ``switch_at``; ends in eval mode (x in the parameters)."""
    if params is None:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    if opt is None:
        opt = llmvalley.create_optimizer(name, params, implementation=implementation,
                                         nonfinite="ignore", **{"warmup_steps": 3, **hp})
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
        if step == switch_at:
            opt.eval()
            opt.train()
    return params, opt


def assert_same(got, expected, opt, ref, exact: bool) -> None:
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2e-6, atol=1e-7)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **tol)
    for a, b in zip(opt.state.values(), ref.state.values(), strict=True):
        assert a.keys() == b.keys()
        for k, v in b.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(a[k], v, **tol)
            else:
                assert a[k] == pytest.approx(v, rel=1e-12), k


@pytest.mark.parametrize("hp", [{}, {"weight_decay": 0.1, "maximize": True, "r": 0.5}])
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_the_foreach_chain(name, hp, kernel_calls):
    expected, ref = run(name, "foreach", **hp)
    got, opt = run(name, "fused", **hp)
    assert kernel_calls == ["schedule_free"] * (6 * len(SHAPES))
    assert max_moved(expected, SHAPES) > 1e-2
    opt.eval(), ref.eval()
    # SGD makes the chain's operations with its roundings: the same bits
    assert_same(got, expected, opt, ref, exact=name == "schedulefree_sgd")


def test_auto_runs_the_kernel(kernel_calls):
    for name in NAMES:
        spec = llmvalley.get_spec(name)
        assert execution_tier(spec, spec.resolve({})) == "fused"
        kernel_calls.clear()
        run(name, "auto", steps=2)
        assert kernel_calls == ["schedule_free"] * (2 * len(SHAPES))


@pytest.mark.parametrize("name", NAMES)
def test_two_threads_give_the_same_bits(name, monkeypatch):
    monkeypatch.setattr(kernels, "ELEMENTS_PER_THREAD", 1024)
    one, _ = run(name, "fused")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two, _ = run(name, "fused")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_a_run_resumes_across_tiers(name):
    expected, ref = run(name, "foreach", steps=6, switch_at=None)
    params, opt = run(name, "fused", steps=3, switch_at=None)
    saved = roundtrip(opt.state_dict())
    resumed = llmvalley.create_optimizer(name, params, implementation="foreach",
                                         nonfinite="ignore", warmup_steps=3)
    resumed.load_state_dict(saved)
    got, resumed = run(name, "foreach", steps=3, switch_at=None, opt=resumed, params=params,
                       start=3)
    assert_same(got, expected, resumed, ref, exact=False)


@pytest.mark.parametrize("name", NAMES)
def test_other_dtypes_and_shell_options_run_the_chain(name, kernel_calls):
    run(name, "auto", steps=2, dtype=torch.float64)
    run(name, "auto", steps=2, state_precision="bf16")
    assert "schedule_free" not in kernel_calls  # (the bf16 rounding has a kernel of its own)
    with pytest.raises(ValueError, match="implementation='fused'"):
        run(name, "fused", steps=1, cautious=True)
