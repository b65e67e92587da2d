"""The execution tiers (``implementation=``): foreach, compiled, fused and auto.

Every tier must give the foreach tier's results to float tolerance. The compiled tier is
tested on a representative subset by default (each recipe compiles for a few seconds on CPU);
``LLMVALLEY_SLOW=1`` runs the sweep over every registered recipe.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.utils import counters

import llmvalley
from llmvalley.optim.compiled import compile_stats
from llmvalley.optim.spec import execution_tier
from llmvalley.optim.state import SR_SEED
from tests.helpers import (
    TEST_HPARAMS,
    backward,
    create,
    loss_fn,
    make_model,
    make_optimizer,
    roundtrip,
    train,
)

#: element-wise, factored, matrix (Newton-Schulz), rotated (eigenbases), shared-statistics
#: and float-state recipes: each path through the compiled tier
SUBSET = ["adamw", "lion", "adafactor", "muon", "soap", "prodigy", "schedulefree_adamw"]
SLOW = os.environ.get("LLMVALLEY_SLOW") == "1"
ALL = [s.name for s in llmvalley.list_optimizers()]
STEPS = 4


def float64_model(scalar: bool = False) -> torch.nn.Module:
    """The tiny LLaMA-shaped model in float64 (so that the comparison sees the tier, not
    float32 rounding amplified by Newton-Schulz). Its 0-d gain is frozen unless ``scalar``:
    the compiled tier runs groups holding 0-d float64 CPU tensors eagerly (an inductor bug,
    see llmvalley.optim.compiled), and the tests must see the compiled code."""
    model = make_model(dtype=torch.float64)
    model.gain.requires_grad_(scalar)
    return model


def run(name: str, implementation: str, steps: int = STEPS, scalar: bool = False,
        **hp) -> tuple[list, object]:
    """``steps`` training steps of :func:`float64_model`; the parameters and optimizer."""
    model = float64_model(scalar)
    opt = make_optimizer(name, model, implementation=implementation, **hp)
    train(model, opt, 0, steps)
    return [p.detach().clone() for p in model.parameters()], opt


#: recipes whose compiled step checks a preconditioner factor on the host before its
#: eigendecomposition or matrix root (a deliberate graph break; the decomposition dwarfs it)
HOST_CHECKS = {"shampoo", "asgo"}


def assert_no_graph_breaks(name: str) -> None:
    """No graph break since ``counters.clear()``: a break inside a segment's loop over its
    transforms makes dynamo run the segment eagerly and compile each transform apart."""
    if name not in HOST_CHECKS:
        assert not counters["graph_break"], f"{name}: {dict(counters['graph_break'])}"


def tolerance(name: str) -> dict[str, float]:
    """float64 tolerance between tiers. Shampoo's inverse fourth root of a nearly singular
    factor amplifies rounding: its tiers differ by up to ~1e-8 relative (in the LLMVALLEY_SLOW
    sweep, depending on which tests ran before in the process, already at 8afccfb)."""
    return dict(rtol=1e-7, atol=1e-9) if name == "shampoo" else dict(rtol=1e-9, atol=1e-11)


def assert_same(name: str, got: list, expected: list) -> None:
    moved = max((e - p).abs().max().item()
                for e, p in zip(expected, float64_model().parameters()))
    assert moved > 0, f"{name}: the foreach run did not move the parameters"
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, msg=name, **tolerance(name))


# ---- the option --------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["fast", "Compiled", 1, None, True])
def test_bad_implementation_raises(value):
    with pytest.raises(ValueError, match="implementation"):
        llmvalley.create_optimizer("adamw", make_model(), implementation=value)


def test_fused_tier_needs_a_kernel():
    with pytest.raises(ValueError, match="implementation='fused'.*no fused kernel"):
        llmvalley.create_optimizer("signum", make_model(), implementation="fused")
    with pytest.raises(ValueError, match="implementation='fused'.*shell option"):
        llmvalley.create_optimizer("adamw", make_model(), implementation="fused",
                                   cautious=True)
    with pytest.raises(ValueError, match="implementation.*fused=True"):
        llmvalley.create_optimizer("adamw", make_model(), implementation="foreach",
                                   fused=True)
    with pytest.raises(ValueError, match="fused="):
        llmvalley.create_optimizer("adamw", make_model(), fused="yes")


@pytest.mark.parametrize("name, hp, tier", [
    ("adamw", {}, "fused"),
    ("adam", {}, "fused"),
    ("adamw", {"fused": False}, "foreach"),
    ("adamw", {"fused": True}, "fused"),
    ("adamw", {"cautious": True}, "foreach"),  # the kernel computes the plain method only
    ("adamw", {"adagc": True}, "fused"),  # the clipping as the kernel's gradient scale
    ("adagc", {}, "fused"),
    ("sgd", {"adagc": True}, "foreach"),
    ("lion", {"adagc": True}, "foreach"),
    ("stable_spam", {}, "fused"),
    ("fadam", {}, "fused"),
    ("mars", {}, "fused"),
    ("spam", {}, "fused"),
    ("adan", {}, "fused"),
    ("grams", {}, "fused"),
    ("stable_spam", {"total_steps": 100}, "fused"),
    ("adamw", {"implementation": "compiled"}, "compiled"),
    ("adamw", {"implementation": "compiled", "fused": False}, "compiled"),
    ("sgd", {}, "fused"),
    ("adagrad", {}, "fused"),
    ("adafactor", {}, "fused"),
    ("came", {}, "fused"),
    ("adamp", {}, "fused"),
    ("sgdp", {}, "fused"),
    ("adafactor", {"implementation": "foreach"}, "foreach"),
    ("sgd", {"implementation": "foreach"}, "foreach"),
    ("signum", {}, "foreach"),  # auto starts eager (auto_tier moves long runs to compiled)
    ("lion", {}, "fused"),  # float32 or bfloat16 moments: the low-bit kernel
    ("lion", {"state_dtype": torch.bfloat16}, "fused"),
    ("adamw", {"state_precision": "bf16"}, "fused"),
    ("adamw", {"state_precision": "int8"}, "foreach"),
    ("lion", {"implementation": "compiled"}, "compiled"),
    ("muon", {"implementation": "foreach"}, "foreach"),
])
def test_auto_rule(name, hp, tier):
    spec = llmvalley.get_spec(name)
    assert execution_tier(spec, spec.resolve(hp)) == tier


def test_every_recipe_accepts_every_tier_it_can_run():
    for spec in llmvalley.list_optimizers():
        hp = TEST_HPARAMS.get(spec.name, {})
        for impl in ("auto", "foreach", "compiled"):
            spec.resolve({**hp, "implementation": impl})
        if spec.fused is not None:
            spec.resolve({**hp, "implementation": "fused"})


# ---- results: every tier gives the foreach tier's ---------------------------------------
@pytest.mark.parametrize("name, hp", [
    ("adam", {}),
    ("adamw", {}),
    ("sgd", {}),  # no momentum buffer
    ("sgd", {"momentum": 0.9, "dampening": 0.1}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "maximize": True}),
    ("adagrad", {"lr_decay": 0.05, "initial_accumulator_value": 0.1}),
])
def test_fused_tier_matches_foreach(name, hp):
    expected, _ = run(name, "foreach", weight_decay=0.1, **hp)
    fused, _ = run(name, "fused", weight_decay=0.1, **hp)
    auto, _ = run(name, "auto", weight_decay=0.1, **hp)
    assert_same(name, fused, expected)
    assert_same(name, auto, expected)


#: AdaGC settings that clip in both phases on the tiny model: the warm-up's global norm
#: (lambda_abs below the gradient norm) and the relative rule (lambda_rel near 1)
ADAGC_CLIPS = dict(adagc=True, adagc_warmup=3, adagc_lambda_abs=0.05, adagc_lambda_rel=1.0,
                   adagc_beta=0.5)


def adagc_run(name: str, implementation: str, steps: int = 8, dtype=torch.float32,
              **hp) -> tuple[list, object, list]:
    """``steps`` steps of the tiny model with AdaGC's clipping; its parameters, the optimizer
    and whether every step left ``.grad`` as the backward pass wrote it."""
    hp = {"weight_decay": 0.1, **ADAGC_CLIPS, **hp}
    if name == "adagc":
        del hp["adagc"]
    model = make_model(dtype=dtype)
    opt = make_optimizer(name, model, implementation=implementation, **hp)
    kept = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        backward(opt, loss_fn(model, step))
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        kept.append(all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads)))
    return [p.detach().clone() for p in model.parameters()], opt, kept


@pytest.mark.parametrize("name, hp", [
    ("adamw", {}),
    ("adagc", {}),
    ("adamw", {"maximize": True, "lr": 1e-2}),
])
def test_adagc_runs_on_the_adam_kernel(name, hp, kernel_calls):
    """AdamW with adagc=True (and the adagc recipe) stays on the fused tier: the CPU Adam
    kernel scales each gradient by its clipping factor as it reads it. The foreach tier's
    results and state, clipping in both AdaGC phases, and ``.grad`` untouched (torch's fused
    kernels, given a gradient scale, would write the unscaled gradient back)."""
    expected, ref, _ = adagc_run(name, "foreach", **hp)
    assert not kernel_calls
    for implementation in ("fused", "auto"):
        kernel_calls.clear()
        got, opt, kept = adagc_run(name, implementation, **hp)
        assert kernel_calls == ["adam"] * (8 * len(got)), implementation
        assert all(kept)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        for a, b in zip(opt.state.values(), ref.state.values()):
            for key in ("exp_avg", "exp_avg_sq", "adagc_norm"):
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    # the settings clip: a plain run ends elsewhere
    model = make_model()
    plain = {k: v for k, v in {"weight_decay": 0.1, **hp}.items()}
    train(model, make_optimizer("adamw", model, **plain), 0, 8)
    assert max((p - e).abs().max().item() for p, e in zip(model.parameters(), expected)) > 1e-4


@pytest.mark.parametrize("name, hp, dtype", [
    ("adam", {}, torch.float32),  # coupled decay: no kernel takes AdaGC's factor
    ("sgd", {"momentum": 0.9}, torch.float32),
    ("adagrad", {}, torch.float32),
    ("adamw", {"amsgrad": True}, torch.float32),
    ("adamw", {}, torch.float64),  # the kernel is float32's
    ("adamw", {"state_precision": "bf16"}, torch.float32),  # the low-bit kernel takes no scale
])
def test_adagc_runs_the_chain_where_no_kernel_scales(name, hp, dtype, kernel_calls,
                                                     monkeypatch):
    torch_kernels = []
    for kernel in ("_fused_adam_", "_fused_adamw_", "_fused_sgd_", "_fused_adagrad_"):
        monkeypatch.setattr(torch, kernel, lambda *a, k=kernel, **kw: torch_kernels.append(k))
    expected, _, _ = adagc_run(name, "foreach", steps=4, dtype=dtype, **hp)
    got, _, kept = adagc_run(name, "auto", steps=4, dtype=dtype, **hp)
    assert not set(kernel_calls) - {"sr"} and not torch_kernels  # (bf16 rounding has a kernel)
    assert all(kept)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_adagc_fused_resumes_across_tiers():
    """A checkpoint of the fused AdaGC step resumes on the foreach tier and the other way
    round, with the foreach run's results."""
    hp = dict(weight_decay=0.1, **ADAGC_CLIPS)

    def run32(first: str, second: str) -> list:
        model = make_model()
        opt = make_optimizer("adamw", model, implementation=first, **hp)
        train(model, opt, 0, 5)
        ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
        resumed = make_model(seed=3)
        resumed.load_state_dict(ckpt["model"])
        opt = make_optimizer("adamw", resumed, implementation=second, **hp)
        opt.load_state_dict(ckpt["opt"])
        train(resumed, opt, 5, 5)
        return [p.detach() for p in resumed.parameters()]

    expected = run32("foreach", "foreach")
    for tiers in (("fused", "foreach"), ("foreach", "fused")):
        for g, e in zip(run32(*tiers), expected):
            torch.testing.assert_close(g, e, rtol=2e-5, atol=1e-6)


