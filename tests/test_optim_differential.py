"""Differential tests: every optimizer against its reference, 100 steps in float64.

Same initial parameters, same hyperparameters, same gradient sequence. The reference is
torch.optim where torch has the method, the official package where it installs from PyPI,
and otherwise an independent implementation from the paper's equations (tests/references.py).

Tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-6 per tensor (float64 leaves ~1e-14;
the margin covers a different but equivalent order of floating-point operations). Sign-based
methods (lion, signum, grams, cautious masks) are discontinuous at 0, so their gradients are
drawn away from the decision boundary by construction (see ``gradient_sequence``).
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import llmvalley
from tests import references as refs

SHAPES = [(8, 6), (6,), (), (3, 4, 5), (1, 7)]
STEPS = 100
RTOL = 1e-6


def initial_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def gradient_sequence(seed: int = 1, steps: int = STEPS) -> list[list[torch.Tensor]]:
    """Random gradients with a slowly drifting mean, like real training gradients."""
    gen = torch.Generator().manual_seed(seed)
    drift = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    seq = []
    for _ in range(steps):
        seq.append([0.5 * d + torch.randn(s, generator=gen, dtype=torch.float64)
                    for d, s in zip(drift, SHAPES)])
    return seq


def run_torch_style(make_opt, grads_seq) -> list[torch.Tensor]:
    """Drive an Optimizer that reads ``p.grad``."""
    params = [p.clone().requires_grad_(True) for p in initial_params()]
    opt = make_opt(params)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def run_reference(ref_cls, grads_seq, **hp) -> list[torch.Tensor]:
    params = initial_params()
    ref = ref_cls(params, **hp)
    for grads in grads_seq:
        ref.step([g.clone() for g in grads])
    return params


def assert_close(ours, theirs, rtol=RTOL):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = (a - b).norm() / b.norm().clamp(min=1e-12)
        assert err <= rtol, f"tensor {i} (shape {tuple(b.shape)}): relative error {err:.3e}"


def ours(name, **hp):
    return lambda params: llmvalley.create_optimizer(name, params, **hp)


GRADS = gradient_sequence()

# ---- against torch.optim ----------------------------------------------------------------
TORCH_CASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("sgd", torch.optim.SGD, dict(lr=0.01, momentum=0.8, dampening=0.3, maximize=True)),
    ("adam", torch.optim.Adam, dict(lr=1e-2)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, maximize=True)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("adamw", torch.optim.AdamW, dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.5)),
    ("nadam", torch.optim.NAdam, dict(lr=1e-2)),
    ("nadam", torch.optim.NAdam, dict(lr=1e-2, weight_decay=0.1, momentum_decay=1e-2)),
    ("nadam", torch.optim.NAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("adafactor", torch.optim.Adafactor, dict()),
    ("adafactor", torch.optim.Adafactor, dict(lr=3e-2, weight_decay=0.1, eps=(1e-30, 1e-3))),
    ("adafactor", torch.optim.Adafactor, dict(beta2_decay=-0.5, d=2.0, maximize=True)),
]


@pytest.fixture(autouse=True)
def float64_default():
    """Scalars torch keeps as tensors (NAdam's mu_product) follow the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("name,ref,hp", TORCH_CASES, ids=lambda x: str(x)[:40])
def test_matches_torch(name, ref, hp):
    expected = run_torch_style(lambda ps: ref(ps, **hp), GRADS)
    assert_close(run_torch_style(ours(name, **hp), GRADS), expected)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name,ref", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_fused_and_foreach_paths_match_torch(name, ref, fused):
    hp = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    expected = run_torch_style(lambda ps: ref(ps, **hp), GRADS)
    assert_close(run_torch_style(ours(name, fused=fused, **hp), GRADS), expected)


# ---- against official packages from PyPI ------------------------------------------------
def adabelief_ref(**hp):
    from adabelief_pytorch import AdaBelief

    def make(params):
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints banners
            return AdaBelief(params, print_change_log=False, **hp)

    return make


@pytest.mark.parametrize("hp", [
    dict(lr=1e-2),
    dict(lr=1e-2, rectify=False, weight_decay=0.1),
    dict(lr=1e-2, rectify=False, amsgrad=True, eps=1e-12),
    dict(lr=1e-2, weight_decouple=False, weight_decay=0.01, degenerated_to_sgd=False),
    dict(lr=1e-2, fixed_decay=True, weight_decay=1e-3, betas=(0.9, 0.99)),
], ids=str)
def test_adabelief_matches_official(hp):
    expected = run_torch_style(adabelief_ref(**hp), GRADS)
    assert_close(run_torch_style(ours("adabelief", **hp), GRADS), expected)


@pytest.mark.parametrize("hp", [dict(lr=1e-3), dict(lr=3e-4, betas=(0.95, 0.98),
                                                    weight_decay=0.5)], ids=str)
def test_lion_matches_lion_pytorch(hp):
    from lion_pytorch import Lion

    expected = run_torch_style(lambda ps: Lion(ps, **hp), GRADS)
    assert_close(run_torch_style(ours("lion", **hp), GRADS), expected)


@pytest.mark.parametrize("hp", [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1,
                                                    betas=(0.8, 0.99))], ids=str)
