"""Finding the output head of a model whose head is not named like one."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import llmvalley
from llmvalley.models.presets import PRESETS, build_model, model_config
from llmvalley.optim.routing import head_candidates, names_head, route, vocab_sizes
from tests.helpers import DIM, VOCAB, make_model

MUON_ROUTE = dict(applies_to="matrix", decay_keys=("weight_decay",))


def sequential_lm(vocab: int = VOCAB, dim: int = DIM) -> nn.Sequential:
    """Embedding -> hidden Linear -> head Linear, none of them named."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.Linear(dim, vocab))


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {n: g for g in groups for n in g["param_names"]}


def route_quietly(model: nn.Module, **kwargs) -> list[dict]:
    """``route`` with every warning turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return route(model, "muon", {}, **{**MUON_ROUTE, **kwargs})


def test_unnamed_head_goes_to_the_fallback_with_one_warning():
    with pytest.warns(UserWarning) as record:
        groups = route(sequential_lm(), "muon", {}, **MUON_ROUTE)
    assert len(record) == 1
    message = str(record[0].message)
    assert "'2.weight'" in message and f"({VOCAB}, {DIM})" in message
    assert "vocabulary" in message and "rules=[" in message and "lm_head" in message
    routed = by_name(groups)
    assert routed["2.weight"]["optimizer"] == "adamw"
    assert routed["1.weight"]["optimizer"] == "muon"
    assert routed["0.weight"]["optimizer"] == "adamw"


def test_warning_points_at_the_callers_line():
    with pytest.warns(UserWarning) as record:
        llmvalley.create_optimizer("muon", sequential_lm())
    assert record[0].filename == __file__


def test_several_candidates_take_the_last_and_name_the_others():
    # vocabulary == width: the hidden Linear(d, d) also has a vocabulary-sized output
    model = sequential_lm(vocab=DIM)
    assert head_candidates(model) == ["1.weight", "2.weight"]
    with pytest.warns(UserWarning) as record:
        groups = route(model, "muon", {}, **MUON_ROUTE)
    assert len(record) == 1
    message = str(record[0].message)
    assert "'2.weight'" in message and "stay on 'muon': '1.weight'" in message
    routed = by_name(groups)
    assert routed["2.weight"]["optimizer"] == "adamw"
    assert routed["1.weight"]["optimizer"] == "muon"


@pytest.mark.parametrize("target,expected", [
    ("adamw", "adamw"),
    ({"optimizer": "muon"}, "muon"),
    ({"lr": 0.5}, "muon"),
])
def test_a_user_rule_overrides_and_silences(target, expected):
    groups = route_quietly(sequential_lm(), rules=[(r"^2\.weight$", target)])
    assert by_name(groups)["2.weight"]["optimizer"] == expected
    assert by_name(groups)["1.weight"]["optimizer"] == "muon"


def test_the_warning_suggests_rules_that_work():
    model = sequential_lm()
    with pytest.warns(UserWarning) as record:
        route(model, "muon", {}, fallback_hparams={"lr": 3e-4}, **MUON_ROUTE)
    suggested = re.findall(r"rules=(\[.*?\])(?: confirms| keeps)", str(record[0].message))
    assert len(suggested) == 2
    confirm, keep = (eval(s) for s in suggested)  # noqa: S307 - our own message
    groups = route_quietly(model, fallback_hparams={"lr": 3e-4}, rules=confirm)
    assert by_name(groups)["2.weight"] == {**by_name(groups)["2.weight"], "optimizer": "adamw",
                                           "lr": 3e-4}
    groups = route_quietly(model, rules=keep)
    assert by_name(groups)["2.weight"]["optimizer"] == "muon"


def test_unnamed_head_without_fallback_is_an_error_saying_why():
    model = nn.Sequential(nn.Linear(DIM, DIM, bias=False), nn.Linear(DIM, VOCAB, bias=False))
    model.embed = nn.Parameter(torch.randn(VOCAB, DIM))  # an embedding table by name
    with pytest.raises(ValueError, match=r"'1\.weight'.*output head"):
        route(model, "muon", {}, fallback=None, rules=[("^embed$", "adamw")], **MUON_ROUTE)


def test_any_method_ignores_the_head_and_does_not_warn():
    groups = route_quietly(sequential_lm(), applies_to="any")
    assert {g["optimizer"] for g in groups} == {"muon"}


def test_tinylm_routes_as_before_without_warning():
    groups = route_quietly(make_model(), fallback_hparams={"lr": 3e-4})
    routed = by_name(groups)
    for n in ("q_proj.weight", "up_proj.weight", "down_proj.weight"):
        assert routed[n]["optimizer"] == "muon", n
    for n in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "up_proj.bias", "gain"):
        assert routed[n]["optimizer"] == "adamw" and routed[n]["lr"] == 3e-4, n
    assert head_candidates(make_model()) == []


def test_tied_models_do_not_warn():
    route_quietly(make_model(tied=True))
    model = sequential_lm(vocab=DIM)  # the hidden matrix has a vocabulary-sized output
    model[2].weight = model[0].weight
    assert names_head(model) and head_candidates(model) == []
    groups = route_quietly(model)
    assert by_name(groups)["1.weight"]["optimizer"] == "muon"


@pytest.mark.parametrize("preset", ["nano", "micro", "gpt2-124m"])
def test_named_head_wins_over_shape_without_warning(preset):
    # micro: vocabulary 256 == d_model, so every attention matrix has a vocabulary-sized output
    model = build_model(model_config(preset), device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = route(model, "muon", {}, **MUON_ROUTE)
        llmvalley.create_optimizer("muon", build_model(model_config("nano")))
    routed = by_name(groups)
    assert routed["lm_head.weight"]["optimizer"] == "adamw"
    assert routed["layers.0.self_attn.q_proj.weight"]["optimizer"] == "muon"
    assert PRESETS[preset].vocab_size in vocab_sizes(model)


def test_position_embeddings_are_not_vocabularies():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, DIM)
            self.wpe = nn.Embedding(DIM, DIM)  # context length == width
            self.proj = nn.Linear(DIM, DIM)
            self.out = nn.Linear(DIM, VOCAB)

    model = Model()
    assert vocab_sizes(model) == {VOCAB}
    assert head_candidates(model) == ["out.weight"]


def test_models_without_embeddings_or_candidates_are_unchanged():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    assert by_name(route_quietly(mlp))["1.weight"]["optimizer"] == "muon"
    encoder = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM))
    assert by_name(route_quietly(encoder))["1.weight"]["optimizer"] == "muon"