def test_fused_sgd_starts_a_new_momentum_buffer_as_the_update():
    """A parameter that gets its first gradient late starts its buffer then (the kernel runs
    once for new buffers, once for the others), as the foreach chain does."""
    out = []
    for impl in ("foreach", "fused"):
        model = float64_model()
        opt = make_optimizer("sgd", model, implementation=impl, momentum=0.9, dampening=0.1)
        for step in range(5):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, step).backward()
            if step < 2:
                model.up_proj.weight.grad = None  # no gradient yet: no step, no buffer
            opt.step()
        assert "momentum_buffer" in opt.state[model.up_proj.weight]
        out.append([p.detach().clone() for p in model.parameters()])
    assert_same("sgd", *out)


def _compiled_matches_foreach(name: str) -> None:
    hp = TEST_HPARAMS.get(name, {})
    expected, _ = run(name, "foreach", **hp)
    counters.clear()
    got, opt = run(name, "compiled", **hp)
    assert_same(name, got, expected)
    assert_no_graph_breaks(name)
    stats = compile_stats(opt)
    if stats.graphs == 0:  # 0-d float64 state (AdaGC, Stable-SPAM, SGD-SaI): run eagerly
        assert all(kind == "eager" for layouts in stats.segments.values()
                   for layout in layouts for kind, _ in layout)
        _compiled_matches_foreach_float32(name, hp)
        return
    # the steps after the first ran compiled (something was compiled: at least the write)
    assert stats.seconds > 0 and opt.compile_seconds == stats.seconds


