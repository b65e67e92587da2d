"""Coordinate-descent tuning: the axes from the registry, the search, its budget and resume."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from llmvalley.bench.compare import BASELINE_OPT_ARGS, CompareSpec, Comparison
from llmvalley.bench.coordinate import OVERRIDES, coordinate_axes, next_point, point_key
from llmvalley.bench.sweep import Sweep, SweepSpec
from llmvalley.cli import main
from tests.fake_runs import SyntheticTraining

WORKLOAD = {"model": "nano", "steps": 100}
BASELINE = {"opt_args": dict(BASELINE_OPT_ARGS), "weight_decay": 0.1}


def axes_of(optimizer: str, workload: dict = WORKLOAD, fixed: dict | None = None) -> dict:
    return {a.name: a for a in coordinate_axes(optimizer, workload, fixed)}


def test_axes_come_from_the_registry_defaults_and_the_workload() -> None:
    adamw = axes_of("adamw", fixed=BASELINE)
    assert list(adamw) == ["beta2", "weight_decay", "warmup_steps"]
    assert adamw["beta2"].start == 0.95 and 0.999 in adamw["beta2"].values
    assert adamw["weight_decay"].start == 0.1 and 0.0 in adamw["weight_decay"].values
    assert adamw["warmup_steps"].start == 10  # 10% of 100 steps, as valley train plans it
    assert adamw["warmup_steps"].values == (5, 10, 20)
    muon = axes_of("muon")  # momentum, no betas
    assert list(muon) == ["momentum", "weight_decay", "warmup_steps"]
    assert muon["momentum"].start == 0.95
    assert list(axes_of("adafactor")) == ["weight_decay", "warmup_steps"]  # neither
    assert axes_of("adamw", {**WORKLOAD, "warmup_steps": 4})["warmup_steps"].values == (2, 4, 8)


def test_the_override_table_replaces_derived_values() -> None:
    assert axes_of("lion")["beta2"].values == OVERRIDES["lion"]["beta2"]
    assert 0.0 in axes_of("sgd")["momentum"].values and axes_of("sgd")["momentum"].start == 0


def test_next_point_moves_down_when_every_learning_rate_diverged() -> None:
    axes = coordinate_axes("adafactor", {**WORKLOAD, "warmup_steps": 0})
    assert [a.name for a in axes] == ["weight_decay"]
    start = {"lr": 0.0, "weight_decay": 0.0}
    finished = {point_key({**start, "lr": k}): math.inf for k in (-1.0, 0.0, 1.0)}
    plan = next_point(axes, [-1, 0, 1], finished, set())
    # the weight-decay pass runs at the lowest learning rate tried
    assert plan.axis == "weight_decay" and all(p["lr"] == -1.0 for p in plan.points)


def make(tmp_path: Path, fake: SyntheticTraining, trials: int, name: str = "s") -> Sweep:
    spec = SweepSpec("adamw", WORKLOAD, tmp_path / name, lr_center=2e-3, grid_points=3,
                     trials=trials, seeds=0, search="coordinate", fixed=BASELINE,
                     heartbeat_s=1, grace_s=1)
    return Sweep(spec, fake)


def shaped() -> SyntheticTraining:
    return SyntheticTraining(optima={"adamw": {"beta2": (0.99, 50.0),
                                               "weight_decay": (0.0, 2.0),
                                               "warmup_steps": (20, 1e-4)}})


def test_coordinate_descent_finds_each_axis_optimum_within_the_budget(tmp_path: Path) -> None:
    fake = shaped()
    result = make(tmp_path, fake, trials=16).run()
    assert result["search"]["mode"] == "coordinate" and result["trials_counted"] == 16
    assert len(fake.calls) == 16
    best = result["best"]["params"]
    assert best["lr"] == pytest.approx(4e-3)  # the first grid had it at its top edge
    assert best["betas"] == [0.9, 0.99] and best["weight_decay"] == 0.0
    assert best["warmup_steps"] == 20
    assert not result["best_at_edge"]  # 8e-3 was tried at the best settings
    # every trial's config really carries its point
    for config in fake.calls:
        assert config["opt_args"]["betas"][0] == 0.9 and config["warmup_steps"] in (5, 10, 20)
    points = [point_key(t["point"]) for t in result["trials"]]
    assert len(set(points)) == len(points)  # no point is evaluated twice


class Killed(KeyboardInterrupt):
    """Stands for the process being killed in the middle of a trial."""


def test_a_killed_coordinate_sweep_resumes_without_redoing_finished_trials(
        tmp_path: Path) -> None:
    reference = make(tmp_path, shaped(), trials=10, name="ref").run()
    fake = shaped()
    calls = {"n": 0}

    def dies_on_fifth(config: dict) -> dict:
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        return fake(config)

    sweep = make(tmp_path, fake, trials=10)
    sweep.trial_fn = dies_on_fifth
    with pytest.raises(Killed):
        sweep.run()
    assert len(fake.calls) == 4
    time.sleep(1.2)  # the killed trial's heartbeat goes stale
    result = make(tmp_path, fake, trials=10).run()
    assert len(fake.calls) == 10 and result["trials_counted"] == 10
    assert result["interrupted"] == 1
    assert {point_key(t["point"]) for t in result["trials"]} == \
        {point_key(t["point"]) for t in reference["trials"]}
    assert result["best"]["params"] == reference["best"]["params"]


def test_a_coordinate_compare_gives_every_method_the_same_budget(tmp_path: Path) -> None:
    fake = SyntheticTraining(shape={"muon": {"best_lr": 0.02, "floor": 1.9, "power": 3.0},
                                    "lion": {"best_lr": 5e-4, "floor": 1.95}},
                             optima={"muon": {"momentum": (0.9, 20.0)}})
    spec = CompareSpec(optimizers=["adamw", "lion", "muon"], models=["nano"],
                       workload={"steps": 50, "batch_size": 8}, out=tmp_path, trials=9,
                       grid_points=3, seeds=1, search="coordinate",
                       lr_centers={"adamw": 4e-3, "lion": 5e-4, "muon": 0.02})
    manifest = Comparison(spec, fake).run()
    assert manifest["errors"] == []
    for optimizer in ("adamw", "lion", "muon"):
        sweep = json.loads((tmp_path / "nano" / optimizer / "sweep.json").read_text())
        assert sweep["trials_counted"] == 9 and sweep["search"]["mode"] == "coordinate"
        assert len([c for c in fake.calls if c["optimizer"] == optimizer]) == 9 + 1
    assert manifest["cells"]["nano/muon"]["tuned"] == ["lr", "momentum", "weight_decay",
                                                       "warmup_steps"]
    muon = json.loads((tmp_path / "nano" / "muon" / "sweep.json").read_text())
    assert muon["best"]["params"]["momentum"] == 0.9  # found, though it starts at 0.95
    momenta = {c["opt_args"].get("momentum") for c in fake.calls if c["optimizer"] == "muon"}
    assert {0.9, 0.95, 0.98} <= momenta


@pytest.mark.parametrize("argv", [
    ["sweep", "--optimizer", "adamw", "--search", "coordinate", "--tune", "weight_decay=0:1"],
    ["sweep", "--optimizer", "adamw", "--search", "nope"],
    ["compare", "--optimizers", "adamw", "--models", "nano", "--search", "random"],
    ["compare", "--optimizers", "adamw", "--models", "nano", "--search", "grid", "--tune",
     "weight_decay=0:1"],
])
def test_bad_search_options_are_one_line_exit_2(argv: list[str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"valley {argv[0]}: error:") and ("--search" in err or "--tune" in err)
    assert "\n" not in err
