"""FRUGAL's blockwise projector (``frugal`` with ``proj_type="blockwise"``).

The differential tests run 100 float64 steps on a group of 8 tensors with a small
``update_proj_gap`` (8 to 14 re-selections) against :class:`BlockRef`, an independent
reference written here from the official code's ``BlockOptimizer`` + ``AdamW`` (mirror
hungquangbui02022003/FRUGAL, ``frugal/proj_optimizer_templates.py``): the group's first
tensor's step decides re-selections, every tensor's state is cleared and re-initialised,
``round(n * density)`` whole tensors are activated by ``block_order``, active tensors take a
torch-style AdamW step, the others a signSGD / SGD / no step, and weight decay shrinks all.

The one departure, ``block_order="random"``: the reference draws ``torch.randperm(n)`` from
the global torch RNG, which a checkpoint does not hold; ours draws from a per-group seed
stream kept in the optimizer state (seed ``block_seed``, advanced by APOLLO's ``next_seed``
after each draw). The reference below draws its permutations from that same stream, so the
comparison is exact for random order as well.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import llmvalley
from tests.helpers import roundtrip
from tests.test_matrix_optimizers import (
    assert_close,
    gradients,
    initial,
    llama,
    synthetic_steps,
    train,
)

SHAPES = [(12, 8), (8, 20), (10, 10), (6, 3, 2), (16, 4), (5, 9), (7, 7), (4, 12)]
STEPS = 100
BASE = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, density=0.25,
            update_proj_gap=7, proj_type="blockwise", reset_statistics=True,
            inactive_update_rule="sign_sgd", inactive_lr_scale=1.0, proj_params_lr_scale=1.0,
            block_order="descending", block_seed=0)


def stream_next(seed: int) -> int:
    """The seed after ``seed``: the last of 15 int64 draws of a CPU generator seeded with it."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**63 - 1, (15,), generator=gen).tolist()[-1]