def _compiled_matches_foreach_float32(name: str, hp: dict) -> None:
    """The compiled tier in float32 (where 0-d tensors compile), to float32 rounding."""
    out = []
    for impl in ("foreach", "compiled"):
        model = make_model()
        opt = make_optimizer(name, model, implementation=impl, **hp)
        train(model, opt, 0, STEPS)
        out.append([p.detach() for p in model.parameters()])
    assert compile_stats(opt).graphs > 0
    for g, e in zip(*out):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", SUBSET)
def test_compiled_tier_matches_foreach(name):
    _compiled_matches_foreach(name)


@pytest.mark.parametrize("name, hp", [
    ("prodigy", dict(d0=1e-3, slice_p=3, safeguard_warmup=True, betas=(0.0, 0.99),
                     weight_decay=0.1)),
    ("dadapt_adam", dict(d0=1e-3, use_bias_correction=True, weight_decay=0.1,
                         layer_scale=0.5)),
])
def test_compiled_shared_statistics_variants(name, hp):
    """The branches of Prodigy's and D-Adapt Adam's compiled passes: Prodigy's sliced
    statistics, safeguarded warm-up and ``beta1 = 0`` (the new ``d`` in the direction),
    D-Adapt Adam's bias correction and layer scale, both with decoupled decay."""
    expected, _ = run(name, "foreach", steps=5, **hp)
    got, opt = run(name, "compiled", steps=5, **hp)
    assert_same(name, got, expected)
    assert compile_stats(opt).graphs > 0


@pytest.mark.skipif(not SLOW, reason="every recipe compiles (minutes): LLMVALLEY_SLOW=1")
@pytest.mark.parametrize("name", [n for n in ALL if n not in SUBSET])
def test_compiled_tier_matches_foreach_every_recipe(name):
    _compiled_matches_foreach(name)


def test_compiled_float32_matches_foreach():
    """In float32, to float32 rounding (inductor fuses and reorders the arithmetic)."""
    out = []
    for impl in ("foreach", "compiled"):
        model = make_model()
        opt = make_optimizer("adamw", model, implementation=impl, weight_decay=0.1)
        train(model, opt, 0, STEPS)
        out.append([p.detach() for p in model.parameters()])
    for g, e in zip(*out):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


