"""Defaults that follow a convention of the official code, where the choice shows.

- AdaMuon, NAMO and NAMO-D normalize the Newton-Schulz input by ``||X||_F + eps`` as their
  reference code (``ns_eps_form="add"``), not by torch.optim.Muon's ``max(||X||_F, eps)``
  (``"clamp"``). For NAMO / NAMO-D the two differ once the momentum norm comes near
  ``ns_eps = 1e-7``, so the tests use gradients of scale 1e-6. AdaMuon orthogonalizes
  ``sign(.)``, whose norm is ``sqrt(mn)`` at any gradient scale: there the forms differ only
  by about ``1e-7 / sqrt(mn)`` relative, and the test says so.
- SCALE runs 1-D parameters at 20x the matrix rate by default, as the reference's LLaMA
  60M-350M scripts (adam_lr 2e-2 with lr 1e-3).

Runs are float64 on CPU, like the differential tests in ``test_matrix_optimizers.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llmvalley
from tests import references_matrix as refs

SHAPES = [(12, 8), (8, 20), (10, 10), (6, 3, 2, 2)]
STEPS = 10
SMALL = 1e-6
ADD_FORM = ["adamuon", "namo", "namo_d"]


def initial(shapes, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def gradients(shapes, scale, seed=1, steps=STEPS) -> list[list[torch.Tensor]]:
    """Gradients of typical entry size ``scale`` with a drifting mean."""
    gen = torch.Generator().manual_seed(seed)
    drift = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return [[scale * (0.5 * d + torch.randn(s, generator=gen, dtype=torch.float64))
             for d, s in zip(drift, shapes)] for _ in range(steps)]


def steps_taken(make, shapes, scale, names=None) -> list[torch.Tensor]:
    """The total change of each parameter over ``STEPS`` steps of ``make(params)``."""
    params = [p.requires_grad_(True) for p in initial(shapes)]
    start = [p.detach().clone() for p in params]
    opt = make(params if names is None else [{"params": params, "param_names": names}])
    for grads in gradients(shapes, scale):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() - s for p, s in zip(params, start)]


def reference_steps(cls, shapes, scale, names=None, **hp) -> list[torch.Tensor]:
    params = initial(shapes)
    start = [p.clone() for p in params]
    ref = cls(params, names=names, **hp)
    for grads in gradients(shapes, scale):
        ref.step([g.clone() for g in grads])
    return [p - s for p, s in zip(params, start)]


def rel_gap(ours, theirs) -> float:
    """The largest relative difference of two lists of steps, over the tensors."""
    return max(float((a - b).norm() / b.norm()) for a, b in zip(ours, theirs))


def run(name, scale=SMALL, **hp):
    return steps_taken(lambda ps: llmvalley.create_optimizer(name, ps, **hp), SHAPES, scale)


# ---- Newton-Schulz normalization: ||X||_F + eps -------------------------------------------
@pytest.mark.parametrize("name", ADD_FORM + ["auon_hybrid"])
def test_reference_add_form_is_the_default(name):
    assert llmvalley.get_spec(name).defaults["ns_eps_form"] == "add"


@pytest.mark.parametrize("name", ADD_FORM)
def test_default_equals_explicit_add_and_differs_from_clamp_at_small_gradients(name):
    default, add, clamp = run(name), run(name, ns_eps_form="add"), run(
        name, ns_eps_form="clamp")
    for a, b in zip(default, add):
        assert torch.equal(a, b)
    gap = rel_gap(clamp, add)
    if name == "adamuon":
        # NS sees sign(.), of norm sqrt(mn) at any gradient scale: a real but tiny difference,
        # the same at scale 1 as at 1e-6
        assert 0.0 < gap < 1e-6
        assert rel_gap(run(name, 1.0, ns_eps_form="clamp"), run(name, 1.0)) == pytest.approx(
            gap, rel=1e-3)
    else:
        # ||M~||_F is about 1e-5 here, 100 times ns_eps: a visible part of the step
        assert gap > 1e-2


@pytest.mark.parametrize("name", ADD_FORM)
def test_default_matches_the_official_form_reference_at_small_gradients(name):
    """The references (``ns5``: ``||X||_F + 1e-7``) agree with the default, not with
    ``"clamp"``, at gradient scale 1e-6 (for NAMO / NAMO-D; AdaMuon's gap is too small to
    tell the forms apart against a reference)."""
    if name == "adamuon":
        hp = dict(lr=6e-3, momentum=0.95, weight_decay=0.1, eps=1e-8)
        theirs = reference_steps(refs.AdaMuonRef, SHAPES, SMALL, **hp)
    else:
        hp = dict(lr=0.01, momentum=0.95, mu2=0.99, eps=1e-8, weight_decay=0.1)
        theirs = reference_steps(refs.NAMORef, SHAPES, SMALL, columnwise=name == "namo_d",
                                 **hp)
    assert rel_gap(run(name, **hp), theirs) < 1e-9
    if name != "adamuon":
        assert rel_gap(run(name, ns_eps_form="clamp", **hp), theirs) > 1e-2


@pytest.mark.parametrize("name", ADD_FORM)
def test_ns_eps_form_is_validated(name):
    with pytest.raises(ValueError, match="ns_eps_form"):
        llmvalley.create_optimizer(name, [nn.Parameter(torch.zeros(4, 4))],
                                   ns_eps_form="plus")


# ---- SCALE: 1-D parameters at 20x the matrix rate -------------------------------------------
SCALE_SHAPES = [(13, 8), (8, 8), (8,), (13, 8)]
SCALE_NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.norm.weight", "lm_head.weight"]


def test_scale_runs_1d_parameters_at_twenty_times_the_rate_by_default():
    assert llmvalley.get_spec("scale").defaults["adam_lr_ratio"] == 20.0
    hp = dict(lr=1e-3, weight_decay=0.1)

    def ours(**extra):
        return steps_taken(lambda ps: llmvalley.create_optimizer("scale", ps, **hp, **extra),
                           SCALE_SHAPES, 1.0, names=SCALE_NAMES)

    default = ours()
    theirs = reference_steps(refs.SCALERef, SCALE_SHAPES, 1.0, names=SCALE_NAMES,
                             adam_lr_ratio=20.0, **hp)
    assert rel_gap(default, theirs) < 1e-12
    explicit = ours(adam_lr_ratio=20.0)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))
    # only the 1-D parameter depends on the ratio; its Adam step is 20 times larger (about:
    # the decay and the parameter value move with it)
    one = ours(adam_lr_ratio=1.0)
    for i, (a, b) in enumerate(zip(default, one)):
        if len(SCALE_SHAPES[i]) >= 2:
            assert torch.equal(a, b)
        else:
            assert float(a.norm() / b.norm()) == pytest.approx(20.0, rel=0.05)