def test_grams_matches_official(hp):
    from grams import Grams

    expected = run_torch_style(lambda ps: Grams(ps, **hp), GRADS)
    assert_close(run_torch_style(ours("grams", **hp), GRADS), expected)


@pytest.mark.parametrize("hp", [dict(lr=1e-3), dict(lr=1e-2, weight_decay=0.1,
                                                    betas=(0.8, 0.99, 0.999))], ids=str)
def test_came_matches_official(hp):
    from came_pytorch import CAME

    expected = run_torch_style(lambda ps: CAME(ps, **hp), GRADS)
    assert_close(run_torch_style(ours("came", **hp), GRADS), expected)


# ---- against independent references from the papers -------------------------------------
PAPER_CASES = [
    ("adan", refs.AdanRef, dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0)),
    ("adan", refs.AdanRef, dict(lr=1e-2, betas=(0.9, 0.9, 0.99), eps=1e-8, weight_decay=0.1)),
    ("adan", refs.AdanRef, dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.1,
                                no_prox=True)),
    ("laprop", refs.LaPropRef, dict(lr=4e-3, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0)),
    ("laprop", refs.LaPropRef, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=1e-3)),
    ("ademamix", refs.AdEMAMixRef, dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=8.0,
                                        eps=1e-8, weight_decay=0.0)),
    ("ademamix", refs.AdEMAMixRef, dict(lr=1e-3, betas=(0.9, 0.999, 0.999), alpha=5.0,
                                        eps=1e-8, weight_decay=0.1, alpha_warmup=60,
                                        beta3_warmup=80)),
    ("mars", refs.MarsRef, dict(lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0,
                                gamma=0.025, lr_1d=3e-3, betas_1d=(0.9, 0.95),
                                weight_decay_1d=0.1)),
    ("mars", refs.MarsRef, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                                gamma=0.1, lr_1d=5e-3, betas_1d=(0.8, 0.9),
                                weight_decay_1d=0.0)),
    ("signum", refs.SignumRef, dict(lr=1e-2, momentum=0.9, weight_decay=0.0)),
    ("signum", refs.SignumRef, dict(lr=1e-3, momentum=0.5, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,ref,hp", PAPER_CASES, ids=lambda x: str(x)[:40])
def test_matches_paper_reference(name, ref, hp):
    expected = run_reference(ref, GRADS, **hp)
    assert_close(run_torch_style(ours(name, **hp), GRADS), expected)


@pytest.mark.parametrize("name,ref,hp", [
    ("adamw", refs.CautiousAdamWRef, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=0.1)),
    ("lion", refs.CautiousLionRef, dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)),
], ids=lambda x: str(x)[:30])
def test_cautious_matches_paper(name, ref, hp):
    expected = run_reference(ref, GRADS, **hp)
    assert_close(run_torch_style(ours(name, cautious=True, **hp), GRADS), expected)


def test_cautious_changes_the_result():
    """The masked and unmasked runs differ: the option is not a no-op."""
    plain = run_torch_style(ours("adamw", lr=1e-2), GRADS)
    masked = run_torch_style(ours("adamw", lr=1e-2, cautious=True), GRADS)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(plain, masked))