# ---- no recompilation ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adamw", "lion", "prodigy"])
def test_lr_schedule_and_next_step_do_not_recompile(name):
    """One compilation: the graphs compiled at the first compiled step serve every later
    step, with the learning rate changed by a scheduler at each one."""
    model = float64_model()
    opt = make_optimizer(name, model, implementation="compiled", weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    graphs = []
    for step in range(7):
        train(model, opt, step, 1)
        sched.step()
        graphs.append(compile_stats(opt).graphs)
    assert graphs[0] == 0  # the first step (state creation) runs eagerly
    assert graphs[1] > 0
    assert graphs[-1] == graphs[1], graphs
    # and the results are still the foreach tier's under the same schedule
    ref_model = float64_model()
    ref = make_optimizer(name, ref_model, implementation="foreach", weight_decay=0.1)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda t: 1.0 / (1 + t))
    for step in range(7):
        train(ref_model, ref, step, 1)
        ref_sched.step()
    for g, e in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_segments_report_what_runs_eagerly():
    """DoG keeps Python-float state (its distance and gradient sums) without a prelude: that
    transform runs between compiled segments. Schedule-free's float state (its weight sum) is
    advanced in a prelude, so its whole chain is one compiled function, as AdamW's."""
    _, opt = run("dog", "compiled", steps=2)
    for layout in compile_stats(opt).segments["dog"]:
        assert [kind for kind, _ in layout] == ["compiled", "eager", "compiled"]
    _, opt = run("schedulefree_adamw", "compiled", steps=2)
    assert compile_stats(opt).segments["schedulefree_adamw"] == [[
        ("compiled", ("ScaleByAdam", "CoupledWeightDecay", "ScheduleFree", "write"))]]
    _, opt = run("adamw", "compiled", steps=2)
    assert compile_stats(opt).segments["adamw"] == [[("compiled", ("ScaleByAdam", "write"))]]
    # statistics shared over groups: both of the shell's passes compile (Prodigy's float
    # state is read before the gathering kernel and advanced before the second one)
    _, opt = run("prodigy", "compiled", steps=3)
    assert compile_stats(opt).segments["prodigy"] == [
        [("compiled", ("ProdigyStep.gather",))], [("compiled", ("ProdigyStep", "write"))]]


# ---- TAM: its torque is a tensor slot, computed without a host sync -----------------------
def test_tam_compiles_whole_and_matches_foreach():
    expected, _ = run("tam", "foreach", weight_decay=0.1)
    got, opt = run("tam", "compiled", weight_decay=0.1)
    assert_same("tam", got, expected)
    assert compile_stats(opt).segments["tam"] == [[
        ("compiled", ("CoupledWeightDecay", "TorqueAwareMomentum", "write"))]]
    torque = next(iter(opt.state.values()))["torque"]
    assert isinstance(torque, torch.Tensor) and torque.shape == (1,)


@pytest.mark.parametrize("implementation", ["foreach", "compiled"])
def test_tam_resumes_a_state_dict_with_float_torques(implementation):
    """Checkpoints written while TAM's torque was a Python float still resume: the float
    becomes the one-element tensor the slot now is, and the run continues the uninterrupted
    one."""
    ref_model = float64_model()
    ref = make_optimizer("tam", ref_model, implementation="foreach")
    train(ref_model, ref, 0, 5)
    model = float64_model()
    opt = make_optimizer("tam", model, implementation="foreach")
    train(model, opt, 0, 2)
    saved = opt.state_dict()
    for st in saved["state"].values():
        st["torque"] = float(st["torque"])  # the old format
    # into a fresh optimizer, and into one that has already compiled its steps
    for fresh in (True, False):
        model2 = float64_model()
        opt2 = make_optimizer("tam", model2, implementation=implementation)
        if not fresh:
            train(model2, opt2, 0, 3)
            model2.load_state_dict(model.state_dict())
        else:
            model2.load_state_dict(model.state_dict())
        opt2.load_state_dict(saved)
        train(model2, opt2, 2, 3)
        for st in opt2.state.values():
            assert isinstance(st["torque"], torch.Tensor) and st["torque"].shape == (1,)
        for g, e in zip(model2.parameters(), ref_model.parameters()):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_zero_dim_float64_groups_run_eagerly():
    """Inductor (torch 2.13, CPU) loses in-place updates of 0-d float64 inputs: a group
    holding one runs eagerly, and still gives the foreach tier's results."""
    expected, _ = run("adafactor", "foreach", scalar=True)
    got, opt = run("adafactor", "compiled", scalar=True)
    assert_same("adafactor", got, expected)
    layouts = compile_stats(opt).segments["adafactor"]
    assert [("eager", ("ScaleByAdafactor", "write"))] in layouts  # the group with the gain
    assert [("compiled", ("ScaleByAdafactor", "write"))] in layouts  # the other one


def test_a_float32_scalar_parameter_on_the_compiled_tier():
    """A trainable 0-d float32 parameter: in a compiled segment its debiased momentum is
    promoted to float64 (the bias correction is a 0-d float64 tensor there), which Shampoo's
    float32 roots refused (``tensordot``: both inputs should have the same dtype). ``eps``
    1e-6: at the default 1e-12 the roots of the nearly singular factors amplify float32
    rounding to ~3% in either tier (against a float64 run)."""
    def run_float32(implementation: str) -> list[torch.Tensor]:
        model = make_model()
        opt = make_optimizer("shampoo", model, implementation=implementation, eps=1e-6)
        train(model, opt, 0, 3)
        return [p.detach().clone() for p in model.parameters()]

    assert make_model().gain.dim() == 0 and make_model().gain.requires_grad
    for g, e in zip(run_float32("compiled"), run_float32("foreach")):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


# ---- step powers: computed before the kernel ----------------------------------------------
def _graphs_handed_to_inductor(monkeypatch) -> list[torch.fx.GraphModule]:
    import llmvalley.optim.compiled as compiled

    graphs: list[torch.fx.GraphModule] = []
    counting = compiled._counting_backend

    def capturing(stats):
        inner = counting(stats)

        def backend(gm, example_inputs):
            graphs.append(gm)
            return inner(gm, example_inputs)

        return backend

    monkeypatch.setattr(compiled, "_counting_backend", capturing)
    return graphs


