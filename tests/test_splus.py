"""SPlus: a float64 differential test against an independent reference, the evaluation weights,
resume across a basis refresh in train and eval mode, the memory formula and bad input.

The reference below is written from the official JAX code (kvfrans/splus ``optax/splus.py``:
``update_fn``, then ``add_decayed_weights``, ``scale_by_learning_rate`` and ``shape_scaling``,
and ``splus_get_eval_params``) as a plain per-tensor loop that shares no code with llmvalley.
JAX is not installed, so its ``jnp.linalg.eigh`` is ``torch.linalg.eigh`` here. Both sides
see the same gradients (random, with a drifting mean) so they form the same factors: at the
first refresh a non-square factor is rank deficient, and the basis of its null space (which
the sign does depend on) is whatever ``eigh`` returns for those very numbers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llmvalley
from tests.helpers import loss_fn, make_model, roundtrip

STEPS = 80


@pytest.fixture(autouse=True)
def one_thread():
    """Small eigendecompositions on one thread (a busy 2-core machine slows LAPACK's two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the reference ---------------------------------------------------------------------------
class ReferenceSPlus:
    """kvfrans/splus ``splus`` (optax) on a dict of float64 tensors keyed by parameter path."""

    def __init__(self, params: dict[str, torch.Tensor], decay_mask: dict[str, bool], *, lr,
                 b1, b2, ema_rate, eps, inverse_every, weight_decay, max_dim,
                 nonstandard_constant, nonstandard_strings) -> None:
        self.p = {k: v.clone() for k, v in params.items()}
        self.mask, self.lr, self.b1, self.b2 = decay_mask, lr, b1, b2
        self.rate, self.eps, self.every, self.wd = ema_rate, eps, inverse_every, weight_decay
        self.max_dim, self.const, self.strings = max_dim, nonstandard_constant, nonstandard_strings
        self.momentum = {k: torch.zeros_like(v) for k, v in params.items()}
        self.ema = {k: torch.zeros_like(v) for k, v in params.items()}
        self.sides, self.q_sides = {}, {}
        for k, v in params.items():
            if v.ndim == 2:
                self.sides[k] = [torch.zeros(d, d, dtype=v.dtype) if d < max_dim else None
                                 for d in v.shape]
                self.q_sides[k] = [torch.eye(d, dtype=v.dtype) if d < max_dim else None
                                   for d in v.shape]
        self.step = 0

    def _rot(self, k, x):
        if x.ndim == 2:
            q = self.q_sides[k]
            x = q[0].T @ x if q[0] is not None else x
            x = x @ q[1] if q[1] is not None else x
        return x

    def _unrot(self, k, x):
        if x.ndim == 2:
            q = self.q_sides[k]
            x = q[0] @ x if q[0] is not None else x
            x = x @ q[1].T if q[1] is not None else x
        return x

    def _scale(self, k, shape):
        if (len(shape) == 2 and not any(s in k.lower() for s in self.strings)
                and shape[0] < self.max_dim and shape[1] < self.max_dim):
            return 2 / (shape[0] + shape[1])
        return self.const

    def update(self, grads: dict[str, torch.Tensor]) -> None:
        self.step += 1
        updates = {}
        for k, g in grads.items():
            self.momentum[k] = self.b1 * self.momentum[k] + (1 - self.b1) * g
            updates[k] = self._unrot(k, torch.sign(self._rot(k, self.momentum[k])))
            if g.ndim == 2:
                s = self.sides[k]
                self.sides[k] = [
                    self.b2 * s[0] + (1 - self.b2) * g @ g.T if s[0] is not None else None,
                    self.b2 * s[1] + (1 - self.b2) * g.T @ g if s[1] is not None else None,
                ]
            self.ema[k] = self.rate * self.ema[k] + (1 - self.rate) * self.p[k]
        if self.step % self.every == 0 or self.step == 1:
            for k, sides in self.sides.items():
                self.q_sides[k] = [
                    None if s is None else
                    torch.linalg.eigh(s + self.eps * torch.eye(s.shape[0], dtype=s.dtype))[1]
                    for s in sides]
        for k, u in updates.items():
            if self.mask[k]:
                u = u + self.wd * self.p[k]
            u = -self.lr * u
            self.p[k] = self.p[k] + u * self._scale(k, u.shape)

    def eval_params(self) -> dict[str, torch.Tensor]:
        return {k: e / (1 - self.rate**self.step) for k, e in self.ema.items()}


# ---- a model covering every case -------------------------------------------------------------
class Mixed(nn.Module):
    """With ``max_dim=10``: a square and a non-square rotated matrix, an embedding (rotated,
    constant scale by name), a matrix with one side at ``max_dim`` (one factor, constant
    scale), one with both sides above it (no factor), a vector and a 3-D tensor (sign only)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def param(*shape):
            return nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))

        self.embed_tokens = param(9, 6)
        self.square = param(8, 8)
        self.wide = param(5, 7)
        self.one_side = param(6, 10)
        self.big = param(11, 12)
        self.bias = param(7)
        self.kernel = param(3, 2, 2)


def gradients(model: nn.Module, steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Random gradients with a drifting mean (like training gradients)."""
    gen = torch.Generator().manual_seed(seed)
    named = list(model.named_parameters())
    drift = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in named}
    return [{n: 0.5 * drift[n] + torch.randn(p.shape, generator=gen, dtype=p.dtype)
             for n, p in named} for _ in range(steps)]


