"""A fair comparison: the AdamW baseline's settings, and matrix methods' AdamW part taking them.

Trials go through :class:`Building`, which builds each trial's real optimizer (on a tiny model,
with ``valley train``'s :func:`~llmvalley.bench.optimizers.build_optimizer`) before handing the
config to the synthetic training of ``tests/fake_runs.py``: a hyperparameter an optimizer does
not accept fails the trial as it would in a real run, and the parameter groups show what each
part of the optimizer really got, in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from llmvalley.bench.analysis import analyse, speedup_bound
from llmvalley.bench.compare import CompareSpec, Comparison, cell_workload, routing_summary
from llmvalley.bench.optimizers import build_optimizer
from llmvalley.bench.report import BOUND_NOTE, COLUMNS, speedup_text, write_report
from llmvalley.bench.sweep import Sweep, SweepSpec, merged_config
from llmvalley.cli import build_parser, main
from llmvalley.commands.compare_cmd import build_spec
from tests.fake_runs import SyntheticTraining
from tests.helpers import TinyLM
from tests.test_report import PageParser

CENTERS = {"adamw": 4e-3, "torch-adamw": 4e-3, "lion": 5e-4, "muon": 0.02, "adafactor": 1e-2}
SHAPES = {
    "lion": {"best_lr": 5e-4, "floor": 1.95, "power": 3.0},
    "muon": {"best_lr": 0.02, "floor": 1.90, "power": 3.0},
    "adafactor": {"best_lr": 1e-2, "floor": 1.97, "power": 2.5},
}
LLM_BETAS, LLM_EPS, LLM_WD = (0.9, 0.95), 1e-8, 0.1


@dataclass
class Building:
    """A trial function: build the trial's optimizer for real, then train synthetically."""

    fake: SyntheticTraining = field(default_factory=lambda: SyntheticTraining(shape=SHAPES))
    built: list[tuple[dict[str, Any], torch.optim.Optimizer]] = field(default_factory=list)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        optimizer = build_optimizer(
            config["optimizer"], TinyLM(), lr=config["lr"],
            weight_decay=config.get("weight_decay"), opt_args=config.get("opt_args") or {},
            fallback_args=config.get("fallback_args") or {})
        self.built.append((config, optimizer))
        return self.fake(config)

    def runs(self, optimizer: str) -> list[tuple[dict[str, Any], torch.optim.Optimizer]]:
        return [(c, o) for c, o in self.built if c["optimizer"] == optimizer]


def fallback_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """A matrix method's AdamW groups (embeddings, head, norms, biases)."""
    return [g for g in optimizer.param_groups if g["optimizer"] == "adamw"]


def decayed(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g for g in groups if any(p.dim() >= 2 for p in g["params"])]


def assert_adamw_settings(groups: list[dict[str, Any]], betas: tuple, eps: float,
                          wd: float) -> None:
    assert groups
    for g in groups:
        assert tuple(g["betas"]) == betas and g["eps"] == eps
    assert decayed(groups) and all(g["weight_decay"] == wd for g in decayed(groups))


def compare(tmp_path: Path, argv: list[str], trial: Building | None = None
            ) -> tuple[dict, Building]:
    """``valley compare ARGV`` (parsed as the CLI does) on the building fake; returns the
    ``compare.json`` it wrote."""
    trial = trial or Building()
    args = build_parser().parse_args(["compare", *argv, "--out", str(tmp_path / "results"),
                                      "--trials", "3", "--grid-points", "3", "--seeds", "1",
                                      "--steps", "50"])
    spec = build_spec(args)
    spec.lr_centers = {**CENTERS, **spec.lr_centers}
    Comparison(spec, trial).run()
    return json.loads((tmp_path / "results" / "compare.json").read_text()), trial


def sweep_json(tmp_path: Path, optimizer: str, model: str = "nano") -> dict:
    return json.loads((tmp_path / "results" / model / optimizer / "sweep.json").read_text())


def assert_no_trial_failed(tmp_path: Path, optimizers: list[str]) -> None:
    for optimizer in optimizers:
        sweep = sweep_json(tmp_path, optimizer)
        assert [t["status"] for t in sweep["trials"]] == ["completed"] * 3, (
            optimizer, [t["error"] for t in sweep["trials"]])


