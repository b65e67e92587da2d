"""``implementation="auto"``: foreach first, the compiled tier once a group has run long
enough (:mod:`llmvalley.optim.auto_tier`)."""

from __future__ import annotations

import warnings

import pytest
import torch

import llmvalley
from llmvalley.optim import auto_tier, kernels
from llmvalley.optim.compiled import compile_stats
from llmvalley.optim.transforms.base import Transform
from tests.helpers import make_optimizer, train
from tests.test_implementation import float64_model


@pytest.fixture(autouse=True)
def small_groups_compile(monkeypatch):
    """These tests' tiny groups are below the size floor of the rule; lift it."""
    monkeypatch.setattr(auto_tier, "MIN_NUMEL", 0)


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def graphs_per_step(name: str, steps: int, **hp) -> tuple[list[int], list, object]:
    model = float64_model()
    opt = make_optimizer(name, model, **hp)
    graphs = []
    for step in range(steps):
        train(model, opt, step, 1)
        graphs.append(compile_stats(opt).graphs)
    return graphs, [p.detach().clone() for p in model.parameters()], opt


def foreach_run(name: str, steps: int, **hp) -> list:
    model = float64_model()
    train(model, make_optimizer(name, model, implementation="foreach", **hp), 0, steps)
    return [p.detach().clone() for p in model.parameters()]


def assert_close(got: list, expected: list, exact: bool = False) -> None:
    for g, e in zip(got, expected):
        if exact:
            assert torch.equal(g, e)
        else:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_auto_compiles_after_the_threshold_and_matches_foreach(monkeypatch):
    """Element-steps before step t are numel * (t - 1): with the threshold at 3 * numel of
    the whole model, every group is still eager at step 3 and compiled by step 6 (the first
    step of the compiled tier records the step powers eagerly, the next one compiles)."""
    monkeypatch.setenv(auto_tier.ENV, str(3 * numel(float64_model())))
    graphs, got, opt = graphs_per_step("nadam", 8, weight_decay=0.1)
    assert graphs[:4] == [0, 0, 0, 0], graphs
    assert graphs[-1] > 0, graphs
    assert_close(got, foreach_run("nadam", 8, weight_decay=0.1))
    assert opt.compile_seconds > 0


def test_default_threshold_keeps_short_runs_eager(monkeypatch):
    monkeypatch.delenv(auto_tier.ENV, raising=False)
    graphs, got, _ = graphs_per_step("lion", 6)
    assert graphs == [0] * 6
    assert_close(got, foreach_run("lion", 6), exact=True)


@pytest.mark.parametrize("hp", [{"implementation": "foreach"}, {"implementation": "auto"}])
def test_off_and_explicit_foreach_never_compile(monkeypatch, hp):
    monkeypatch.setenv(auto_tier.ENV, "off" if hp["implementation"] == "auto" else "0.5")
    graphs, _, _ = graphs_per_step("lion", 4, **hp)
    assert graphs == [0] * 4


def test_fused_and_explicit_fused_false_stay_as_asked(monkeypatch):
    """adamw's default is the fused kernel; ``fused=False`` asks for the foreach tier."""
    monkeypatch.setenv(auto_tier.ENV, "1")
    for hp in ({}, {"fused": False}):
        graphs, _, _ = graphs_per_step("adamw", 4, **hp)
        assert graphs == [0] * 4, hp


def test_chains_that_do_not_compile_whole_stay_eager(monkeypatch):
    """DoG keeps Python-float state without a prelude: its transform runs eagerly in the
    compiled tier, so ``"auto"`` keeps the chain on the foreach tier."""
    monkeypatch.setenv(auto_tier.ENV, "1")
    graphs, got, _ = graphs_per_step("dog", 4)
    assert graphs == [0] * 4
    assert_close(got, foreach_run("dog", 4), exact=True)