HP = dict(lr=0.05, betas=(0.9, 0.95), ema_rate=0.9, eps=1e-30, inverse_every=25,
          weight_decay=0.1, max_dim=10, nonstandard_constant=0.003,
          nonstandard_strings=("embed", "layernorm"))


def reference_for(model: nn.Module, opt: torch.optim.Optimizer, hp: dict) -> ReferenceSPlus:
    """The reference on the model's initial weights, decaying what the router decays."""
    names = {id(p): n for n, p in model.named_parameters()}
    mask = {names[id(p)]: g["weight_decay"] != 0 for g in opt.param_groups for p in g["params"]}
    b1, b2 = hp["betas"]
    kw = {k: v for k, v in hp.items() if k != "betas"}
    return ReferenceSPlus({n: p.detach() for n, p in model.named_parameters()}, mask, b1=b1,
                          b2=b2, **kw)


@pytest.mark.parametrize("hp", [HP, {**HP, "max_dim": 10000, "ema_rate": 0.999,
                                     "inverse_every": 30}])
def test_splus_matches_the_reference(hp):
    model = Mixed()
    opt = llmvalley.create_optimizer("splus", model, **hp)
    ref = reference_for(model, opt, hp)
    assert not all(ref.mask.values()) and any(ref.mask.values())  # the router masked vectors
    params = dict(model.named_parameters())
    for grads in gradients(model, STEPS):
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
        ref.update(grads)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), ref.p[n], rtol=1e-10, atol=1e-12, msg=n)
        # every tensor moved, and by more than its rounding
        assert (p.detach() - Mixed().get_parameter(n)).abs().max() > 1e-3, n
    trained = {n: p.detach().clone() for n, p in params.items()}
    opt.eval()  # the evaluation weights are the bias-corrected EMA
    for n, e in ref.eval_params().items():
        torch.testing.assert_close(params[n].detach(), e, rtol=1e-10, atol=1e-12, msg=n)
        assert (params[n].detach() - trained[n]).abs().max() > 1e-3, n
    opt.train()  # and the training weights come back exactly
    for n, p in params.items():
        assert torch.equal(p.detach(), trained[n]), n


def test_refresh_schedule_and_rotation_are_exercised():
    """The bases change at step 1 and every inverse_every steps, and nowhere else; a rotated
    direction is not the sign of the momentum (so the rotation is used)."""
    model = Mixed()
    opt = llmvalley.create_optimizer("splus", model, **HP)
    grads = gradients(model, 52)
    snapshots = []
    for grad in grads:
        for n, p in model.named_parameters():
            p.grad = grad[n].clone()
        opt.step()
        snapshots.append(opt.state[model.square]["q_sides"].clone())
    changed = [t + 1 for t in range(1, len(snapshots))
               if not torch.equal(snapshots[t], snapshots[t - 1])]
    assert changed == [25, 50]
    assert not torch.equal(snapshots[0], torch.eye(8, dtype=torch.float64).flatten().repeat(2))
    assert "sides" not in opt.state[model.big] and "sides" not in opt.state[model.bias]
    assert opt.state[model.one_side]["sides"].numel() == 36  # only the side of 6


# ---- resume and modes ------------------------------------------------------------------------
def run(model, opt, start, steps):
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, step).backward()
        opt.step()


