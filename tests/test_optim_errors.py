"""Bad input gets a clear error and loses nothing."""

from __future__ import annotations

import pytest
import torch

import llmvalley
from llmvalley.optim.shell import SCREEN_SUM_MIN, screen_finite


def param():
    return [torch.nn.Parameter(torch.randn(3, 2))]


@pytest.mark.parametrize("name,key,value", [
    ("adamw", "lr", -1.0),
    ("adamw", "lr", float("nan")),
    ("adamw", "lr", "fast"),
    ("adamw", "betas", (1.0, 0.999)),
    ("adamw", "betas", (0.9, -0.1)),
    ("adamw", "betas", 0.9),
    ("adamw", "betas", (0.9, 0.99, 0.9)),
    ("adamw", "eps", -1e-8),
    ("adamw", "weight_decay", -0.1),
    ("sgd", "momentum", -0.5),
    ("sgd", "nesterov", True),
    ("adan", "betas", (0.98, 0.92)),
    ("ademamix", "alpha_warmup", 0),
    ("adafactor", "d", 0.5),
    ("adafactor", "beta2_decay", 0.5),
    ("adafactor", "eps", 1e-3),
    ("came", "eps", (None, 1e-16)),
    ("mars", "betas_1d", (0.9,)),
    ("adamw", "nonfinite", "explode"),
])
def test_invalid_hyperparameter_names_it(name, key, value):
    with pytest.raises(ValueError, match=key):
        llmvalley.create_optimizer(name, param(), **{key: value})


def test_unknown_hyperparameter_lists_accepted_ones():
    with pytest.raises(ValueError, match="betaz.*accepted: .*betas"):
        llmvalley.create_optimizer("adamw", param(), betaz=(0.9, 0.99))


def test_invalid_group_hyperparameter_is_caught():
    with pytest.raises(ValueError, match="lr"):
        llmvalley.create_optimizer("adamw", [{"params": param(), "lr": -3.0}])


def test_unknown_optimizer_lists_registered():
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'.*adamw"):
        llmvalley.create_optimizer("adamx", param())


def test_nan_gradient_raises_naming_parameter_and_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = llmvalley.create_optimizer("adamw", model)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                    for p, s in opt.state.items()}
    model(torch.randn(5, 3)).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"1\.weight.*shape \(2, 4\)"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p, s in opt.state.items():
        for k, v in s.items():
            old = state_before[id(p)][k]
            assert torch.equal(v, old) if torch.is_tensor(v) else v == old