def test_a_transform_may_keep_auto_on_the_blocked_eager_tier(monkeypatch):
    """SinkGD's normalizations declare ``auto_compile = False`` (its cache-blocked eager
    step is the faster one): ``"auto"`` never compiles it, ``"compiled"`` still does."""
    monkeypatch.setenv(auto_tier.ENV, "1")
    graphs, got, _ = graphs_per_step("sinkgd", 4)
    assert graphs == [0] * 4
    assert_close(got, foreach_run("sinkgd", 4))  # (blocked: the same math, other rounding)
    graphs, _, _ = graphs_per_step("sinkgd", 4, implementation="compiled")
    assert graphs[-1] > 0


def compiled_graphs(name: str, implementation: str, steps: int, **hp
                    ) -> tuple[list[int], list[torch.Tensor]]:
    """``steps`` steps of ``name`` on two float32 tensors: the graphs compiled after each
    step, and the parameters."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((16, 8), (8,))]
    opt = llmvalley.create_optimizer(name, params, implementation=implementation, **hp)
    graphs = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        graphs.append(compile_stats(opt).graphs)
    return graphs, params


@pytest.mark.parametrize("total_steps", [None, 20])
def test_stable_spam_compiles_once_not_every_step(total_steps):
    """Stable-SPAM's bias corrections come from restarted step counts: computed in Python
    inside the graph, every step recompiled (27.9 s a step on 45M parameters). They come from
    its prelude now (a graph per reset-flag pattern); with ``total_steps`` (Adam's beta1 then
    changes every step) the transform runs eagerly and only the write compiles."""
    hp = dict(reset_interval=4, total_steps=total_steps)
    graphs, got = compiled_graphs("stable_spam", "compiled", 12, **hp)
    assert 0 < graphs[5] == graphs[-1] <= 4, graphs
    for g, e in zip(got, compiled_graphs("stable_spam", "foreach", 12, **hp)[1]):
        torch.testing.assert_close(g, e)
    params = [torch.nn.Parameter(torch.zeros(4))]
    opt = llmvalley.create_optimizer("stable_spam", params, total_steps=total_steps)
    chain = opt._chain(opt.param_groups[0])
    assert chain[-1].compiled is (total_steps is None)


def test_spam_compiles_a_few_graphs_across_resets():
    """SPAM's reset and clipping flags and its warm-up multiplier come from its prelude:
    through three reset intervals with warm-ups, a graph per flag pattern (the multiplier a
    0-d tensor), where tracing the step's functions recompiled every warm-up step up to
    dynamo's limit."""
    hp = dict(reset_interval=6, warmup_steps=4, clip_delay=2)
    graphs, got = compiled_graphs("spam", "compiled", 20, **hp)
    assert 0 < graphs[-1] <= 4 and graphs[12] == graphs[-1], graphs
    for g, e in zip(got, compiled_graphs("spam", "foreach", 20, **hp)[1]):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", ["spam", "grams", "adan"])
def test_a_kernel_that_bridges_the_eager_phase_gives_way_to_the_compiled_step(
        name, monkeypatch, kernel_calls):
    """SPAM's, Grams' and Adan's CPU kernels (``fused_until_compiled``) run the steps before
    ``"auto"`` compiles; then the compiled step, faster in steady state, takes over. The
    foreach tier's results throughout (float32 rounding)."""
    from tests.helpers import make_model

    model = make_model()
    monkeypatch.setenv(auto_tier.ENV, str(3 * numel(model)))
    opt = make_optimizer(name, model, weight_decay=0.1)
    graphs, calls = [], []
    for step in range(8):
        train(model, opt, step, 1)
        graphs.append(compile_stats(opt).graphs)
        calls.append(len(kernel_calls))
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    assert calls[0] == tensors and graphs[:3] == [0, 0, 0], (calls, graphs)
    # the compiled step took over the groups that compile (a group "auto" keeps eager, here
    # the one holding the 0-d gain, stays on the kernel)
    assert graphs[-1] > 0 and calls[-1] - calls[-2] < tensors, (calls, graphs)
    ref = make_model()
    train(ref, make_optimizer(name, ref, weight_decay=0.1, implementation="foreach"), 0, 8)
    for g, e in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