# ------------------------------------------------------------------ the AdamW baseline
def test_the_adamw_baseline_follows_llm_practice(tmp_path: Path) -> None:
    """betas (0.9, 0.95), eps 1e-8, weight decay 0.1 for AdamW (and drop-in AdamWs); the
    other methods keep their own settings; Muon's AdamW part gets the baseline's."""
    optimizers = ["adamw", "torch-adamw", "lion", "muon", "adafactor"]
    manifest, trial = compare(tmp_path, ["--optimizers", ",".join(optimizers),
                                         "--models", "nano"])
    assert manifest["errors"] == []
    assert_no_trial_failed(tmp_path, optimizers)
    for name in ("adamw", "torch-adamw"):
        assert len(trial.runs(name)) == 3 + 1
        for _, optimizer in trial.runs(name):
            assert_adamw_settings(optimizer.param_groups, LLM_BETAS, LLM_EPS, LLM_WD)
    adamw_best = sweep_json(tmp_path, "adamw")["best"]["lr"]
    for config, optimizer in trial.runs("muon"):
        groups = fallback_groups(optimizer)
        assert_adamw_settings(groups, LLM_BETAS, LLM_EPS, LLM_WD)
        assert all(g["lr"] == adamw_best for g in groups)
        assert "betas" not in config["opt_args"]
    for _, optimizer in trial.runs("lion"):  # Lion's own betas and weight decay
        assert all(tuple(g["betas"]) == (0.9, 0.99) and g["weight_decay"] == 0.0
                   for g in optimizer.param_groups)
    for _, optimizer in trial.runs("adafactor"):
        assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    cells = manifest["cells"]
    assert cells["nano/adamw"]["opt_args"] == {"betas": [0.9, 0.95], "eps": 1e-8}
    assert cells["nano/adamw"]["weight_decay"] == LLM_WD
    assert cells["nano/lion"]["opt_args"] == {} and cells["nano/lion"]["weight_decay"] is None
    report = (tmp_path / "results" / "report.md")
    write_report(tmp_path / "results")
    assert "**AdamW baseline (nano)**: betas=(0.9, 0.95), eps=1e-08, weight_decay=0.1" \
        in report.read_text()
    assert "weak baseline" not in report.read_text()


@pytest.mark.parametrize("preset", ["cpu-quick", "gpu-ladder"])
def test_presets_run_the_fair_baseline(preset: str, tmp_path: Path) -> None:
    spec = build_spec(build_parser().parse_args(["compare", "--preset", preset,
                                                 "--out", str(tmp_path)]))
    comparison = Comparison(spec)
    model = spec.models[0]
    adamw = comparison.sweep_spec(model, "adamw", None)
    config = merged_config(adamw.workload, adamw.fixed)
    assert config["opt_args"] == {"betas": LLM_BETAS, "eps": LLM_EPS}
    assert config["weight_decay"] == LLM_WD
    for other in ("lion", "adafactor", "muon"):
        own = comparison.sweep_spec(model, other, None)
        config = merged_config(own.workload, own.fixed)
        assert config["opt_args"] == {} and config.get("weight_decay") is None


def test_a_weak_baseline_is_named_in_the_report(tmp_path: Path) -> None:
    """A baseline run at AdamW's library defaults is flagged (benchmark-protocol.md)."""
    manifest, _ = compare(tmp_path, ["--optimizers", "adamw,lion", "--models", "nano",
                                     "--opt-arg", "betas=0.9,0.999", "--weight-decay", "0.01"])
    assert manifest["errors"] == []
    write_report(tmp_path / "results")
    text = (tmp_path / "results" / "report.md").read_text()
    assert "betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01 (library defaults: a weak " \
           "baseline" in text


# ------------------------------------------------------------------ 1. the fallback's source
@pytest.mark.parametrize("argv, betas, eps, wd", [
    (["--opt-arg", "betas=0.9,0.95", "--weight-decay", "0.1"], (0.9, 0.95), 1e-8, 0.1),
    (["--opt-arg", "betas=0.9,0.98", "--opt-arg", "eps=1e-9", "--weight-decay", "0.05"],
     (0.9, 0.98), 1e-9, 0.05),
])
def test_muon_fallback_takes_the_settings_the_baseline_ran_with(
        argv: list[str], betas: tuple, eps: float, wd: float, tmp_path: Path) -> None:
    manifest, trial = compare(tmp_path, ["--optimizers", "adamw,muon", "--models", "nano",
                                         *argv])
    assert manifest["errors"] == []
    assert_no_trial_failed(tmp_path, ["adamw", "muon"])
    for _, optimizer in trial.runs("adamw"):
        assert_adamw_settings(optimizer.param_groups, betas, eps, wd)
    adamw_best = sweep_json(tmp_path, "adamw")["best"]["lr"]
    assert len(trial.runs("muon")) == 3 + 1
    for _, optimizer in trial.runs("muon"):
        assert_adamw_settings(fallback_groups(optimizer), betas, eps, wd)
        assert all(g["lr"] == adamw_best for g in fallback_groups(optimizer))
        # the workload's weight decay applies to every method, Muon's own matrices included
        assert all(g["weight_decay"] == wd for g in optimizer.param_groups
                   if g["optimizer"] == "muon")
    recorded = manifest["cells"]["nano/muon"]["fallback_args"]
    assert recorded == {"betas": list(betas), "eps": eps, "weight_decay": wd, "lr": adamw_best}