def _step_powers(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The ``pow`` nodes of ``gm`` computing a power of the step count: a number (not a
    tensor) computed from a ``steps`` input, directly (``beta**t``) or through integer
    arithmetic (``beta**(t - 1)``, a restarted count)."""
    import operator

    from_steps: set[torch.fx.Node] = set()
    found = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if "steps" in n.name:
                from_steps.add(n)
            continue
        if n.op != "call_function" or isinstance(n.meta.get("example_value"), torch.Tensor):
            continue
        if any(a in from_steps for a in n.all_input_nodes):
            from_steps.add(n)
            if n.target in (operator.pow, pow):
                found.append(n)
    return found


#: recipes whose transforms read powers of the step count (bias corrections, FAdam's and
#: SMMF's step-dependent betas, MicroAdam's window weights, COSMOS's and NAMO-D's
#: normalisers) and compile, including inner chains counting other steps (SOAP's one step
#: behind, FRUGAL's restarted count) or in a subspace (GaLore, Subset-Norm, SN-SM)
STEP_POWER_RECIPES = ["adamw", "ademamix", "adan", "exadam", "ano", "adamp", "adabelief", "nadam",
                      "laprop", "adafactor", "fadam", "smmf", "microadam", "galore", "frugal",
                      "soap", "cosmos", "namo_d", "snsm", "subset_norm", "subspace_momentum"]
#: one recipe per way of handing powers over (the table, a prelude, an inner chain at another
#: count, a subspace's step list) runs by default; the rest with LLMVALLEY_SLOW=1 (each
#: compiles for seconds, MicroAdam for half a minute)
STEP_POWER_DEFAULT = ["adamw", "nadam", "adafactor", "fadam", "galore", "frugal", "soap"]


@pytest.mark.parametrize("name", [
    n if n in STEP_POWER_DEFAULT else pytest.param(n, marks=pytest.mark.skipif(
        not SLOW, reason="compiles for seconds: LLMVALLEY_SLOW=1"))
    for n in STEP_POWER_RECIPES])
def test_step_powers_are_not_computed_in_the_kernel(name, monkeypatch):
    """``beta**t`` of the symbolic step inside a compiled graph becomes a ``pow`` evaluated in
    the kernel's loop, per vector of elements (2.8x slower compiled Adam on CPU): the
    compiled tier passes the powers in as 0-d tensors, and the results stay the foreach
    tier's."""
    graphs = _graphs_handed_to_inductor(monkeypatch)
    hp = TEST_HPARAMS.get(name, {})
    expected, _ = run(name, "foreach", **hp)
    counters.clear()
    got, opt = run(name, "compiled", **hp)
    assert_same(name, got, expected)
    assert_no_graph_breaks(name)
    assert graphs and compile_stats(opt).graphs == len(graphs)
    for gm in graphs:
        assert not _step_powers(gm), gm.code


def test_a_write_segment_stores_no_replaced_gradients(monkeypatch):
    """AdaGC puts its clipped gradients in ``ctx.grads``; inside a compiled segment that
    list change made every clipped gradient a graph output (a store of each, every step,
    read by nobody). The write segment puts the list back, and its graph outputs none."""
    graphs = _graphs_handed_to_inductor(monkeypatch)

    def run_float32(implementation: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
        model = make_model()
        train(model, make_optimizer("adagc", model, implementation=implementation), 0, 4)
        return model, [p.detach().clone() for p in model.parameters()]

    model, got = run_float32("compiled")
    for g, e in zip(got, run_float32("foreach")[1]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim()}
    outputs = [tuple(n.meta["example_value"].shape) for gm in graphs for node in gm.graph.nodes
               if node.op == "output" for n in torch.utils._pytree.tree_leaves(node.args)
               if isinstance(n, torch.fx.Node)
               and isinstance(n.meta.get("example_value"), torch.Tensor)]
    assert graphs and () in outputs  # (the norms' 0-d sums are outputs)
    assert not shapes & set(outputs), outputs


def test_compiled_tier_resumes_from_a_state_dict():
    """A compiled optimizer loaded from a state dict runs its first step eagerly (recording
    the powers its chain reads), then compiled, and continues the foreach run."""
    ref_model = float64_model()
    ref = make_optimizer("adamw", ref_model, implementation="foreach", weight_decay=0.1)
    train(ref_model, ref, 0, 5)
    model = float64_model()
    opt = make_optimizer("adamw", model, implementation="compiled", weight_decay=0.1)
    train(model, opt, 0, 2)
    saved = (model.state_dict(), opt.state_dict())
    model2 = float64_model()
    opt2 = make_optimizer("adamw", model2, implementation="compiled", weight_decay=0.1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    train(model2, opt2, 2, 3)
    assert compile_stats(opt2).graphs > 0
    for g, e in zip(model2.parameters(), ref_model.parameters()):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_powers_read_the_table_then_compute():
    from llmvalley.optim.compiled import _power_table, _PowerRecorder
    from llmvalley.optim.transforms.base import StepContext, root, scalars

    grads = [torch.zeros(2), torch.zeros(3), torch.zeros(1)]
    ctx = StepContext(params=[], grads=grads, states=[{}, {}, {}], steps=[3, 3, 5], group={})
    assert ctx.powers(0.5) == [0.125, 0.125, 0.03125]
    recorder = ctx.power_table = _PowerRecorder()
    assert ctx.powers(0.5) == [0.125, 0.125, 0.03125] and recorder.bases == {0.5}
    assert ctx.subset([2]).power_table is recorder
    ctx.power_table = _power_table(frozenset({0.5}), ctx.steps, torch.device("cpu"))
    got = ctx.powers(0.5)
    assert got[0] is got[1] and got[0] is not got[2]
    assert [v.item() for v in got] == [0.125, 0.125, 0.03125]
    assert ctx.powers(0.25) == [0.25**3, 0.25**3, 0.25**5]  # not in the table: computed
    sub = ctx.subset([0, 1])
    one = sub.powers(0.5)
    assert isinstance(one[0], torch.Tensor) and scalars(one) is one[0]
    assert len(scalars([1 - p for p in one])) == 2  # new tensors: the list
    assert root(4.0) == 2.0 and root(torch.tensor(4.0)).item() == 2.0


def test_a_context_counting_other_steps_computes_its_own_powers():
    """Online Subspace Descent's projector steps at ``t - 1`` and Stable-SPAM restarts its
    counts: the table's powers are of the group's steps, so such contexts compute theirs."""
    import copy

    from llmvalley.optim.compiled import _power_table
    from llmvalley.optim.transforms.base import StepContext

    ctx = StepContext(params=[], grads=[torch.zeros(2)], states=[{}], steps=[4], group={})
    ctx.power_table = _power_table(frozenset({0.5}), ctx.steps, torch.device("cpu"))
    assert ctx.subset([0], steps=[3]).powers(0.5) == [0.125]
    inner = copy.copy(ctx)
    inner.steps = [2]
    assert inner.powers(0.5) == [0.25]
    assert ctx.subset([0]).powers(0.5)[0].item() == 0.0625
    assert ctx.powers(0.5)[0].item() == 0.0625


@pytest.mark.parametrize("name", ["nadam", "laprop", "schedulefree_adamw"])
def test_float_state_in_a_prelude_compiles(name):
    """NAdam's momentum product and LaProp's learning-rate average are Python floats: their
    preludes advance them eagerly, the rest of the chain is one compiled function, and an LR
    schedule does not recompile it."""
    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))

    results, graphs = [], []
    for impl in ("foreach", "compiled"):
        model = float64_model()
        opt = make_optimizer(name, model, implementation=impl, weight_decay=0.1)
        sched = schedule(opt)
        for step in range(6):
            train(model, opt, step, 1)
            sched.step()
            graphs.append(compile_stats(opt).graphs)
        results.append([p.detach() for p in model.parameters()])
    assert_same(name, results[1], results[0])
    layouts = compile_stats(opt).segments[name]
    assert all(kind == "compiled" for layout in layouts for kind, _ in layout), layouts
    assert graphs[-1] == graphs[-5] > 0, graphs  # compiled at the second step, then reused


def test_adabelief_branches_in_its_prelude():
    """AdaBelief's rectification picks a branch per tensor from its step (SGD with momentum
    until the SMA length reaches 5, step 6 here): the prelude decides it eagerly, the
    compiled step runs the branch, and the results across the switch are the foreach
    tier's."""
    out = []
    for impl in ("foreach", "compiled"):
        model = float64_model()
        opt = make_optimizer("adabelief", model, implementation=impl)
        train(model, opt, 0, 8)
        out.append([p.detach() for p in model.parameters()])
    assert_same("adabelief", out[1], out[0])
    layouts = compile_stats(opt).segments["adabelief"]
    assert all(kind == "compiled" for layout in layouts for kind, _ in layout), layouts


# ---- AdamP / SGDP: the projection's choice made on the device ---------------------------
@pytest.mark.parametrize("name, hp", [
    ("adamp", dict(lr=1e-2, weight_decay=0.1, delta=1.5, nesterov=True)),
    ("sgdp", dict(lr=1e-2, momentum=0.9, weight_decay=0.1, delta=1.5)),
])
def test_scale_invariant_projection_compiles_without_graph_breaks(name, hp):
    """The eager step branches on ``max |cos| < delta / sqrt(d)`` per tensor (a host sync:
    a graph break per matrix in a compiled step); the compiled step makes the same choice with
    ``torch.where`` and gives the foreach tier's results. delta=1.5 on these tensors mixes
    per-row, whole-tensor and no projection (tests/test_adaptive_variants.py), and the
    decoupled decay takes the ``wd_ratio`` of the tensors that project."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 6), (6,), (3, 4, 5), (1, 7), (16, 3)]
    drift = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[0.5 * d + torch.randn(s, generator=gen, dtype=torch.float64)
              for d, s in zip(drift, shapes)] for _ in range(8)]
    out = {}
    for impl in ("foreach", "compiled"):
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
        opt = llmvalley.create_optimizer(name, params, implementation=impl, **hp)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        out[impl] = [p.detach() for p in params]
        if impl == "compiled":
            # one graph (at most one recompile), not one per matrix (4 here) as with breaks
            assert compile_stats(opt).graphs <= 2
    plain = llmvalley.create_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], **hp)
    assert plain is not None
    for g, e in zip(out["compiled"], out["foreach"]):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=name)


#: one-tensor groups of these in the default run, of every recipe with LLMVALLEY_SLOW=1
ONE_TENSOR = ["adam", "adamw", "adamp"]


@pytest.mark.parametrize("name", ONE_TENSOR + ([n for n in ALL if n not in ONE_TENSOR]
                                               if SLOW else []))
def test_a_single_tensor_group_compiles_without_graph_breaks(name):
    """A group of one tensor gets one 0-d bias-correction number for Adam's ``eps`` term.
    Given to ``torch._foreach_add_``, dynamo read it as a Python number (``.item()`` on a
    value computed in the graph): a graph break inside the chain's loop, after which dynamo
    ran the whole segment eagerly and compiled each transform apart (four graphs, each
    storing its intermediates). It is added tensor by tensor instead. SMMF's square shape,
    computed from the traced gradient's size, hit the same (``math.isqrt`` of a symbolic
    size); it now comes from the static shape."""
    out = {}
    for impl in ("foreach", "compiled"):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.float64))
        opt = create(name, [param], implementation=impl, weight_decay=0.1)
        counters.clear()
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            param.grad = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            opt.step(loss=torch.tensor(1.0, dtype=torch.float64))
        out[impl] = param.detach()
    assert_no_graph_breaks(name)
    stats = compile_stats(opt)
    if stats.graphs == 0:  # 0-d float64 state: the group runs eagerly (see _compiled_...)
        assert all(kind == "eager" for layouts in stats.segments.values()
                   for layout in layouts for kind, _ in layout)
    elif name in ONE_TENSOR:  # one graph, and at most one recompilation
        assert stats.graphs <= 2 * stats.functions, (stats.graphs, stats.functions)
    torch.testing.assert_close(out["compiled"], out["foreach"], **tolerance(name))


def test_a_second_optimizer_compiles_for_its_own_shapes():
    """Each compiled segment has a code object of its own name in the process: dynamo's
    automatic dynamic shapes remember sizes per (file, line, name), and a second optimizer's
    segment named like the first (``_segment_step_smmf_1``) with other shapes compiled with
    symbolic sizes, recompiled, and broke SMMF's graph."""
    def run(shapes: list[tuple[int, int]]) -> tuple[int, int]:
        params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
        opt = llmvalley.create_optimizer("smmf", params, implementation="compiled",
                                         weight_decay=0.1)
        counters.clear()
        for _ in range(5):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return compile_stats(opt).graphs, sum(counters["graph_break"].values())

    torch.manual_seed(0)
    assert run([(32, 24), (24, 40)])[1] == 0
    graphs, breaks = run([(16, 8)])
    assert breaks == 0 and graphs <= 2, (graphs, breaks)