class BlockRef:
    """BlockOptimizer + AdamW of the official FRUGAL code, on one parameter group."""

    def __init__(self, params: list[torch.Tensor], **hp) -> None:
        self.params, self.hp = params, hp
        self.state: list[dict] = [{} for _ in params]
        self.num_active = round(len(params) * hp["density"])
        self.group: dict = {}
        self.seed = hp["block_seed"]
        if hp["block_order"] == "mirror":
            assert self.num_active % 2 == 0

    def randperm(self, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        self.seed = stream_next(self.seed)
        return torch.randperm(n, generator=gen)

    def activate(self, i: int) -> None:
        st = self.state[i]
        st["step"], st["active"] = 0, True
        st["exp_avg"] = torch.zeros_like(self.params[i])
        st["exp_avg_sq"] = torch.zeros_like(self.params[i])

    def update_states(self) -> None:
        n, k, order, g = len(self.params), self.num_active, self.hp["block_order"], self.group
        for st in self.state:
            st.clear()
            st["step"], st["active"] = 0, False
        if order == "random":
            for idx in self.randperm(n)[:k].tolist():
                self.activate(idx)
        elif order == "ascending":
            g.setdefault("next", 0)
            for idx in range(g["next"], g["next"] + k):
                self.activate(idx % n)
            g["next"] += k
            if g["next"] >= n:
                g["next"] -= n
        elif order == "descending":
            g.setdefault("next", n - 1)
            for idx in range(g["next"], g["next"] - k, -1):
                self.activate(idx % n)
            g["next"] -= k
            if g["next"] < 0:
                g["next"] += n
        else:  # mirror
            g.setdefault("next", 0)
            half = n // 2
            for idx in range(g["next"], g["next"] + k // 2):
                self.activate(idx % half)
                self.activate(n - 1 - idx % half)
            g["next"] += k // 2
            if g["next"] >= half:
                g["next"] -= half

    def step(self, grads: list[torch.Tensor]) -> None:
        hp = self.hp
        first = self.state[0]
        if not ("step" in first and first["step"] % hp["update_proj_gap"]):
            self.update_states()
        b1, b2 = hp["betas"]
        lr = hp["lr"] * hp["proj_params_lr_scale"]
        for p, g, st in zip(self.params, grads, self.state):
            p.mul_(1 - hp["lr"] * hp["weight_decay"])
            st["step"] += 1
            if st["active"]:
                t = st["step"]
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t) + hp["eps"]
                p.add_(st["exp_avg"] / denom * (-lr / (1 - b1**t)))
            elif hp["inactive_update_rule"] == "sgd":
                p.add_(g, alpha=-lr * hp["inactive_lr_scale"])
            elif hp["inactive_update_rule"] == "sign_sgd":
                p.add_(g.sign(), alpha=-lr * hp["inactive_lr_scale"])

    def active(self) -> list[int]:
        return [i for i, st in enumerate(self.state) if st["active"]]


def active_bytes(shapes, idx, itemsize: int = 8) -> int:
    """Adam's two moments for the tensors ``idx``."""
    return sum(2 * itemsize * math.prod(shapes[i]) for i in idx)


CASES = [
    {},
    dict(block_order="random", density=0.375, update_proj_gap=10, weight_decay=0.1,
         inactive_lr_scale=0.5, proj_params_lr_scale=0.8, block_seed=3),
    dict(block_order="ascending", inactive_update_rule="sgd", update_proj_gap=9,
         betas=(0.8, 0.95), lr=3e-3),
    dict(block_order="mirror", density=0.5, inactive_update_rule="no", update_proj_gap=12),
    dict(density=0.0, weight_decay=0.05),  # the 7B script: every tensor state-free
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.get("block_order", "descending"))
def test_blockwise_matches_the_reference(case):
    """Same parameters and gradients; at every step the active sets agree and the state is
    the Adam state of the active tensors only."""
    hp = {**BASE, **case}
    ours = [p.requires_grad_(True) for p in initial(SHAPES)]
    opt = llmvalley.create_optimizer("frugal", ours, **hp)
    theirs = initial(SHAPES)
    ref = BlockRef(theirs, **{k: v for k, v in hp.items() if k != "proj_type"})
    selections = set()
    for grads in gradients(SHAPES, steps=STEPS):
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([g.clone() for g in grads])
        mine = [i for i, p in enumerate(ours) if opt.state[p]["block_active"]]
        assert mine == ref.active()
        assert llmvalley.state_bytes(opt) == active_bytes(SHAPES, mine)
        selections.add(tuple(mine))
    assert_close([p.detach() for p in ours], theirs, 1e-10)
    if hp["density"] > 0:
        assert len(selections) > 1


def test_selection_orders_walk_the_group_as_the_reference():
    """8 tensors: 'descending' from the end in steps of k, wrapping; 'mirror' pairs from both
    ends inwards; a re-selection at steps 1, 1 + gap, ..."""
    expected = {
        ("descending", 0.25): [[6, 7], [4, 5], [2, 3], [0, 1], [6, 7]],
        ("ascending", 0.375): [[0, 1, 2], [3, 4, 5], [0, 6, 7], [1, 2, 3], [4, 5, 6]],
        ("mirror", 0.5): [[0, 1, 6, 7], [2, 3, 4, 5], [0, 1, 6, 7], [2, 3, 4, 5], [0, 1, 6, 7]],
    }
    for (order, density), walk in expected.items():
        params = [nn.Parameter(torch.zeros(4, 4, dtype=torch.float64)) for _ in range(8)]
        opt = llmvalley.create_optimizer("frugal", params, proj_type="blockwise",
                                         block_order=order, density=density, update_proj_gap=2)
        seen = []
        for step in range(10):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            if step % 2 == 0:
                seen.append([i for i, p in enumerate(params) if opt.state[p]["block_active"]])
            else:  # no re-selection in between
                assert [i for i, p in enumerate(params) if opt.state[p]["block_active"]] \
                    == seen[-1]
        assert seen == walk, order


def test_state_bytes_before_the_first_step_is_the_first_selection():
    """Declared state before the first step = the Adam state of the tensors the first step
    activates (the last ones for 'descending'); inactive tensors never hold moments."""
    for order in ("descending", "random"):
        params = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
        opt = llmvalley.create_optimizer("frugal", params, proj_type="blockwise",
                                         block_order=order, update_proj_gap=3)
        before = llmvalley.state_bytes(opt)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        active = [i for i, p in enumerate(params) if opt.state[p]["block_active"]]
        if order == "descending":
            assert active == [6, 7]
        assert before == llmvalley.state_bytes(opt) == active_bytes(SHAPES, active)
        for i, p in enumerate(params):
            assert ("exp_avg" in opt.state[p]) == (i in active)
    # a tensor's own figure is what it holds while active
    assert llmvalley.get_spec("frugal").state_numel((64, 32), proj_type="blockwise") \
        == 2 * 64 * 32


def test_state_bytes_on_a_routed_model_counts_active_tensors_only():
    """TinyLLaMA: 14 hidden matrices go to frugal (round(14 * 0.25) = 4 active at a time),
    the rest to the AdamW fallback (full state)."""
    model = llama()
    opt = llmvalley.create_optimizer("frugal", model, proj_type="blockwise", update_proj_gap=5)
    frugal = next(g for g in opt.param_groups if g["optimizer"] == "frugal")
    fallback = sum(2 * 4 * p.numel() for g in opt.param_groups if g["optimizer"] == "adamw"
                   for p in g["params"])
    before = llmvalley.state_bytes(opt)
    for start in range(0, 20, 5):
        synthetic_steps(model, opt, start, 5)
        active = [p for p in frugal["params"] if opt.state[p]["block_active"]]
        assert len(active) == 4
        assert llmvalley.state_bytes(opt) == fallback + sum(2 * 4 * p.numel() for p in active)
    assert before == fallback + sum(2 * 4 * p.numel() for p in frugal["params"][-4:])


@pytest.mark.parametrize("order,split", [("descending", 30), ("random", 40), ("mirror", 41)])
def test_resume_across_a_reselection_is_bit_exact(order, split):
    """gap 20: the run is cut mid-period (30), right before a re-selection (40: step 41
    re-selects) or right after one (41), and resumed into a fresh model and optimizer."""
    hp = dict(proj_type="blockwise", block_order=order, update_proj_gap=20, lr=0.01,
              density=0.3 if order == "mirror" else 0.25)  # 4 of 14
    ref = llama(0)
    synthetic_steps(ref, llmvalley.create_optimizer("frugal", ref, **hp), 0, 70)
    model = llama(0)
    opt = llmvalley.create_optimizer("frugal", model, **hp)
    synthetic_steps(model, opt, 0, split)
    saved_bytes = llmvalley.state_bytes(opt)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = llama(123)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = llmvalley.create_optimizer("frugal", resumed, **hp)
    resumed_opt.load_state_dict(ckpt["opt"])
    assert llmvalley.state_bytes(resumed_opt) == saved_bytes
    synthetic_steps(resumed, resumed_opt, split, 70 - split)
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{order}: {n} differs after resume"


@pytest.mark.parametrize("other", ["frugal", "adamw"])
def test_dcp_checkpoint_resumes_a_later_selection(tmp_path, other):
    """A DCP checkpoint taken after the active set moved loads into a fresh optimizer (whose
    init_state holds the first selection's moments) and continues bit for bit; a method whose
    state keeps its keys (adamw) loads as before."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from llmvalley.bench.distributed import load_dcp

    hp = dict(proj_type="blockwise", update_proj_gap=20, lr=0.01) if other == "frugal" else {}
    ref = llama(0)
    synthetic_steps(ref, llmvalley.create_optimizer(other, ref, **hp), 0, 60)
    model = llama(0)
    opt = llmvalley.create_optimizer(other, model, **hp)
    synthetic_steps(model, opt, 0, 45)  # the third selection is active
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp_path))
        resumed = llama(123)
        resumed_opt = llmvalley.create_optimizer(other, resumed, **hp)
        load_dcp(tmp_path, resumed, resumed_opt)
    assert llmvalley.state_bytes(resumed_opt) == llmvalley.state_bytes(opt)
    synthetic_steps(resumed, resumed_opt, 45, 15)
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{n} differs after a DCP resume"


def test_quantized_state_is_freed_with_its_scales():
    """int8 moments of a leaving tensor go with their block scales; the state is the codes
    and scales of the active tensor only."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 64)) for _ in range(4)]
    opt = llmvalley.create_optimizer("frugal", params, proj_type="blockwise",
                                     update_proj_gap=2, state_precision="int8")
    per_slot = 64 * 64 + 4 * (64 * 64 // 256)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        held = [i for i, p in enumerate(params) if "exp_avg.absmax" in opt.state[p]]
        assert held == [i for i, p in enumerate(params) if opt.state[p]["block_active"]]
        assert len(held) == 1 and llmvalley.state_bytes(opt) == 2 * per_slot
        assert opt.state[params[held[0]]]["exp_avg"].dtype == torch.uint8


def test_bf16_parameters_learn():
    model = llama(dtype=torch.bfloat16)
    opt = llmvalley.create_optimizer("frugal", model, proj_type="blockwise", lr=0.01,
                                     update_proj_gap=10)
    losses = train(model, opt, 0, 30)
    for st in opt.state.values():
        assert all(v.dtype == torch.float32 for v in st.values() if isinstance(v, torch.Tensor))
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0], f"{losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("bad", [
    dict(block_order="zigzag"), dict(block_seed=-1), dict(block_seed=1.5),
    dict(reset_statistics=False), dict(density=1.5), dict(density=-0.1),
])
def test_invalid_hyperparameters_are_named(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        llmvalley.create_optimizer("frugal", [nn.Parameter(torch.zeros(4, 4))],
                                   proj_type="blockwise", **bad)


def test_mirror_needs_an_even_number_of_active_tensors():
    params = [nn.Parameter(torch.zeros(4, 4)) for _ in range(8)]
    with pytest.raises(ValueError, match=r"block_order='mirror'.*3 active"):
        llmvalley.create_optimizer("frugal", params, proj_type="blockwise",
                                   block_order="mirror", density=0.375)