# ------------------------------------------------------------------ 2. --fallback-arg wins
def test_sweep_trial_config_keeps_the_users_fallback_and_opt_args(tmp_path: Path) -> None:
    workload = {"model": "nano", "steps": 10, "fallback_args": {"lr": 1e-3, "eps": 1e-10},
                "opt_args": {"ns_steps": 3}}
    fixed = {"fallback_args": {"lr": 4e-3, "betas": (0.9, 0.95), "eps": 1e-8,
                               "weight_decay": 0.1},
             "opt_args": {"ns_steps": 5, "momentum": 0.9}, "weight_decay": 0.1}
    sweep = Sweep(SweepSpec("muon", workload, tmp_path / "s", fixed=fixed, grid_points=1,
                            trials=1, seeds=0), SyntheticTraining())
    config = sweep.trial_config({"lr": 0.02}, seed=0, out=tmp_path, name="t")
    assert config["fallback_args"] == {"lr": 1e-3, "eps": 1e-10, "betas": (0.9, 0.95),
                                       "weight_decay": 0.1}
    assert config["opt_args"] == {"ns_steps": 3, "momentum": 0.9}
    assert config["weight_decay"] == 0.1 and config["lr"] == 0.02
    # a workload value wins over a fixed one; a searched value wins over both
    assert merged_config({"weight_decay": 0.05}, fixed)["weight_decay"] == 0.05
    assert merged_config({"weight_decay": None}, fixed)["weight_decay"] == 0.1
    tuned = merged_config(workload, fixed, {"weight_decay": 0.2, "ns_steps": 4})
    assert tuned["weight_decay"] == 0.2 and tuned["opt_args"]["ns_steps"] == 4
    assert workload["fallback_args"] == {"lr": 1e-3, "eps": 1e-10}  # inputs left untouched
    assert fixed["opt_args"] == {"ns_steps": 5, "momentum": 0.9}


def test_compare_fallback_arg_overrides_only_its_keys(tmp_path: Path) -> None:
    manifest, trial = compare(tmp_path, ["--optimizers", "adamw,muon,lion", "--models", "nano",
                                         "--fallback-arg", "lr=5e-4",
                                         "--fallback-arg", "eps=1e-10"])
    assert manifest["errors"] == []
    for _, optimizer in trial.runs("muon"):
        groups = fallback_groups(optimizer)
        assert all(g["lr"] == 5e-4 for g in groups)
        assert_adamw_settings(groups, LLM_BETAS, 1e-10, LLM_WD)  # the rest: the baseline's
    assert all("fallback_args" not in c for c, _ in trial.runs("adamw") + trial.runs("lion"))
    fallback = manifest["cells"]["nano/muon"]["fallback_args"]
    assert fallback["lr"] == 5e-4 and fallback["eps"] == 1e-10 and fallback["betas"] == [0.9,
                                                                                       0.95]


# ------------------------------------------------------------------ 3. shared --opt-arg
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.97)])
def test_shared_adamw_opt_arg_goes_to_adamw_every_fallback_and_where_it_applies(
        betas: tuple, tmp_path: Path) -> None:
    optimizers = ["adamw", "muon", "lion", "adafactor"]
    manifest, trial = compare(tmp_path, ["--optimizers", ",".join(optimizers), "--models",
                                         "nano", "--opt-arg", f"betas={betas[0]},{betas[1]}"])
    assert manifest["errors"] == []
    assert_no_trial_failed(tmp_path, optimizers)  # no "unknown hyperparameter betas"
    for _, optimizer in trial.runs("adamw"):
        assert_adamw_settings(optimizer.param_groups, betas, LLM_EPS, LLM_WD)
    for config, optimizer in trial.runs("muon"):
        assert "betas" not in config["opt_args"]
        assert_adamw_settings(fallback_groups(optimizer), betas, LLM_EPS, LLM_WD)
    for _, optimizer in trial.runs("lion"):  # Lion has betas: the shared value applies
        assert all(tuple(g["betas"]) == betas for g in optimizer.param_groups)
    for config, _ in trial.runs("adafactor"):  # no betas, no AdamW part
        assert "betas" not in config["opt_args"]
    assert routing_summary(optimizers, {"opt_args": {"betas": betas}}) == [
        "--opt-arg betas: adamw, lion, muon's AdamW fallback (not adafactor: no such "
        "hyperparameter)"]