def _foreach_and_compiled(name: str, shapes: list[tuple[int, ...]], **hp):
    """Six steps of ``name`` (weight decay 0.1, ``hp``) on the foreach and compiled tiers with
    the same gradients: ``{tier: (parameters, states)}`` and the compiled optimizer (dynamo's
    counters cleared before its run)."""
    out = {}
    for impl in ("foreach", "compiled"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = llmvalley.create_optimizer(name, params, implementation=impl, weight_decay=0.1,
                                         **hp)
        counters.clear()
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out[impl] = [p.detach() for p in params], list(opt.state.values())
    return out, opt


@pytest.mark.parametrize("name,dtype", [("adamw", torch.bfloat16), ("lion", torch.bfloat16),
                                        ("adamw", torch.float16)])
def test_low_precision_state_compiles_as_one_graph(name, dtype):
    """``state_dtype`` slots are widened and stored inside the compiled graph; a bfloat16
    slot's stochastic-rounding draws are made before it from the foreach tier's seeds, so
    the stored bits match the foreach tier's wherever the float32 values agree. Drawn inside
    the graph, the seeded generator and the seed's string of the symbolic step broke it inside
    the chain's loop: 5-6 graphs and 11-12 breaks, each transform compiled apart. (A 96x64
    tensor takes the draws of large tensors, three to a word; the others one per element.)"""
    out, opt = _foreach_and_compiled(name, [(96, 64), (32,), (16, 48)], state_dtype=dtype)
    assert_no_graph_breaks(name)
    assert 0 < compile_stats(opt).graphs <= 2
    for got, expected in zip(out["compiled"][1], out["foreach"][1]):
        assert sorted(got) == sorted(expected)  # the draws are gone after the step
        for k, v in expected.items():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                assert got[k].dtype == dtype == v.dtype, k
                torch.testing.assert_close(got[k].float(), v.float(), rtol=2e-2, atol=1e-6)
                if dtype == torch.bfloat16:  # the same draws: nearly every element identical
                    assert (got[k] == v).float().mean() > 0.99, k
    for g, e in zip(out["compiled"][0], out["foreach"][0]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_bfloat16_state_of_the_compiled_tier_saves_and_resumes():
    """The draws made before a compiled step never reach a state dict, and a run resumed
    from one continues the uninterrupted run (its first step after loading runs eagerly, so
    a bf16 value may differ by one rounding)."""
    def run(steps, resume_at=None):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(96, 64), (32,)]]
        make = lambda: llmvalley.create_optimizer(  # noqa: E731
            "adamw", params, implementation="compiled", state_dtype=torch.bfloat16)
        opt = make()
        gen = torch.Generator().manual_seed(1)
        for step in range(steps):
            if step == resume_at:
                saved = opt.state_dict()
                assert all(not k.endswith(SR_SEED) for st in saved["state"].values()
                           for k in st), "rounding seeds leaked into the state dict"
                opt = make()
                opt.load_state_dict(saved)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params, opt

    (p1, o1), (p2, o2) = run(6), run(6, resume_at=3)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(o1.state.values(), o2.state.values()):
        assert sorted(a) == sorted(b)
        for k, v in a.items():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                assert b[k].dtype == v.dtype == torch.bfloat16
                torch.testing.assert_close(b[k].float(), v.float(), rtol=2e-2, atol=1e-6)


