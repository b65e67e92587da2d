"""Cache-blocked eager steps (``llmvalley.optim.blocked``): ``implementation="auto"`` on CPU
runs an element-wise chain block by block, and must give the foreach tier's results bit for
bit. The block size is shrunk here so that the tiny model's tensors are cut into row blocks.
"""

from __future__ import annotations

import pytest
import torch

import llmvalley
from llmvalley.optim import blocked, kernels
from llmvalley.optim.shell import ChainOptimizer
from llmvalley.optim.transforms.base import Transform
from tests.helpers import make_model, make_optimizer, train

ALL = [s.name for s in llmvalley.list_optimizers()]
#: recipes whose chain must run in split blocks (element-wise, one compiled segment): a
#: change that silently stops blocking them fails here
SPLIT = ["lion", "signum", "nadam", "grams", "ademamix", "adan", "laprop", "adabelief",
         "schedulefree_adamw", "schedulefree_sgd", "exadam", "diffgrad"]
#: recipes whose chain reduces over each tensor but never across tensors: blocks of whole
#: tensors (AdamP's cosine test, SGD-SaI's SNR, FAdam's gradient normalisation, Adafactor's
#: and CAME's factors, MARS' per-tensor clipping)
WHOLE = ["adamp", "sgdp", "sgd_sai", "fadam", "adafactor", "came", "mars"]
#: recipes whose statistics sum over every group: the sums are gathered over whole groups,
#: then the second pass (the moments' direction and the write) runs in blocks of whole tensors
FINISH = ["prodigy", "dadapt_adam"]
#: recipes that must fall back to the whole-group foreach chain: statistics over the group
#: or over every group that the second pass still needs (Ranger21, DoG, MoMo)
NOT_BLOCKED = ["ranger21", "dog", "momo"]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 24 elements (TinyLM's 8-wide rows: 3 rows a block; its group holds ~560
    elements), no compiling under ``"auto"``, and no hand-written CPU kernel (Adafactor and
    CAME run blocked where theirs cannot be built)."""
    monkeypatch.setattr(blocked, "BLOCK_NUMEL", 24)
    monkeypatch.setenv("LLMVALLEY_AUTO_COMPILE", "off")
    monkeypatch.setattr(kernels, "load", lambda name: None)


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        out += [v.clone() for _, v in sorted(st.items()) if isinstance(v, torch.Tensor)]
    return out


def run(name: str, implementation: str, steps: int = 4, dtype: torch.dtype = torch.float32,
        **hp) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    model = make_model(dtype=dtype)
    opt = make_optimizer(name, model, implementation=implementation, **hp)
    train(model, opt, 0, steps)
    return snapshot(model, opt), opt


def block_kinds(opt: torch.optim.Optimizer) -> set[str]:
    """The kinds of block layout the groups of ``opt`` (a routed optimizer's members
    included) got at their first blocked step: ``"split"`` (some tensor cut into row
    blocks) or ``"whole"``; empty when no group passed the static checks."""
    kinds = set()
    for m in getattr(opt, "optimizers", None) or [opt]:
        for blocks in getattr(m, "_blocks", {}).values():
            if blocks:
                cut = any(rows is not None for b in blocks for _, _, rows in b)
                kinds.add("split" if cut else "whole")
    return kinds


def ran_blocked(opt: torch.optim.Optimizer) -> bool:
    return bool(block_kinds(opt))


def assert_identical(name: str, got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected), name
    for g, e in zip(got, expected):
        assert torch.equal(g, e), f"{name}: the blocked step differs from the foreach tier"


@pytest.mark.parametrize("name", ALL)
def test_blocking_keeps_every_recipes_bits(name, monkeypatch):
    """Every recipe under ``"auto"``, blocked where it applies, against the same without
    blocks (a block size no group reaches)."""
    got, _ = run(name, "auto")
    monkeypatch.setattr(blocked, "BLOCK_NUMEL", 1 << 40)
    expected, _ = run(name, "auto")
    assert_identical(name, got, expected)


@pytest.mark.parametrize("name", SPLIT + WHOLE + FINISH)
def test_blocked_recipes_match_the_foreach_tier(name):
    assert_identical(name, run(name, "auto")[0], run(name, "foreach")[0])


@pytest.mark.parametrize("name, kind", [(n, "split") for n in SPLIT]
                         + [(n, "whole") for n in WHOLE])
def test_recipes_run_blocked(name, kind, monkeypatch):
    calls = []
    real = blocked.blocked_step
    monkeypatch.setattr(blocked, "blocked_step",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    _, opt = run(name, "auto")
    assert block_kinds(opt) == {kind} and len(calls) >= 3, name  # every step after the first


@pytest.mark.parametrize("name", FINISH)
def test_shared_statistics_finish_in_blocks(name, monkeypatch):
    """The second pass runs blocked at every step after the first (which creates the state);
    the gathering pass does not."""
    calls = []
    real = blocked.blocked_step
    monkeypatch.setattr(blocked, "blocked_step",
                        lambda *a, **k: calls.append(k.get("updates")) or real(*a, **k))
    _, opt = run(name, "auto")
    assert block_kinds(opt) == {"whole"} and len(calls) >= 3, name
    assert all(u is not None for u in calls), "never the one-pass blocked step"


@pytest.mark.parametrize("name, hp", [
    ("prodigy", dict(weight_decay=0.1)),
    ("prodigy", dict(weight_decay=0.1, decouple=False)),
    ("prodigy", dict(slice_p=3, safeguard_warmup=True)),
    ("prodigy", dict(betas=(0.0, 0.99))),  # the plan's scale: d_new / d_old
    ("prodigy", dict(use_bias_correction=True, maximize=True)),
    ("dadapt_adam", dict(weight_decay=0.1)),
    ("dadapt_adam", dict(weight_decay=0.1, decouple=False, layer_scale=0.5)),
    ("prodigy", dict(cautious=True)),  # the mask's mean, per tensor, after the barrier
    ("prodigy", dict(mars=True, adagc=True)),  # per-tensor corrections before the sums
    ("prodigy", dict(state_precision="int8")),  # moments decoded and stored per block
    ("dadapt_adam", dict(state_dtype=torch.bfloat16)),
])
def test_shared_statistics_options_blocked_identically(name, hp):
    """Decay forms, sliced sums, a zero beta1 and bias correction keep the foreach bits."""
    expected, _ = run(name, "foreach", steps=5, **hp)
    got, opt = run(name, "auto", steps=5, **hp)
    assert block_kinds(opt) == {"whole"}
    assert_identical(f"{name} {hp}", got, expected)


def test_shared_statistics_over_groups_with_their_own_settings():
    """Sums over two groups (one frozen at lr=0 for two steps of four), each finishing in
    its own blocks."""
    def go(implementation: str) -> list[torch.Tensor]:
        model = make_model()
        matrices = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2]
        opt = llmvalley.create_optimizer(
            "prodigy", [{"params": matrices}, {"params": rest, "lr": 0.0}],
            implementation=implementation)
        train(model, opt, 0, 2)
        opt.param_groups[1]["lr"] = 0.5
        train(model, opt, 2, 2)
        return snapshot(model, opt)

    assert_identical("prodigy groups", go("auto"), go("foreach"))


@pytest.mark.parametrize("name", NOT_BLOCKED)
def test_other_recipes_fall_back(name):
    _, opt = run(name, "auto")
    assert not ran_blocked(opt), name


def test_foreach_is_not_blocked():
    for name in ("lion", "adamp"):
        _, opt = run(name, "foreach")
        assert not ran_blocked(opt)


@pytest.mark.parametrize("hp", [
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, maximize=True),
    dict(cautious=True),
    dict(mars=True),
    dict(adagc=True),
])
def test_shell_options_blocked_identically(hp):
    """Shell options keep the bits: decay and maximize act per element (split blocks);
    caution (rescaled by the mask's mean), MARS and AdaGC (clipped by per-tensor norms)
    reduce over each tensor (blocks of whole tensors)."""
    expected, _ = run("nadam", "foreach", **hp)
    got, opt = run("nadam", "auto", **hp)
    assert block_kinds(opt) == {"split" if set(hp) <= {"weight_decay", "maximize"}
                                else "whole"}
    assert_identical(f"nadam {hp}", got, expected)


@pytest.mark.parametrize("name", ["ademamix", "prodigy"])
def test_float64_and_bfloat16_parameters(name):
    for dtype in (torch.float64, torch.bfloat16):
        expected, _ = run(name, "foreach", dtype=dtype)
        got, opt = run(name, "auto", dtype=dtype)
        assert_identical(f"{name} {dtype}", got, expected)
        assert ran_blocked(opt)


@pytest.mark.parametrize("hp", [dict(state_precision="int8"),
                                dict(state_dtype=torch.bfloat16)])
@pytest.mark.parametrize("name", ["lion", "adamp"])
def test_stored_state_in_another_format(hp, name):
    """8-bit codes and bf16 storage are decoded per tensor: a step that would split such a
    tensor runs the whole-group chain instead (never a block of a decoded copy); blocks of
    whole tensors decode and store each one as the plain chain does. Same bits either way."""
    expected, _ = run(name, "foreach", **hp)
    got, opt = run(name, "auto", **hp)
    assert_identical(f"{name} {hp}", got, expected)


def test_schedule_free_modes_and_resume():
    """Schedule-free's prelude (weight sums) runs once per step, not per block; train/eval
    switches and a state-dict resume in the middle keep the bits."""
    def go(implementation: str, resume: bool) -> list[torch.Tensor]:
        model = make_model()
        opt = make_optimizer("schedulefree_adamw", model, implementation=implementation,
                             warmup_steps=2)
        train(model, opt, 0, 3)
        opt.eval()
        opt.train()
        if resume:
            saved = opt.state_dict()
            opt = make_optimizer("schedulefree_adamw", model, implementation=implementation,
                                 warmup_steps=2)
            opt.load_state_dict(saved)
        train(model, opt, 3, 3)
        opt.eval()
        return snapshot(model, opt)

    expected = go("foreach", resume=False)
    assert_identical("schedulefree_adamw", go("auto", resume=False), expected)
    assert_identical("schedulefree_adamw resumed", go("auto", resume=True), expected)


def test_param_groups_with_their_own_hyperparameters():
    def go(implementation: str) -> list[torch.Tensor]:
        model = make_model()
        matrices = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2]
        opt = llmvalley.create_optimizer(
            "lion", [{"params": matrices, "lr": 3e-4, "betas": (0.95, 0.98)},
                     {"params": rest, "weight_decay": 0.5}], implementation=implementation)
        train(model, opt, 0, 4)
        return snapshot(model, opt)

    assert_identical("lion groups", go("auto"), go("foreach"))


def test_layout_covers_every_element_once():
    shapes = [(13, 8), (8, 8), (8,), (16, 8), (16,), (8, 16), (), (13, 8), (100,), (3, 4, 5)]
    blocks = blocked.layout(shapes, block=24)
    seen = [torch.zeros(s, dtype=torch.int64) for s in shapes]
    for pieces in blocks:
        size = 0
        for i, first, rows in pieces:
            view = seen[i] if rows is None else seen[i].narrow(0, first, rows)
            assert view.ndim == len(shapes[i])  # a block keeps the tensor's rank
            view += 1
            size += view.numel()
        assert size <= 24 or len(pieces) == 1  # a block overflows only when a row does
    assert all(bool((s == 1).all()) for s in seen)


def test_small_groups_are_not_blocked(monkeypatch):
    """A group under two blocks' worth of elements runs the plain foreach chain."""
    monkeypatch.setattr(blocked, "BLOCK_NUMEL", 1 << 19)
    _, opt = run("lion", "auto")
    assert not getattr(opt, "_blocks", {})


class GroupNormalize(Transform):
    """A test transform whose statistic runs over the whole group: each update divided by
    the 2-norm of all the group's updates together (so blocks would change it)."""

    whole_group = True

    def __call__(self, ctx, updates):
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(u)
                                                      for u in updates]))
        return [u / total for u in updates]


class TensorNormalize(Transform):
    """The same, per tensor: each update divided by its own 2-norm (declared)."""

    per_tensor = True

    def __call__(self, ctx, updates):
        return [u / torch.linalg.vector_norm(u) for u in updates]


class Undeclared(GroupNormalize):
    """A group statistic with no declaration at all: must not be blocked either."""

    whole_group = False


@pytest.mark.parametrize("transform, kind", [(GroupNormalize(), set()), (Undeclared(), set()),
                                             (TensorNormalize(), {"whole"})])
def test_custom_chains_block_only_when_declared_per_tensor(transform, kind):
    """A chain of your own runs in blocks of whole tensors only when its transforms declare
    ``per_tensor`` (and none ``whole_group``); the results are the foreach tier's bits."""
    def go(implementation: str) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        model = make_model()
        opt = ChainOptimizer(model.parameters(), [transform], lr=1e-2,
                             implementation=implementation)
        train(model, opt, 0, 4)
        return snapshot(model, opt), opt

    got, opt = go("auto")
    assert block_kinds(opt) == kind
    assert_identical(type(transform).__name__, got, go("foreach")[0])