def test_method_specific_opt_arg_goes_only_where_it_applies(tmp_path: Path) -> None:
    manifest, trial = compare(tmp_path, ["--optimizers", "adamw,muon,lion", "--models", "nano",
                                         "--opt-arg", "ns_steps=3"])
    assert manifest["errors"] == []
    assert_no_trial_failed(tmp_path, ["adamw", "muon", "lion"])
    assert all(c["opt_args"]["ns_steps"] == 3 for c, _ in trial.runs("muon"))
    assert all(g["ns_steps"] == 3 for _, o in trial.runs("muon") for g in o.param_groups
               if g["optimizer"] == "muon")
    assert all("ns_steps" not in c["opt_args"] for c, _ in trial.runs("adamw")
               + trial.runs("lion"))
    assert all("ns_steps" not in c["fallback_args"] for c, _ in trial.runs("muon"))


def test_cell_workload_routes_the_shared_keys() -> None:
    spec = CompareSpec(optimizers=["adamw", "muon", "adafactor"], models=["nano"],
                       workload={"steps": 5, "opt_args": {"betas": (0.9, 0.95), "ns_steps": 3},
                                 "fallback_args": {"lr": 1e-3}}, out="unused")
    assert cell_workload(spec, "nano", "adamw")["opt_args"] == {"betas": (0.9, 0.95)}
    assert "fallback_args" not in cell_workload(spec, "nano", "adamw")
    muon = cell_workload(spec, "nano", "muon")
    assert muon["opt_args"] == {"ns_steps": 3} and muon["fallback_args"] == {"lr": 1e-3}
    assert cell_workload(spec, "nano", "adafactor")["opt_args"] == {}
    assert spec.workload["opt_args"] == {"betas": (0.9, 0.95), "ns_steps": 3}  # untouched