# ---- 8-/4-bit state in the compiled tier ------------------------------------------------
@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_quantized_state_is_decoded_outside_the_compiled_graphs(name):
    """Quantized slots are decoded before the compiled segment and encoded after it, by the
    codec's compiled kernels: one graph per group (traced inside, the codec's lookups broke
    the graphs and hit dynamo's recompile limit), the foreach tier's results, and the same
    codes. The tensors are large enough to be quantized (>= 4096 elements; odd sizes)."""
    out, opt = _foreach_and_compiled(name, [(64, 96), (4133,), (32, 32)])
    assert compile_stats(opt).graphs <= 2
    for g, e in zip(out["compiled"][0], out["foreach"][0]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    codes = 0
    for got, expected in zip(out["compiled"][1], out["foreach"][1]):
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            if isinstance(v, torch.Tensor) and v.dtype == torch.uint8:
                codes += 1
                assert (got[k] != v).float().mean() <= 1e-3, k
    assert codes == 4  # two moments of the two quantized tensors


def test_adafactor_compiled_preconditioner_matches_foreach():
    """The compiled step forms Adafactor's factored ``rsqrt`` from a per-row and a per-column
    one (stored, not recomputed per element), capped at ``1 / eps1``: the foreach tier's
    results, on a 3-D tensor (leading dimensions) and with a gradient row and column that are
    zero at the first steps (factors of 0, where the cap applies)."""
    out = {}
    for impl in ("foreach", "compiled"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64))
                  for s in [(3, 8, 6), (16, 12), (5,)]]
        opt = llmvalley.create_optimizer("adafactor", params, implementation=impl, lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for step in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                if step < 3 and p.ndim == 2:
                    p.grad[2] = 0.0
                    p.grad[:, 5] = 0.0
            opt.step()
        out[impl] = [p.detach() for p in params]
        assert all(torch.isfinite(p).all() for p in params)
    assert compile_stats(opt).graphs > 0
    for g, e in zip(out["compiled"], out["foreach"]):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["adafactor", "came"])
