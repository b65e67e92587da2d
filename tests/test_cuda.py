"""The execution tiers on a CUDA device: skipped without one (CI has none);
``benchmarks/gpu_check.sh`` runs them when a session is lent a GPU.

- every tier gives the foreach tier's results on the device;
- a steady-state step makes no synchronizing CUDA call (``torch.cuda.set_sync_debug_mode``
  set to ``"error"``) on the fused and compiled tiers and the foreach chain, with
  ``nonfinite="ignore"``. The default check's one sync per step is documented; per-step
  numbers are filled on the device, not copied from host memory (the CPU side of that:
  ``test_step_numbers_are_not_copied_from_host_memory`` in ``test_implementation.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

import llmvalley
from llmvalley.optim.compiled import compile_stats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(64, 32), (32,), (48, 64)]


def make_params(device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]


def make_grads(device: str, steps: int) -> list[list[torch.Tensor]]:
    """Each step's gradients, made on the device before any step is timed or checked."""
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen).to(device) for s in SHAPES] for _ in range(steps)]


@contextlib.contextmanager
def syncs_raise() -> Iterator[None]:
    """Any synchronizing CUDA call (a blocking copy, ``.item()``, a stream sync) raises."""
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


@pytest.mark.parametrize("name, tiers", [
    ("adamw", ["fused", "compiled"]), ("lion", ["compiled"]), ("nadam", ["compiled"]),
])
def test_tiers_match_foreach_on_cuda(name, tiers):
    grads = make_grads("cuda", 4)
    out = {}
    for tier in ["foreach", *tiers]:
        params = make_params("cuda")
        opt = llmvalley.create_optimizer(name, params, implementation=tier, lr=1e-2)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        if tier == "compiled":
            assert compile_stats(opt).graphs > 0
        out[tier] = [p.detach().cpu() for p in params]
    start = [p.detach().cpu() for p in make_params("cuda")]
    assert any(not torch.equal(a, b) for a, b in zip(out["foreach"], start))
    for tier in tiers:
        for got, want in zip(out[tier], out["foreach"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} {tier}")


@pytest.mark.parametrize("name, tier", [
    ("adamw", "fused"), ("adamw", "compiled"), ("adamw", "foreach"),
    ("lion", "compiled"), ("lion", "foreach"), ("nadam", "compiled"),
])
def test_steady_state_steps_do_not_sync(name, tier):
    params = make_params("cuda")
    opt = llmvalley.create_optimizer(name, params, implementation=tier, nonfinite="ignore")
    grads = make_grads("cuda", 5)
    for step, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g
        # the first steps create state, record the step powers eagerly and compile
        with syncs_raise() if step >= 3 else contextlib.nullcontext():
            opt.step()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
