"""docs/custom-optimizer.md: its code runs as written, and what it claims holds.

The ```python blocks of the page are executed in order in one namespace (once per module); the
explicit tests then use the objects it defines (the AdaMax transform, the specs).
"""

from __future__ import annotations

import copy
import re
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import llmvalley
from llmvalley.optim import ChainOptimizer, OptimizerSpec, register
from llmvalley.optim.registry import _REGISTRY

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom-optimizer.md"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

# Objects the tests create stay alive for the whole session: a freed spec's id could be
# reused by a later spec and hit a stale entry of the shell-option chain cache.
_KEEP: list = []


def python_blocks(text: str) -> list[str]:
    """The fenced ```python blocks of a page (other fences: ```text, plain ```, are skipped)."""
    return BLOCK.findall(text)


@pytest.fixture(scope="module")
def doc():
    """The namespace after running every python block of the page (registry cleaned up)."""
    llmvalley.list_optimizers()  # load the recipes first: the cleanup removes only the page's
    before = set(_REGISTRY)
    ns: dict = {"__name__": "custom_optimizer_doc"}
    _KEEP.append(ns)
    try:
        for i, block in enumerate(python_blocks(DOC.read_text())):
            code = compile(block, f"{DOC.name}[python block {i}]", "exec")
            exec(code, ns)
        yield ns
    finally:
        for name in set(_REGISTRY) - before:
            _REGISTRY.pop(name)


@pytest.fixture
def unique_name():
    """A registry name no other test uses; its entry is removed afterwards."""
    name = f"custom_adamax_{uuid.uuid4().hex[:8]}"
    yield name
    _REGISTRY.pop(name, None)


def test_doc_has_python_blocks():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 6
    assert all(block.strip() for block in blocks)


def test_doc_blocks_run_in_order(doc):
    for name in ("ScaleByAdamax", "adamax", "nsignum", "signum", "cadamw", "rotated_adam"):
        assert name in doc, name
    assert "nsignum" in _REGISTRY  # the page registers its spec (removed after this module)


