"""The hyperparameter checks shared by every optimizer (``llmvalley.optim.validation``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmvalley.optim.validation import NONFINITE_POLICIES, is_number, validate_common

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("name,key,value", [
    # numbers given as strings (torch would fail later, or never)
    ("adamw", "lr", "0.01"),
    ("adamw", "weight_decay", "0.1"),
    ("adamw", "eps", "1e-8"),
    ("adafactor", "eps", (None, "1e-3")),
    ("adamw", "betas", ("0.9", 0.99)),
    ("adamw", "betas", (0.9, "0.99")),
    ("sgd", "momentum", "0.9"),
    ("sgd", "dampening", "0.1"),
    ("ademamix", "alpha", "8"),
    ("ademamix", "alpha_warmup", "100"),
    ("adamw", "lr", b"0.01"),
    # bools are not numbers
    ("adamw", "lr", True),
    ("adamw", "weight_decay", False),
    ("adamw", "betas", (True, 0.99)),
    ("ademamix", "beta3_warmup", True),
    ("adamw", "lr", np.bool_(True)),
    ("adamw", "lr", torch.tensor(True)),
    # non-finite values
    ("adamw", "lr", INF),
    ("adamw", "lr", -INF),
    ("adamw", "lr", NAN),
    ("adamw", "lr", torch.tensor(INF)),
    ("adamw", "lr", torch.tensor(NAN)),
    ("adamw", "lr", 10 ** 400),
    ("adamw", "weight_decay", INF),
    ("adamw", "eps", INF),
    ("came", "eps", (1e-30, INF)),
    ("adamw", "betas", (0.9, NAN)),
    ("mars", "lr_1d", INF),
    ("mars", "gamma", NAN),
    ("came", "clip_threshold", INF),
    ("adafactor", "d", INF),
    ("ademamix", "alpha_warmup", INF),
    ("ademamix", "alpha_warmup", NAN),
    # tensors must hold one real element
    ("adamw", "lr", torch.tensor([0.1, 0.2])),
    ("adamw", "lr", torch.tensor(0.1 + 0j)),
    ("adamw", "lr", 1j),
    ("adamw", "lr", None),
    # momentum in [0, 1) and dampening in [0, 1] for every method that has them
    ("sgd", "momentum", 1.5),
    ("sgd", "momentum", 1.0),
    ("sgd", "momentum", -0.5),
    ("signum", "momentum", 1.5),
    ("sgd_sai", "momentum", 1.5),
    ("scale", "momentum", 1.0),
    ("sgd", "dampening", 1.5),
    ("sgd", "dampening", -0.1),
    # what was refused before still is
    ("adamw", "lr", -1.0),
    ("adamw", "lr", "fast"),
    ("adamw", "betas", (1.0, 0.999)),
    ("adamw", "betas", 0.9),
    ("adamw", "eps", -1e-8),
    ("nadam", "momentum_decay", -1.0),
    ("ademamix", "alpha_warmup", 0),
    ("ademamix", "alpha_warmup", 2.5),
    ("adamw", "nonfinite", "explode"),
])
def test_invalid_value_is_refused_naming_the_key(name, key, value):
    with pytest.raises(ValueError, match=rf"^{name}: invalid {key}="):
        validate_common(name, {key: value})


@pytest.mark.parametrize("group", [
    {"lr": torch.tensor(0.01)},
    {"lr": torch.tensor([0.01])},
    {"lr": torch.tensor(0.01, requires_grad=True)},
    {"lr": torch.tensor(3, dtype=torch.int64)},
    {"lr": 0},
    {"lr": 1},
    {"lr": np.float32(1e-3)},
    {"lr": np.int64(1)},
    {"weight_decay": torch.tensor(0.1)},
    {"eps": (None, 1e-3)},
    {"eps": [1e-30, 1e-16]},
    {"eps": 0.0},
    {"momentum": 0.0},
    {"momentum": 0.99},
    {"dampening": 0.0},
    {"dampening": 1.0},
    {"betas": (0.9, 0.999, 0.9999)},
    {"betas": [0.0, torch.tensor(0.95)]},
    {"alpha_warmup": None, "beta3_warmup": 10, "warmup": 5.0},
    {"mu2": 1.5},  # recipe-specific keys are left to the recipes
    {"nonfinite": "skip"},
    {},
])
def test_valid_values_pass(group):
    validate_common("opt", group)


def test_sgd_accepts_what_torch_sgd_accepts_in_range():
    w = torch.nn.Parameter(torch.zeros(2))
    for momentum, dampening in ((0.0, 0.0), (0.9, 0.0), (0.8, 0.3), (0.5, 1.0)):
        torch.optim.SGD([w], lr=0.1, momentum=momentum, dampening=dampening)
        validate_common("sgd", {"lr": 0.1, "momentum": momentum, "dampening": dampening})


def test_messages_say_what_is_wrong():
    def message(group):
        with pytest.raises(ValueError) as info:
            validate_common("sgd", group)
        return str(info.value)

    assert message({"lr": "0.01"}) == ("sgd: invalid lr='0.01': must be a finite number >= 0, "
                                       "not a string")
    assert "not a bool" in message({"lr": True})
    assert "not a tensor of 2 elements" in message({"lr": torch.ones(2)})
    assert message({"momentum": 1.5}) == ("sgd: invalid momentum=1.5: "
                                          "must be a finite number in [0, 1)")
    betas = message({"betas": ("0.9", 0.99)})
    assert betas.startswith("sgd: invalid betas=('0.9', 0.99): ") and "'0.9' is a string" in betas
    assert str(NONFINITE_POLICIES) in message({"nonfinite": "explode"})


@pytest.mark.parametrize("value,expected", [
    (1, True), (0.5, True), (np.float64(0.5), True), (torch.tensor(0.5), True),
    (torch.tensor([0.5]), True), (float("inf"), True),
    (True, False), ("0.5", False), (None, False), (1j, False), (torch.ones(2), False),
    (torch.tensor(True), False), ((0.5,), False),
])
def test_is_number(value, expected):
    assert is_number(value) is expected