class _StepSpecialised(Transform):
    """A step scaled by a Python function of the step count: traced, it specialises the
    graph on every step (what Stable-SPAM's bias corrections did before their prelude)."""

    elementwise = True

    def __call__(self, ctx, updates):  # (hashing the symbolic step specialises it)
        return [u * (1.0 + 0.5 ** len({ctx.steps[i]: None})) for i, u in enumerate(updates)]


def test_a_chain_that_keeps_recompiling_goes_back_to_eager(monkeypatch):
    monkeypatch.setenv(auto_tier.ENV, "0")
    monkeypatch.setattr(auto_tier, "MAX_COMPILING_STEPS", 3)
    params = [torch.nn.Parameter(torch.randn(8, 8))]
    opt = llmvalley.ChainOptimizer(params, [_StepSpecialised()], lr=0.1)
    graphs = []
    with pytest.warns(RuntimeWarning, match="compiled new graphs on 4 steps"):
        for _ in range(12):
            params[0].grad = torch.ones(8, 8)
            opt.step()
            graphs.append(compile_stats(opt).graphs)
    compiling = sum(b > a for a, b in zip([0, *graphs], graphs))
    assert compiling == 4 and graphs[-1] == graphs[4], graphs  # eager from then on


def test_shared_statistics_compile_both_passes(monkeypatch):
    """Prodigy's sums run over every group, in the shell's two passes; both passes compile
    (its float state is read and advanced in preludes), so ``"auto"`` moves it to the
    compiled tier too, with the foreach tier's results (D-Adapt Adam's compiled passes:
    ``test_implementation.py``)."""
    name = "prodigy"
    monkeypatch.setenv(auto_tier.ENV, str(2 * numel(float64_model())))
    graphs, got, opt = graphs_per_step(name, 7, weight_decay=0.1)
    assert graphs[:3] == [0, 0, 0] and graphs[-1] > 0, graphs
    assert graphs[-1] == graphs[-2], graphs  # later steps reuse the graphs: d is a tensor
    assert_close(got, foreach_run(name, 7, weight_decay=0.1))
    layouts = compile_stats(opt).segments[name]
    assert all(kind == "compiled" for layout in layouts for kind, _ in layout), layouts


def test_a_resumed_run_switches_at_the_same_step(monkeypatch):
    """The rule reads step counts and shapes only: a run stopped before the switch and
    resumed in a new optimizer compiles at the same step and gives the same numbers."""
    monkeypatch.setenv(auto_tier.ENV, str(2 * numel(float64_model())))
    whole, expected, _ = graphs_per_step("ademamix", 7)
    model = float64_model()
    opt = make_optimizer("ademamix", model)
    train(model, opt, 0, 2)
    saved = (model.state_dict(), opt.state_dict())
    model2 = float64_model()
    opt2 = make_optimizer("ademamix", model2)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    resumed = []
    for step in range(2, 7):
        train(model2, opt2, step, 1)
        resumed.append(compile_stats(opt2).graphs)
    first = next(i for i, g in enumerate(whole) if g)
    assert 2 < first == 2 + next(i for i, g in enumerate(resumed) if g), (whole, resumed)
    assert_close([p.detach() for p in model2.parameters()], expected, exact=True)


@pytest.fixture
def broken_compiler(monkeypatch):
    """Every graph the compiled tier hands to its backend fails to compile; "auto" compiles
    from the second step."""
    from llmvalley.optim import compiled

    def broken(stats):
        def backend(gm, example_inputs):
            raise RuntimeError("no compiler here")
        return backend

    monkeypatch.setattr(compiled, "_counting_backend", broken)
    monkeypatch.setenv(auto_tier.ENV, "1")


