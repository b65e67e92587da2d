"""Routing a model's parameters to groups, and the ``valley list`` command."""

from __future__ import annotations

import re

import torch

import llmvalley
from llmvalley.cli import main
from llmvalley.optim.routing import route
from tests.helpers import make_model


def groups_by_name(opt):
    return {n: g for g in opt.param_groups for n in g["param_names"]}


def test_any_method_decays_matrices_only():
    opt = llmvalley.create_optimizer("adamw", make_model(), weight_decay=0.1)
    by_name = groups_by_name(opt)
    for n in ("embed_tokens.weight", "q_proj.weight", "up_proj.weight", "lm_head.weight"):
        assert by_name[n]["weight_decay"] == 0.1, n
    for n in ("norm.weight", "up_proj.bias", "gain"):
        assert by_name[n]["weight_decay"] == 0.0, n
    assert {g["optimizer"] for g in opt.param_groups} == {"adamw"}


def test_matrix_method_routes_embeddings_head_norms_biases_to_fallback():
    groups = route(
        make_model(), "muon", {"lr": 0.02}, applies_to="matrix", decay_keys=("weight_decay",),
        fallback="adamw", fallback_hparams={"lr": 3e-4},
    )
    by_name = {n: g for g in groups for n in g["param_names"]}
    for n in ("q_proj.weight", "up_proj.weight", "down_proj.weight"):
        assert by_name[n]["optimizer"] == "muon" and by_name[n]["lr"] == 0.02, n
    for n in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "up_proj.bias", "gain"):
        assert by_name[n]["optimizer"] == "adamw" and by_name[n]["lr"] == 3e-4, n


def test_tied_head_is_routed_once_as_embedding():
    model = make_model(tied=True)
    groups = route(model, "muon", {}, applies_to="matrix", decay_keys=("weight_decay",))
    names = [n for g in groups for n in g["param_names"]]
    assert "embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["embed_tokens.weight"]["optimizer"] == "adamw"


def test_user_rules_override_by_type_pattern_and_callable():
    model = make_model()
    opt = llmvalley.create_optimizer(
        "adamw", model, lr=1e-3, weight_decay=0.1,
        rules=[
            (torch.nn.Embedding, {"lr": 5e-3}),
            (r"^lm_head\.", "lion"),
            (lambda name, p, m: name == "gain", {"optimizer": "sgd", "momentum": 0.9}),
        ],
    )
    by_name = groups_by_name(opt)
    assert by_name["embed_tokens.weight"]["lr"] == 5e-3
    assert by_name["lm_head.weight"]["optimizer"] == "lion"
    assert by_name["lm_head.weight"]["betas"] == (0.9, 0.99)  # lion's defaults, not adamw's
    assert by_name["gain"]["optimizer"] == "sgd" and by_name["gain"]["momentum"] == 0.9
    assert by_name["q_proj.weight"]["lr"] == 1e-3


def test_no_decay_override_and_explicit_groups():
    opt = llmvalley.create_optimizer("adamw", make_model(), weight_decay=0.1,
                                     no_decay=[r"embed"])
    by_name = groups_by_name(opt)
    assert by_name["embed_tokens.weight"]["weight_decay"] == 0.0
    assert by_name["norm.weight"]["weight_decay"] == 0.1  # the user's rule replaces ours
    w = torch.nn.Parameter(torch.randn(2, 2))
    opt = llmvalley.create_optimizer("adamw", [{"params": [w], "weight_decay": 0.5}])
    assert opt.param_groups[0]["weight_decay"] == 0.5


def test_mixed_recipes_in_one_optimizer_step_and_resume():
    model = make_model()
    opt = llmvalley.create_optimizer("adamw", model, rules=[(r"lm_head", "lion")])
    model(torch.randint(0, 13, (2, 5))).sum().backward()
    opt.step()
    assert "exp_avg_sq" not in opt.state[model.lm_head.weight]
    assert "exp_avg_sq" in opt.state[model.q_proj.weight]
    fresh = llmvalley.create_optimizer("adamw", model, rules=[(r"lm_head", "lion")])
    fresh.load_state_dict(opt.state_dict())
    assert [g["optimizer"] for g in fresh.param_groups] == [
        g["optimizer"] for g in opt.param_groups]


def test_valley_list_prints_every_optimizer(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for spec in llmvalley.list_optimizers():
        assert re.search(rf"^{spec.name}\s+{spec.family}\s", out, re.M), spec.name
        assert spec.paper.arxiv in out


def test_valley_list_details_and_unknown_name(capsys):
    assert main(["list", "--details", "adan"]) == 0
    out = capsys.readouterr().out
    assert "sail-sg/Adan" in out and "proximal" in out and "betas=(0.98, 0.92, 0.99)" in out
    assert main(["list", "--details", "adamx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown optimizer 'adamx'" in err