def _run_twins(first, second, steps=5):
    """Train two float64 copies of one model with ``first(params)`` / ``second(params)``."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 2))
    a = a.to(torch.float64)
    b = copy.deepcopy(a)
    opts = (first(a.parameters()), second(b.parameters()))
    _KEEP.extend(opts)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(5, 6, dtype=torch.float64, generator=gen)
        for model, opt in zip((a, b), opts):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    return list(a.parameters()), list(b.parameters())


def _claimed_twins(doc):
    """What the page says is equal: its chains and the built-ins they reproduce."""
    from llmvalley.optim.transforms import EMA, Sign

    chain = [EMA("momentum_buffer", beta_key="momentum"), Sign()]
    return {
        "list": (lambda ps: ChainOptimizer(ps, chain, lr=1e-2, momentum=0.8, weight_decay=0.1),
                 lambda ps: ChainOptimizer(ps, "signum", lr=1e-2, momentum=0.8,
                                           weight_decay=0.1)),
        "signum": (lambda ps: ChainOptimizer(ps, doc["signum"], lr=1e-2, weight_decay=0.1,
                                             cautious=True),
                   lambda ps: ChainOptimizer(ps, "signum", lr=1e-2, momentum=0.9,
                                             weight_decay=0.1, cautious=True)),
        "cadamw": (lambda ps: ChainOptimizer(ps, doc["cadamw"], lr=1e-2),
                   lambda ps: ChainOptimizer(ps, "adamw", lr=1e-2, weight_decay=0.01,
                                             cautious=True)),
    }


@pytest.mark.parametrize("which", ["list", "signum", "cadamw"])
def test_doc_chains_equal_the_builtins_they_claim(doc, which):
    first, second = _claimed_twins(doc)[which]
    for a, b in zip(*_run_twins(first, second)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _adamax_pair(doc, **hparams):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))
    net = net.to(torch.float64)
    ref = copy.deepcopy(net)
    mine = ChainOptimizer(net.parameters(), doc["adamax"], **hparams)
    theirs = torch.optim.Adamax(ref.parameters(), **hparams)
    return net, ref, mine, theirs


@pytest.mark.parametrize("hparams", [
    dict(lr=1e-2),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.05, maximize=True),
])
def test_adamax_transform_matches_torch_over_50_steps(doc, hparams):
    net, ref, mine, theirs = _adamax_pair(doc, **hparams)
    start = [p.detach().clone() for p in ref.parameters()]
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        x = torch.randn(16, 12, dtype=torch.float64, generator=gen)
        y = torch.randn(16, 3, dtype=torch.float64, generator=gen)
        for model, opt in ((net, mine), (ref, theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b, p0 in zip(net.parameters(), ref.parameters(), start):
        moved = (b - p0).norm()
        assert moved > 0
        # relative to the distance travelled (stricter than relative to the parameter)
        assert ((a - b).norm() / moved).item() <= 1e-10
        assert ((a - b).norm() / b.norm()).item() <= 1e-10
    # same state, under torch's key names
    for a, b in zip(net.parameters(), ref.parameters()):
        for key in ("exp_avg", "exp_inf"):
            torch.testing.assert_close(mine.state[a][key], theirs.state[b][key],
                                       rtol=1e-10, atol=1e-14)


def test_adamax_state_dict_resume_is_exact(doc):
    net, _, opt, _ = _adamax_pair(doc, lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 12, dtype=torch.float64, generator=gen) for _ in range(6)]

    def step(model, o, x):
        o.zero_grad()
        model(x).pow(2).mean().backward()
        o.step()

    for x in batches[:3]:
        step(net, opt, x)
    twin = copy.deepcopy(net)
    twin_opt = ChainOptimizer(twin.parameters(), doc["adamax"], lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x in batches[3:]:
        step(net, opt, x)
        step(twin, twin_opt, x)
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_unregistered_spec_rejects_bad_hyperparameters(doc):
    spec = replace(doc["nsignum"], name=f"nsignum_unregistered_{uuid.uuid4().hex[:6]}",
                   _chains={})
    _KEEP.append(spec)
    assert spec.name not in _REGISTRY
    params = [torch.nn.Parameter(torch.zeros(4, 4))]
    with pytest.raises(ValueError, match=r"momentum=0\.0"):  # the spec's own check
        ChainOptimizer(params, spec, momentum=0.0)
    with pytest.raises(ValueError, match=r"momentum=1\.5"):  # the common range check
        ChainOptimizer(params, spec, momentum=1.5)
    with pytest.raises(ValueError, match="momentun"):  # unknown keys are named too
        ChainOptimizer(params, spec, momentun=0.9)
    with pytest.raises(ValueError, match=r"momentum=0\.0"):  # and per parameter group
        ChainOptimizer([{"params": params, "momentum": 0.0}], spec)
    opt = ChainOptimizer(params, spec, momentum=0.5)
    assert opt.param_groups[0]["momentum"] == 0.5


def test_adamax_state_numel_matches_state_bytes(doc):
    spec = doc["adamax"]
    shapes = [(20, 10), (20,), (5, 20, 3), (7,), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    declared = sum(spec.state_numel(p.shape) for p in params)
    assert declared == 2 * sum(p.numel() for p in params)
    opt = ChainOptimizer(params, spec)
    assert llmvalley.state_bytes(opt) == 8 * declared  # before the first step
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert llmvalley.state_bytes(opt) == 8 * declared  # after it: the same
    # a shell option's slots are declared as well (MARS keeps last_grad)
    mars = ChainOptimizer(params, spec, mars=True)
    with_mars = sum(spec.state_numel(p.shape, mars=True) for p in params)
    assert with_mars == 3 * sum(p.numel() for p in params)
    assert llmvalley.state_bytes(mars) == 8 * with_mars


def test_int8_state_on_the_custom_transform(doc):
    spec = doc["adamax"]
    big = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: quantized
    small = torch.nn.Parameter(torch.randn(64))  # under 4096: kept in float32
    opt = ChainOptimizer([big, small], spec, lr=1e-2, state_precision="int8")
    for _ in range(3):
        big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
        opt.step()
    st = opt.state[big]
    assert sorted(st) == ["exp_avg", "exp_avg.absmax", "exp_inf", "exp_inf.absmax", "step"]
    assert st["exp_avg"].dtype == st["exp_inf"].dtype == torch.uint8
    assert st["exp_avg.absmax"].shape == st["exp_inf.absmax"].shape == (4096 // 256,)
    assert sorted(opt.state[small]) == ["exp_avg", "exp_inf", "step"]
    assert opt.state[small]["exp_inf"].dtype == torch.float32
    expected = 2 * (4096 + 4 * 16) + 2 * 4 * 64
    assert llmvalley.state_bytes(opt) == expected
    # and it still tracks the float32 run closely
    ref_big = torch.nn.Parameter(big.detach().clone())
    ref = ChainOptimizer([ref_big], spec, lr=1e-2)
    q = ChainOptimizer([big], spec, lr=1e-2, state_precision="int8")
    for _ in range(5):
        g = torch.randn_like(big)
        big.grad, ref_big.grad = g.clone(), g.clone()
        q.step()
        ref.step()
    assert ((big - ref_big).norm() / ref_big.norm()).item() < 1e-2


def test_registered_spec_works_with_create_optimizer(doc, unique_name):
    from llmvalley.optim import Decay

    spec = OptimizerSpec(
        name=unique_name,
        defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
        build=lambda group: [doc["ScaleByAdamax"]()],
        decay=Decay("coupled"),
    )
    _KEEP.append(spec)
    with pytest.raises(ValueError, match="unknown optimizer"):
        llmvalley.create_optimizer(unique_name, torch.nn.Linear(3, 3))
    register(spec)
    assert llmvalley.get_spec(unique_name).family == "custom"
    assert unique_name in [s.name for s in llmvalley.list_optimizers()]
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 2))
    opt = llmvalley.create_optimizer(unique_name, model, lr=1e-2)
    assert {g["optimizer"] for g in opt.param_groups} == {unique_name}
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.01]  # routing: no decay for biases and norms
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(sorted(opt.state[p]) == ["exp_avg", "exp_inf", "step"]
               for p in model.parameters())
    with pytest.raises(ValueError, match="already registered"):
        register(spec)