@pytest.mark.parametrize("name", ["nadam", "prodigy"])
def test_a_failed_compile_runs_the_step_eagerly_and_stays_eager(broken_compiler, name):
    """A compile error is not the user's problem under "auto": the step runs on the foreach
    tier (the float state a prelude advanced restored first: NAdam's momentum product;
    Prodigy's gathering pass, which fails first, only reads its d), a warning says so, the
    group never tries again, and the run is the foreach run exactly."""
    model = float64_model()
    opt = make_optimizer(name, model)
    with pytest.warns(RuntimeWarning, match=f"{name}: compiling the step failed"):
        train(model, opt, 0, 6)
    assert_close([p.detach() for p in model.parameters()], foreach_run(name, 6),
                 exact=True)


def test_no_compiler_keeps_auto_eager(monkeypatch):
    monkeypatch.setenv(auto_tier.ENV, "1")
    monkeypatch.setattr(auto_tier, "compile_works", lambda device: False)
    graphs, _, _ = graphs_per_step("lion", 4)
    assert graphs == [0] * 4


@pytest.mark.parametrize("raw", ["soon", "-5", "nan"])
def test_bad_threshold_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(auto_tier.ENV, raw)
    with pytest.raises(ValueError, match=auto_tier.ENV):
        auto_tier.threshold("cpu")


def test_threshold_rule(monkeypatch):
    monkeypatch.delenv(auto_tier.ENV, raising=False)
    assert auto_tier.threshold("cpu") == 1e10
    assert auto_tier.threshold("cuda") is None  # not before a GPU check
    monkeypatch.setenv(auto_tier.ENV, "5e6")
    assert auto_tier.threshold("cpu") == 5e6 and auto_tier.threshold("cuda") is None
    monkeypatch.setenv(auto_tier.ENV, "off")
    assert auto_tier.threshold("cpu") is None
    monkeypatch.setenv(auto_tier.ENV, "0")  # a number: compile from the first steps
    assert auto_tier.threshold("cpu") == 0


def test_small_groups_never_compile(monkeypatch):
    monkeypatch.setattr(auto_tier, "MIN_NUMEL", 1 << 20)
    monkeypatch.setenv(auto_tier.ENV, "1")
    graphs, _, _ = graphs_per_step("lion", 4)
    assert graphs == [0] * 4


def test_a_failed_compile_leaves_quantized_state_as_it_was(broken_compiler, monkeypatch):
    """8-bit slots are decoded before the compiled segment: when its compile fails, the old
    codes are put back and the step runs eagerly, so the run is the foreach run bit for
    bit (parameters and codes). (Without the CPU kernel, which ``"auto"`` runs first.)"""
    monkeypatch.setattr(kernels, "load", lambda name, defines=(): None)
    out = []
    for impl in ("auto", "foreach"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 96), (4133,)]]
        opt = llmvalley.create_optimizer("adamw8bit", params, implementation=impl)
        gen = torch.Generator().manual_seed(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
        assert any("compiling the step failed" in str(w.message) for w in caught) \
            == (impl == "auto")
        out.append(([p.detach() for p in params], list(opt.state.values())))
    (got, got_state), (expected, expected_state) = out
    assert_close(got, expected, exact=True)
    for a, b in zip(got_state, expected_state):
        assert a.keys() == b.keys()
        for k, v in b.items():
            assert torch.equal(a[k], v) if isinstance(v, torch.Tensor) else a[k] == v, k


def test_whether_a_chain_compiles_whole_is_decided_once_per_layout(monkeypatch):
    """The walk over a chain's slots (every tensor's) runs at the first step past the
    threshold, not at every compiled step after it; a group whose tensors change shape is
    walked again."""
    monkeypatch.setenv(auto_tier.ENV, "0")
    calls = []
    walk = auto_tier.compiles_whole

    def counted(chain, group, ctx):
        calls.append(tuple(ctx.shapes))
        return walk(chain, group, ctx)

    monkeypatch.setattr(auto_tier, "compiles_whole", counted)
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))]
    opt = llmvalley.create_optimizer("nadam", params, lr=1e-2)
    for _ in range(5):
        params[0].grad = torch.randn_like(params[0])
        opt.step()
    assert calls == [((4, 3),)], calls
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.randn(2, dtype=torch.float64)))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == [((4, 3),), ((4, 3), (2,))], calls