def test_inf_gradient_can_skip_the_step():
    w = torch.nn.Parameter(torch.ones(2, 2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = llmvalley.create_optimizer("adam", [w, b], nonfinite="skip")
    w.grad = torch.ones(2, 2)
    b.grad = torch.tensor([1.0, float("inf")])
    opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(w.detach(), torch.ones(2, 2)) and not opt.state
    b.grad = torch.ones(2)
    opt.step()
    assert opt.skipped_steps == 1 and opt.state[w]["step"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: summed in bf16
@pytest.mark.parametrize("shape", [(4, 4), (256, 256)])  # norm-screened / sum-screened
def test_huge_finite_gradients_are_not_mistaken_for_nonfinite(shape, dtype):
    # the screen (a 2-norm for small tensors, a sum for large ones) overflows to inf on these;
    # the element-wise check clears them
    w = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    opt = llmvalley.create_optimizer("sgd", [w], lr=2.0 ** -120)
    w.grad = torch.full(shape, 2.0 ** 120, dtype=dtype)
    assert not screen_finite([w.grad])
    opt.step()
    assert opt.skipped_steps == 0
    assert torch.equal(w.detach(), torch.full(shape, -1.0, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [7, SCREEN_SUM_MIN, 3 * SCREEN_SUM_MIN + 5])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_screen_finds_every_nonfinite_element(dtype, numel, bad):
    torch.manual_seed(0)
    grads = [torch.randn(numel).to(dtype), torch.randn(3).to(dtype)]
    assert screen_finite(grads)
    for where in (0, numel // 2, numel - 1):
        g = grads[0].clone()
        g[where] = bad
        assert not screen_finite([g, grads[1]])
        assert not screen_finite([grads[1], g])
    g = grads[0].clone()  # +inf and -inf together: their sum is NaN, still flagged
    g[0], g[-1] = float("inf"), -float("inf")
    assert not screen_finite([g])


@pytest.mark.parametrize("numel", [7, 3 * SCREEN_SUM_MIN])
def test_screen_reads_both_parts_of_complex_gradients(numel):
    g = torch.randn(numel, dtype=torch.complex64)
    assert screen_finite([g, torch.randn(5)])
    for bad in (complex(float("nan"), 0.0), complex(0.0, float("inf"))):
        h = g.clone()
        h[numel // 2] = bad
        assert not screen_finite([h, torch.randn(5)])


def test_screen_accumulates_half_precision_in_float32():
    # 2^16 fp16 gradients of 60000: the fp16 sum would overflow, the float32 one does not
    g = torch.full((1 << 16,), 60000.0, dtype=torch.float16)
    assert screen_finite([g])


def test_finite_grad_norm_replaces_the_screen(monkeypatch):
    import llmvalley.optim.shell as shell

    model = torch.nn.Linear(4, 3)
    opt = llmvalley.create_optimizer("adamw", model)
    model(torch.randn(2, 4)).sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def no_screen(grads):
        raise AssertionError("screened although the norm proved the gradients finite")

    monkeypatch.setattr(shell, "screen_finite", no_screen)
    opt.step(grad_norm=norm)
    assert opt.state[model.weight]["step"] == 1
    with pytest.raises(AssertionError, match="screened"):
        opt.step()  # without a norm the step screens as before


@pytest.mark.parametrize("norm", [float("nan"), float("inf"), torch.tensor(float("nan"))])
def test_nonfinite_grad_norm_falls_back_to_the_check(norm):
    w = torch.nn.Parameter(torch.ones(3))
    opt = llmvalley.create_optimizer("sgd", [w], lr=0.1)
    w.grad = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.raises(FloatingPointError, match=r"non-finite gradient"):
        opt.step(grad_norm=norm)
    assert torch.equal(w.detach(), torch.ones(3))
    w.grad = torch.ones(3)  # a stale non-finite norm: the screen clears the gradients
    opt.step(grad_norm=norm)
    assert torch.allclose(w.detach(), torch.full((3,), 0.9))


def test_nonfinite_policy_of_each_group_in_one_check():
    a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    opt = llmvalley.create_optimizer("sgd", [
        {"params": [a], "nonfinite": "ignore"},
        {"params": [b], "nonfinite": "raise"},
        {"params": [c], "nonfinite": "skip"},
    ], lr=0.1)
    for p in (a, b, c):
        p.grad = torch.ones(3)
    a.grad[0] = float("nan")  # ignored: its group does no check
    c.grad[1] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(b.detach(), torch.ones(3))
    b.grad[2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in .*shape \(3,\)"):
        opt.step()
    assert opt.skipped_steps == 1 and torch.equal(c.detach(), torch.ones(3))


def test_matrix_only_method_rejects_vectors_naming_them():
    matrix = [s.name for s in llmvalley.list_optimizers() if s.applies_to == "matrix"]
    if not matrix:
        pytest.skip("no matrix-only optimizer registered")
    vec = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match=r"shape \(5,\).*fallback|shape \(5,\).*adamw"):
        llmvalley.create_optimizer(matrix[0], [vec])
    with pytest.raises(ValueError, match="fallback"):
        llmvalley.create_optimizer(matrix[0], torch.nn.Linear(3, 3), fallback=None)


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = llmvalley.create_optimizer("adam", emb)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