def test_factored_compiled_reductions_match_foreach(name):
    """In a compiled CPU step the factored statistics sum groups of rows before the columns,
    matrices' squares per row before the whole, and the clip factors are stored scalars
    (:func:`llmvalley.optim.transforms.factored.column_mean`, ``rms``,
    :func:`llmvalley.optim.transforms.stored.stored_scalars`):
    the foreach tier's results, on matrices whose row count takes the grouped path (32, 48
    with a leading dimension) and one that does not (20)."""
    out = {}
    for impl in ("foreach", "compiled"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64))
                  for s in [(32, 12), (2, 48, 5), (20, 7), (6,)]]
        opt = llmvalley.create_optimizer(name, params, implementation=impl, lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 3.0
            opt.step()
        out[impl] = [p.detach() for p in params]
    assert compile_stats(opt).graphs > 0
    for g, e in zip(out["compiled"], out["foreach"]):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_factored_reduction_helpers_compiled_equal_eager():
    """The helpers' compiled forms (grouped column sums, row-first squares, stored scalars)
    equal their eager ones to rounding, for shapes on and off the grouped path."""
    from llmvalley.optim.transforms.factored import column_mean, rms
    from llmvalley.optim.transforms.stored import stored_scalars

    def helpers(x):
        a, b = stored_scalars([rms(x), x.sum() * 2])
        return column_mean(x), a, b

    compiled = torch.compile(helpers, fullgraph=True, dynamic=False)
    for shape in [(64, 5), (3, 32, 4), (20, 3), (17,)]:
        if len(shape) == 1:
            x = torch.randn(shape, dtype=torch.float64)
            torch.testing.assert_close(torch.compile(rms, fullgraph=True)(x), rms(x))
            continue
        x = torch.randn(shape, dtype=torch.float64)
        for got, want in zip(compiled(x), helpers(x)):
            assert got.shape == want.shape, shape
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        assert torch.equal(helpers(x)[0], x.mean(dim=-2, keepdim=True))  # eager: unchanged


@pytest.mark.parametrize("n", [1, 5])
def test_stored_rows_compiled_keep_their_values(n):
    """:func:`llmvalley.optim.transforms.stored.stored_rows` (AdamP's per-row projection
    coefficients) returns its input's values in a compiled step, one row included (a 1 x 1
    product that inductor would turn into an inlined multiplication)."""
    from llmvalley.optim.transforms.stored import stored_rows

    def scale(x, c):
        return x * stored_rows(c.sqrt())[:, None]

    x, c = torch.randn(n, 7, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    got = torch.compile(scale, fullgraph=True, dynamic=False)(x, c)
    torch.testing.assert_close(got, x * c.sqrt()[:, None], rtol=1e-15, atol=0)


@pytest.mark.parametrize("name, implementation", [
    ("adamw", "fused"), ("adamw", "compiled"), ("nadam", "compiled"), ("prodigy", "compiled"),
])
def test_step_numbers_are_not_copied_from_host_memory(name, implementation, monkeypatch):
    """The fused kernel's step counts and the compiled tier's learning rate, step powers and
    prelude numbers are filled on the device (``torch.full``), not built with
    ``torch.tensor(value, device=...)``: on CUDA that copy from host memory blocks until the
    stream has run the work queued before the step (a host sync per number and step)."""
    model = float64_model()
    opt = make_optimizer(name, model, implementation=implementation)
    train(model, opt, 0, 3)  # the eager first step and the compiles
    if implementation == "compiled":
        assert compile_stats(opt).graphs > 0
    made = []
    real = torch.tensor

    def recording(*args, **kwargs):
        made.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", recording)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 3, 2)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert made == [], f"{name}: torch.tensor called in a step: {made[:3]}"
