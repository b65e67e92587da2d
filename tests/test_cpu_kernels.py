"""The hand-written CPU kernels of the fused tier (``llmvalley.optim.kernels``): Adafactor, CAME,
AdamP, SGDP, FAdam, MARS, SPAM, Adan and Grams. Each must give the foreach chain's parameters
and state to float32 rounding, on every path through its C++ (factored matrices, batches of
matrices, vectors, a 0-d tensor, rows that are not a multiple of the vector width, Adafactor's
capped preconditioner, AdamP's and SGDP's three projection choices, SGDP with and without
momentum, FAdam's powers, clipping and zero gradients, MARS's two branches with and without the
unit-norm rescaling, SPAM's resets, warm-up and spike clipping, Adan's two decay forms, several
OpenMP threads), and the tier must step aside where it cannot run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

import llmvalley
from llmvalley.optim import kernels
from tests.helpers import make_optimizer, roundtrip

NAMES = ["adafactor", "came", "adamp", "sgdp", "fadam", "mars", "spam", "adan", "grams"]
#: the kernel each recipe runs
KERNEL = {"adafactor": "adafactor", "came": "came", "adamp": "projected", "sgdp": "projected",
          "fadam": "fadam", "mars": "adam", "spam": "adam_hf", "adan": "adan",
          "grams": "adam_hf"}
#: a 2-D matrix whose rows are not a multiple of 16 floats, a batch of matrices, a matrix
#: of one row, vectors, a 0-d tensor
SHAPES = [(40, 24), (3, 20, 17), (1, 7), (33,), (5,), ()]


def make_params(shapes=SHAPES, dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def run(name: str, implementation: str, steps: int = 5, grad_scale: float = 1.0,
        shapes=SHAPES, dtype=torch.float32, grad=None, **hp):
    """``steps`` steps on random gradients (the same for every tier), or ``grad(p)``; the
    parameters, their state tensors and the optimizer."""
    params = make_params(shapes, dtype)
    opt = llmvalley.create_optimizer(name, params, implementation=implementation,
                                     nonfinite="ignore", **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * grad_scale).to(dtype) \
                if grad is None else grad(p.detach())
        opt.step()
    return params, opt


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for st in opt.state.values() for _, v in sorted(st.items())
            if isinstance(v, torch.Tensor) and v.is_floating_point()]


def assert_close(got, expected, rtol=2e-6, atol=1e-7, msg=None) -> None:
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=msg)


def assert_kernel_matches(name: str, kernel_calls: list[str], steps: int = 5,
                          grads: Callable[[], Any] = lambda: None, **hp) -> None:
    """``steps`` steps of ``name`` on the foreach chain and on the fused tier from the same
    start (``grads()`` makes each run's gradient function; None: random gradients): the kernel
    ran on every tensor at every step, the parameters moved, and the parameters and state
    agree to float32 rounding."""
    expected, ref = run(name, "foreach", steps=steps, grad=grads(), **hp)
    got, opt = run(name, "fused", steps=steps, grad=grads(), **hp)
    assert kernel_calls.count(KERNEL[name]) == steps * len(SHAPES)
    moved = max((e - p).abs().max().item() for e, p in zip(expected, make_params()))
    assert moved > 1e-3
    assert_close(got, expected)
    assert_close(state_tensors(opt), state_tensors(ref))


@pytest.mark.parametrize("hp", [{}, {"weight_decay": 0.1, "maximize": True}])
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_the_foreach_chain(name, hp, kernel_calls):
    assert_kernel_matches(name, kernel_calls, **hp)


def test_auto_runs_the_kernel(kernel_calls):
    for name in NAMES:
        kernel_calls.clear()
        expected, _ = run(name, "foreach", steps=2)
        got, _ = run(name, "auto", steps=2)
        assert_close(got, expected)
        assert kernel_calls == [KERNEL[name]] * (2 * len(SHAPES))


@pytest.mark.parametrize("grad_scale", [1e-9, 1e3])
def test_adafactor_where_its_preconditioner_cap_binds_or_not(grad_scale, kernel_calls):
    """Gradients of ~1e-9 make the 1/eps1 cap bind (the kernel then sums u^2 in a pass of
    its own); large ones keep it slack (the sum comes from the column sums)."""
    expected, _ = run("adafactor", "foreach", grad_scale=grad_scale)
    got, _ = run("adafactor", "fused", grad_scale=grad_scale)
    assert kernel_calls
    assert_close(got, expected)


def alternating_rows(p: torch.Tensor) -> torch.Tensor:
    """A gradient along each row of ``p`` with alternating signs, plus a little noise: every
    row's cosine with the weight is about 1, the whole tensor's about 0."""
    if p.dim() < 2:
        return torch.ones_like(p)
    rows = p.reshape(p.shape[0], -1)
    sign = 1.0 - 2.0 * (torch.arange(rows.shape[0]) % 2).to(p.dtype)
    unit = rows / rows.norm(dim=1, keepdim=True)
    return (unit * sign[:, None] + 1e-3 * torch.cos(rows)).reshape(p.shape)


@pytest.mark.parametrize("name, hp", [
    ("adamp", {}),
    ("adamp", {"nesterov": True}),
    ("sgdp", {"momentum": 0.9, "dampening": 0.1}),
    ("sgdp", {"momentum": 0.9, "nesterov": True}),
])
@pytest.mark.parametrize("delta, grad, projected", [
    (10.0, None, "every row"),     # every row passes the test
    (0.1, alternating_rows, "the whole tensor"),  # no row passes, the whole tensor does
    (0.0, None, "nothing"),        # nothing passes
])
def test_projection_kernel_makes_each_choice(name, hp, delta, grad, projected, kernel_calls):
    shapes = [(8, 24), (4, 6, 10), (16,)]
    expected, ref = run(name, "foreach", shapes=shapes, grad=grad, delta=delta,
                        weight_decay=0.1, **hp)
    got, opt = run(name, "fused", shapes=shapes, grad=grad, delta=delta, weight_decay=0.1,
                   **hp)
    assert kernel_calls
    assert_close(got, expected, msg=projected)
    assert_close(state_tensors(opt), state_tensors(ref), msg=projected)


@pytest.mark.parametrize("name", NAMES)
def test_kernel_on_two_threads(name, kernel_calls):
    """Tensors big enough to split over two OpenMP threads: the foreach chain's result, and
    the same bits on every run."""
    shapes = [(512, 272), (2, 160, 520), (300,)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected, _ = run(name, "foreach", steps=3, shapes=shapes)
        first, _ = run(name, "fused", steps=3, shapes=shapes)
        second, _ = run(name, "fused", steps=3, shapes=shapes)
    finally:
        torch.set_num_threads(before)
    assert kernel_calls
    assert_close(first, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_a_run_resumes_across_tiers(name):
    """State written by the kernel loads into the foreach chain and the other way round."""
    expected, _ = run(name, "foreach", steps=6)
    params, opt = run(name, "fused", steps=3)
    saved = roundtrip(opt.state_dict())
    resumed = llmvalley.create_optimizer(name, params, implementation="foreach",
                                         nonfinite="ignore")
    resumed.load_state_dict(saved)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(6)]
    for step in range(3, 6):
        for p, g in zip(params, grads[step]):
            p.grad = g
        resumed.step()
    assert_close(params, expected)


@pytest.mark.parametrize("name", NAMES)
def test_other_dtypes_and_a_missing_compiler_run_the_chain(name, monkeypatch, caplog,
                                                           tmp_path):
    """bfloat16 parameters, and a machine where the kernel cannot be built, run the chain."""
    expected, _ = run(name, "foreach", dtype=torch.bfloat16)
    got, _ = run(name, "fused", dtype=torch.bfloat16)
    assert_close(got, expected, rtol=0, atol=0)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    from torch._inductor import codecache

    monkeypatch.setattr(codecache.CppPythonBindingsCodeCache, "load_pybinding", broken)
    monkeypatch.setenv("LLMVALLEY_CACHE", str(tmp_path))  # no record of a built kernel
    kernels.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="llmvalley.optim.kernels"):
            expected, _ = run(name, "foreach")
            got, _ = run(name, "fused")
    finally:
        kernels.load.cache_clear()
    assert any("could not be built" in r.getMessage() for r in caplog.records)
    assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("hp", [
    {"weight_decay": 0.0},  # the direction is the momentum alone
    {"p": 0.3, "clip": 0.05},  # a power other than the square root; the clipping binds
    {"clip": 1e3, "eps": 1e-2},  # no clipping; eps_t large enough to matter
])
def test_fadam_kernel_paths(hp, kernel_calls):
    """FAdam's kernel on its other paths, with one tensor's gradient all zero at times
    (eps_t is then eps, and the natural gradient zero)."""
    def grads():
        gen, zeros = torch.Generator().manual_seed(5), []

        def grad(p):
            g = torch.randn(p.shape, generator=gen)
            if p.numel() == 33:  # the vector's gradient is zero every other step
                zeros.append(len(zeros) % 2 == 0)
                if zeros[-1]:
                    g.zero_()
            return g
        return grad

    assert_kernel_matches("fadam", kernel_calls, grads=grads, lr=1e-2, **hp)


@pytest.mark.parametrize("grad_scale, hp", [
    (1e-3, {}),  # corrected gradients of norm below 1: not rescaled
    (1.0, {"optimize_1d": True, "weight_decay": 0.1}),  # every tensor through MARS-AdamW
    (1.0, {"weight_decay_1d": 0.0, "lr_1d": 1e-2, "gamma": 0.5}),
])
def test_mars_kernel_paths(grad_scale, hp, kernel_calls):
    assert_kernel_matches("mars", kernel_calls, grad_scale=grad_scale, **hp)


@pytest.mark.parametrize("hp", [
    # resets every 3 steps, a warm-up multiplier after each, spikes clipped from the next step
    {"reset_interval": 3, "warmup_steps": 2, "clip_delay": 1, "threshold": 1.5,
     "weight_decay": 0.1},
    {"threshold": 0, "reset_interval": 4, "warmup_steps": 3, "clip_delay": 0},  # no clipping
])
def test_spam_kernel_paths(hp, kernel_calls):
    def grads():
        gen, spikes = torch.Generator().manual_seed(7), []

        def grad(p):  # spikes: every third step the gradients jump 30-fold
            spikes.append(1)
            g = torch.randn(p.shape, generator=gen)
            return g * 30.0 if len(spikes) % (3 * len(SHAPES)) < len(SHAPES) else g
        return grad

    assert_kernel_matches("spam", kernel_calls, steps=9, grads=grads, lr=1e-2, **hp)


@pytest.mark.parametrize("hp", [
    {"weight_decay": 0.1},  # the proximal decay
    {"weight_decay": 0.1, "no_prox": True, "lr": 1e-2},  # the decoupled one
])
def test_adan_kernel_decays(hp, kernel_calls):
    assert_kernel_matches("adan", kernel_calls, **hp)


class TaggedParameter(torch.nn.Parameter):
    """A parameter subclass (as a DTensor or another wrapper is): the kernels read raw
    pointers, so such tensors take the chain."""


def test_tensor_subclasses_run_the_chain(kernel_calls):
    for name in NAMES:
        expected, _ = run(name, "foreach")
        params = [TaggedParameter(p.detach()) for p in make_params()]
        opt = llmvalley.create_optimizer(name, params, implementation="fused",
                                         nonfinite="ignore")
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        assert_close(params, expected, rtol=0, atol=0)
    assert not kernel_calls


def test_model_training_through_the_router_matches(kernel_calls):
    """A routed model (embedding, matrices, norms, biases) trains the same on both tiers."""
    from tests.helpers import make_model, train

    out = []
    for impl in ("foreach", "fused"):
        model = make_model()
        opt = make_optimizer("came", model, implementation=impl)
        train(model, opt, 0, 4)
        out.append([p.detach().clone() for p in model.parameters()])
    assert kernel_calls
    assert_close(*out)


LOAD_SR = """
import sys, torch
from llmvalley.optim import kernels, quantize
assert kernels.load("sr") is not None
x = torch.randn(100_003, generator=torch.Generator().manual_seed(0))
bits = quantize.bf16_round_with_seed(x, 12345).view(torch.int16).long()
print(int((bits * torch.arange(bits.numel())).sum()), "torch._inductor.codecache" in sys.modules)
"""


def test_a_later_process_imports_the_recorded_kernel(tmp_path):
    """The first process builds (or loads) the kernel through inductor and records where it
    lies; the next imports it from there, without importing inductor, and computes the same
    bits. A record whose file is gone builds through inductor again."""
    import subprocess
    import sys

    env = {**os.environ, "LLMVALLEY_CACHE": str(tmp_path)}

    def run_sr() -> list[str]:
        out = subprocess.run([sys.executable, "-c", LOAD_SR], env=env, capture_output=True,
                             text=True, timeout=300, check=True)
        return out.stdout.split()

    first = run_sr()
    records = list((tmp_path / "kernels").iterdir())
    assert first[1] == "True" and len(records) == 1
    second = run_sr()
    assert second == [first[0], "False"]
    records[0].write_text("gone.kernel\n" + str(tmp_path / "gone.so") + "\n")
    assert run_sr() == first