@pytest.mark.parametrize("argv, named", [
    (["--optimizers", "adamw,muon", "--opt-arg", "beta2=0.95"], "--opt-arg beta2"),
    (["--optimizers", "adamw,lion", "--opt-arg", "ns_steps=3"], "--opt-arg ns_steps"),
    (["--optimizers", "adamw,muon", "--tune", "beta2=0.9,0.95"], "--tune beta2"),
    (["--optimizers", "adamw,muon", "--fallback-arg", "momentum=0.9"],
     "--fallback-arg momentum"),
    (["--optimizers", "adamw,lion", "--fallback-arg", "lr=1e-3"], "--fallback-arg"),
])
def test_a_shared_key_nothing_accepts_is_a_one_line_error(
        argv: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", *argv, "--models", "nano", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"valley compare: error: {named}") and "\n" not in err
    assert not (tmp_path / "compare.json").exists()


def test_tuned_hyperparameters_go_to_the_methods_that_have_them(tmp_path: Path) -> None:
    """--tune eps: AdamW tunes it; Muon (no eps) searches its lr the same way (TPE) and its
    AdamW part takes the baseline's tuned eps."""
    manifest, trial = compare(tmp_path, ["--optimizers", "adamw,muon", "--models", "nano",
                                         "--tune", "eps=1e-10:1e-6:log"])
    assert manifest["errors"] == []
    assert_no_trial_failed(tmp_path, ["adamw", "muon"])
    adamw, muon = sweep_json(tmp_path, "adamw"), sweep_json(tmp_path, "muon")
    assert adamw["search"]["mode"] == muon["search"]["mode"] == "tpe"
    assert [t["name"] for t in adamw["search"]["tune"]] == ["eps"]
    assert muon["search"]["tune"] == [] and muon["trials_counted"] == 3
    assert all(1e-10 <= c["opt_args"]["eps"] <= 1e-6 for c, _ in trial.runs("adamw"))
    assert all("eps" not in c["opt_args"] for c, _ in trial.runs("muon"))
    best_eps = adamw["best"]["params"]["eps"]
    for _, optimizer in trial.runs("muon"):
        assert all(g["eps"] == best_eps for g in fallback_groups(optimizer))
    assert manifest["cells"]["nano/muon"]["tuned"] == ["lr"]
    assert manifest["cells"]["nano/adamw"]["tuned"] == ["lr", "eps"]


# ------------------------------------------------------------------ 4. valley train
MUON_FALLBACK = {"betas": (0.9, 0.95), "eps": 1e-10, "weight_decay": 0.0}


def test_fallback_arg_merges_with_the_documented_fallback_defaults() -> None:
    optimizer = build_optimizer("muon", TinyLM(), lr=0.02, weight_decay=None, opt_args={},
                                fallback_args={"lr": 1e-3})
    groups = fallback_groups(optimizer)
    assert groups and all(g["lr"] == 1e-3 for g in groups)
    for g in groups:
        assert tuple(g["betas"]) == MUON_FALLBACK["betas"] and g["eps"] == MUON_FALLBACK["eps"]
        assert g["weight_decay"] == 0.0
    own = build_optimizer("muon", TinyLM(), lr=0.02, weight_decay=None, opt_args={},
                          fallback_args={"lr": 1e-3, "betas": (0.8, 0.9)})
    assert all(tuple(g["betas"]) == (0.8, 0.9) and g["eps"] == 1e-10
               for g in fallback_groups(own))
    # without --fallback-arg: the spec's documented fallback, as create_optimizer gives it
    plain = build_optimizer("muon", TinyLM(), lr=0.02, weight_decay=None, opt_args={},
                            fallback_args={})
    assert all(g["lr"] == 3e-4 and g["eps"] == 1e-10 for g in fallback_groups(plain))


@pytest.mark.usefixtures("private_cache")
def test_valley_train_fallback_arg_keeps_the_other_documented_defaults(tmp_path: Path) -> None:
    from llmvalley.bench import Trainer, coerce_config
    from llmvalley.commands.train_cmd import merged_config as train_config
    from tests.helpers import write_corpus

    corpus = write_corpus(tmp_path / "corpus", ["def", "return", "x", "y", "1"], seed=0,
                          files=8, lines=40, words_per_line=8)
    args = build_parser().parse_args([
        "train", "--data", str(corpus), "--val-fraction", "0.25", "--d-model", "32",
        "--n-layers", "1", "--n-heads", "2", "--ffn-hidden", "64", "--seq-len", "32",
        "--batch-size", "4", "--eval-batches", "1", "--steps", "2", "--threads", "1",
        "--optimizer", "muon", "--fallback-arg", "lr=1e-3", "--out", str(tmp_path / "runs")])
    trainer = Trainer(coerce_config(train_config(args)))
    groups = fallback_groups(trainer.optimizer)
    assert groups and all(g["lr"] == 1e-3 for g in groups)
    assert all(tuple(g["betas"]) == (0.9, 0.95) and g["eps"] == 1e-10 for g in groups)
    assert all(g["weight_decay"] == 0.0 for g in groups)


# ------------------------------------------------------------------ bounds in the report
def test_speedup_bound_and_its_text() -> None:
    assert speedup_bound(False, False) is None
    assert speedup_bound(True, False) == "lower"
    assert speedup_bound(False, True) == "upper"
    assert speedup_bound(True, True) == "unknown"
    assert speedup_text(1.8, True, None) == "1.80x"
    assert speedup_text(1.8, True, "lower") == "≥1.80x"
    assert speedup_text(1.8, True, "upper") == "≤1.80x"
    assert speedup_text(1.8, True, "unknown") == "~1.80x"
    assert speedup_text(None, True, "lower") == "did not reach (edge)"
    assert speedup_text(None, True, "upper") == "did not reach"
    assert speedup_text(None, False, None) == "–"


def fake_results(tmp_path: Path, shapes: dict[str, dict[str, float]]) -> Path:
    """A three-trial comparison on the synthetic curves ``shapes``, reported."""
    fake = SyntheticTraining(shape=shapes)
    spec = CompareSpec(optimizers=["adamw", "lion", "muon"], models=["nano"],
                       workload={"steps": 50}, out=tmp_path, trials=3, grid_points=3, seeds=2,
                       lr_centers=CENTERS, command="valley compare")
    assert Comparison(spec, fake).run()["errors"] == []
    write_report(tmp_path)
    return tmp_path


def leaderboard(folder: Path) -> dict[str, dict[str, str]]:
    page = PageParser()
    page.feed((folder / "report.html").read_text(encoding="utf-8"))
    return {o: dict(zip(COLUMNS, cells)) for o, cells in page.tables["nano"].items()}


FAR = {"diverge_above": 1000.0, "curvature": 0.05}


def test_a_speedup_at_a_grid_edge_is_reported_as_a_bound(tmp_path: Path) -> None:
    # muon's optimum (0.06) lies above its grid 0.01-0.04: best at the top edge, still faster
    # than AdamW; lion's (5e-3) far above 2.5e-4-1e-3: at the edge and short of the target
    folder = fake_results(tmp_path, {
        "muon": {"best_lr": 0.06, "floor": 1.90, "power": 3.0, **FAR},
        "lion": {"best_lr": 5e-3, "floor": 1.95, "power": 3.0, **FAR}})
    results = analyse(folder)
    muon, lion = results.cell("nano", "muon"), results.cell("nano", "lion")
    assert muon.best_at_edge and lion.best_at_edge and muon.token_speedup > 1
    assert muon.speedup_bound == lion.speedup_bound == "lower"
    assert results.cell("nano", "adamw").speedup_bound is None
    rows = leaderboard(folder)
    assert rows["muon"]["tokens speedup"] == f"≥{muon.token_speedup:.2f}x"
    assert rows["muon"]["wall-clock speedup"] == f"≥{muon.wall_speedup:.2f}x"
    assert rows["muon"]["best lr"].endswith("(edge)")
    assert rows["lion"]["tokens speedup"] == "did not reach (edge)"
    assert rows["adamw"]["tokens speedup"] == "1.00x"
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert f"| ≥{muon.token_speedup:.2f}x | ≥{muon.wall_speedup:.2f}x |" in md
    assert BOUND_NOTE in md
    assert "≥, ≤, ~ on a speedup: a bound" in (folder / "report.html").read_text()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {c["optimizer"]: c["speedup_bound"] for c in metrics["nano"]} == {
        "adamw": None, "lion": "lower", "muon": "lower"}


def test_a_baseline_at_a_grid_edge_makes_every_speedup_an_upper_bound(tmp_path: Path) -> None:
    # AdamW's optimum (0.03) lies above its grid 2e-3-8e-3; muon's (0.06) above its grid too
    folder = fake_results(tmp_path, {
        "adamw": {"best_lr": 0.03, "floor": 2.0, "power": 2.0, **FAR},
        "lion": SHAPES["lion"],
        "muon": {"best_lr": 0.06, "floor": 1.90, "power": 3.0, **FAR}})
    results = analyse(folder)
    lion, muon = results.cell("nano", "lion"), results.cell("nano", "muon")
    assert results.cell("nano", "adamw").best_at_edge and not lion.best_at_edge
    rows = leaderboard(folder)
    assert lion.speedup_bound == "upper" and lion.token_speedup
    assert rows["lion"]["tokens speedup"] == f"≤{lion.token_speedup:.2f}x"
    assert muon.speedup_bound == "unknown"
    assert rows["muon"]["tokens speedup"] == f"~{muon.token_speedup:.2f}x"


def test_no_bound_marks_when_every_best_is_inside_its_grid(tmp_path: Path) -> None:
    folder = fake_results(tmp_path, SHAPES)
    rows = leaderboard(folder)
    for row in rows.values():
        assert not row["tokens speedup"].startswith(("≥", "≤", "~"))
        assert "(edge)" not in row["best lr"]
    assert BOUND_NOTE not in (folder / "report.md").read_text(encoding="utf-8")


def test_a_single_point_grid_is_at_its_edge(tmp_path: Path) -> None:
    sweep = Sweep(SweepSpec("adamw", {"model": "nano", "steps": 10}, tmp_path / "s",
                            lr_center=4e-3, grid_points=1, trials=1, seeds=0),
                  SyntheticTraining())
    assert sweep.run()["best_at_edge"]  # nothing brackets it: not a tuned value


@pytest.mark.parametrize("keep", [False, True])
def test_compare_passes_keep_checkpoints_to_every_cell(keep: bool, tmp_path: Path) -> None:
    argv = ["compare", "--preset", "cpu-quick", "--out", str(tmp_path)]
    spec = build_spec(build_parser().parse_args(argv + (["--keep-checkpoints"] if keep else [])))
    comparison = Comparison(spec)
    for name in spec.optimizers:
        assert comparison.sweep_spec(spec.models[0], name, None).keep_checkpoints is keep