@pytest.mark.parametrize("save_in_eval", [True, False])
def test_resume_is_bit_exact_across_a_refresh_in_either_mode(save_in_eval):
    hp = dict(inverse_every=5, ema_rate=0.9)  # refreshes at 5, 10, 15; checkpoint at 8

    def checkpoint_point(opt):
        if save_in_eval:
            opt.eval()

    ref = make_model(0, torch.float64)
    ref_opt = llmvalley.create_optimizer("splus", ref, **hp)
    run(ref, ref_opt, 0, 8)
    checkpoint_point(ref_opt)
    ref_opt.train()
    run(ref, ref_opt, 8, 9)
    ref_opt.eval()

    model = make_model(0, torch.float64)
    opt = llmvalley.create_optimizer("splus", model, **hp)
    run(model, opt, 0, 8)
    checkpoint_point(opt)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make_model(123, torch.float64)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = llmvalley.create_optimizer("splus", resumed, **hp)
    resumed_opt.load_state_dict(ckpt["opt"])
    assert resumed_opt.training is not save_in_eval
    resumed_opt.train()
    run(resumed, resumed_opt, 8, 9)
    resumed_opt.eval()
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{n} differs after resume (eval weights)"
    ref_opt.train()
    resumed_opt.train()
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{n} differs after resume (training weights)"


def test_eval_before_any_step_and_in_eval_step_raises():
    model = make_model(0)
    start = [p.detach().clone() for p in model.parameters()]
    opt = llmvalley.create_optimizer("splus", model)
    opt.eval()
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    with pytest.raises(RuntimeError, match="eval mode"):
        run(model, opt, 0, 1)
    opt.train()
    run(model, opt, 0, 3)
    trained = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    opt.eval()  # idempotent
    assert not torch.equal(model.q_proj.weight, trained[1])
    opt.train()
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), trained))


# ---- memory and validation -------------------------------------------------------------------
def test_state_bytes_equals_the_formula():
    """momentum + weight EMA per element, and two d x d matrices (factor, basis) per matrix
    side below max_dim, in the compute dtype, in either mode."""
    model = Mixed()
    opt = llmvalley.create_optimizer("splus", model, **HP)
    expected = 0
    for p in model.parameters():
        expected += 2 * p.numel()
        if p.ndim == 2:
            expected += 2 * sum(d * d for d in p.shape if d < HP["max_dim"])
    assert llmvalley.state_bytes(opt) == 8 * expected  # before the first step
    assert sum(llmvalley.get_spec("splus").state_numel(p.shape, **HP)
               for p in model.parameters()) == expected
    for grads in gradients(model, 3):
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
    assert llmvalley.state_bytes(opt) == 8 * expected
    opt.eval()
    assert llmvalley.state_bytes(opt) == 8 * expected


@pytest.mark.parametrize("key, value", [
    ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("ema_rate", 1.0), ("ema_rate", -0.1),
    ("inverse_every", 0), ("inverse_every", 2.5), ("max_dim", 0), ("eps", -1.0),
    ("nonstandard_constant", -1e-3), ("nonstandard_strings", "embed"),
    ("nonstandard_strings", ("embed", 3)), ("weight_decay", -0.1), ("lr", float("nan")),
])
def test_bad_hyperparameters_raise_naming_them(key, value):
    with pytest.raises(ValueError, match=key):
        llmvalley.create_optimizer("splus", make_model(0), **{key: value})


def test_nonfinite_factor_is_reset_with_a_warning():
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = llmvalley.create_optimizer("splus", [w], nonfinite="ignore")
    w.grad = torch.full_like(w, float("inf"))
    with pytest.warns(RuntimeWarning, match="non-finite SPlus factor"):
        opt.step()
    st = opt.state[w]
    assert torch.equal(st["sides"], torch.zeros_like(st["sides"]))
    assert torch.equal(st["q_sides"], torch.cat([torch.eye(4).flatten(), torch.eye(3).flatten()
                                                 ]).double())


def test_state_created_before_the_first_step_starts_from_identity_bases():
    """``init_state()`` (zeros, step 0) must not leave zero bases for the first step."""
    a, b = make_model(0, torch.float64), make_model(0, torch.float64)
    oa, ob = llmvalley.create_optimizer("splus", a), llmvalley.create_optimizer("splus", b)
    ob.init_state()
    run(a, oa, 0, 3)
    run(b, ob, 0, 3)
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), n
