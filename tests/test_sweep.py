"""Sweeps: budget, grid extension, divergence, resume after a kill, seeds, TPE, CLI errors."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from llmvalley.bench.sweep import Sweep, SweepSpec, TuneSpec, next_exponent
from llmvalley.cli import UsageError, main
from tests.fake_runs import SyntheticTraining

WORKLOAD = {"model": "nano", "steps": 100}


def make_sweep(tmp_path: Path, fake: SyntheticTraining, **kwargs) -> Sweep:
    options = {"optimizer": "adamw", "workload": WORKLOAD, "out": tmp_path / "sweep",
               "lr_center": 4e-3, "grid_points": 4, "trials": 6, "seeds": 0, **kwargs}
    return Sweep(SweepSpec(**options), fake)


def lrs(sweep: Sweep) -> list[float]:
    return [t["lr"] for t in sweep.write()["trials"]]


def exponents(sweep: Sweep) -> list[int]:
    return [t["k"] for t in sweep.write()["trials"]]


def test_initial_grid_is_factor_two_around_the_center(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, SyntheticTraining(), trials=4)
    sweep.run()
    assert lrs(sweep) == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3])


def test_grid_extends_upwards_when_the_best_is_at_the_top_edge(tmp_path: Path) -> None:
    fake = SyntheticTraining(default={"best_lr": 0.1, "floor": 2.0, "curvature": 0.05,
                                      "power": 2.0, "diverge_above": 100.0})
    sweep = make_sweep(tmp_path, fake, trials=7)
    result = sweep.run()
    assert exponents(sweep) == [-2, -1, 0, 1, 2, 3, 4]
    assert result["best"]["k"] == 4 and result["best_at_edge"]  # still at the edge: flagged


def test_grid_extends_downwards_when_the_best_is_at_the_bottom_edge(tmp_path: Path) -> None:
    fake = SyntheticTraining(default={"best_lr": 2.5e-4, "floor": 2.0, "curvature": 0.05,
                                      "power": 2.0, "diverge_above": 100.0})
    sweep = make_sweep(tmp_path, fake, trials=7)
    result = sweep.run()
    assert exponents(sweep) == [-2, -1, 0, 1, -3, -4, -5]
    assert result["best"]["lr"] == pytest.approx(2.5e-4)
    assert not result["best_at_edge"]  # -5 is worse than -4: the optimum is bracketed


def test_interior_best_spends_the_budget_on_the_lower_loss_side(tmp_path: Path) -> None:
    # optimum near 4e-3: the top edge (8e-3) beats the bottom one (1e-3), so the grid grows
    # upwards; then 1.6e-2 is worse than 1e-3, so it grows downwards
    fake = SyntheticTraining(default={"best_lr": 3.5e-3, "floor": 2.0, "curvature": 0.05,
                                      "power": 2.0, "diverge_above": 100.0})
    sweep = make_sweep(tmp_path, fake, trials=6)
    result = sweep.run()
    assert exponents(sweep) == [-2, -1, 0, 1, 2, -3]
    assert result["trials_counted"] == 6 and len(fake.calls) == 6
    assert result["best"]["lr"] == pytest.approx(4e-3)


def test_next_exponent_waits_for_a_round_to_finish() -> None:
    from llmvalley.bench.sweep import TrialRecord

    spec = SweepSpec("adamw", WORKLOAD, "unused", lr_center=1e-3, grid_points=2, trials=4)
    running = TrialRecord(0, "RUNNING", None, 5e-4, -1, {}, {})
    done = TrialRecord(1, "COMPLETE", "completed", 1e-3, 0, {}, {"final_val_loss": 2.0})
    assert next_exponent(spec, [running, done]) is None
    finished = TrialRecord(0, "COMPLETE", "completed", 5e-4, -1, {}, {"final_val_loss": 2.5})
    assert next_exponent(spec, [finished, done]) == 1  # best at the top edge: go up


def test_diverged_trials_are_recorded_and_count_against_the_budget(tmp_path: Path) -> None:
    # diverges above 2 x 4e-3: 8e-3 and every extension beyond it diverge
    fake = SyntheticTraining(default={"best_lr": 4e-3, "floor": 2.0, "curvature": 0.05,
                                      "power": 2.0, "diverge_above": 1.5})
    sweep = make_sweep(tmp_path, fake, trials=6)
    result = sweep.run()
    diverged = [t for t in result["trials"] if t["status"] == "diverged"]
    assert [t["lr"] for t in diverged] == pytest.approx([8e-3])
    assert diverged[0]["final_val_loss"] is None and diverged[0]["diverged"]
    assert result["trials_counted"] == 6 == len(fake.calls)
    assert math.isinf(sweep.study.trials[3].value)  # Optuna sees a diverged trial as +inf


def test_failing_trials_are_recorded_as_errors_and_count(tmp_path: Path) -> None:
    def broken(config: dict) -> dict:
        raise ValueError("bad hyperparameter")

    sweep = Sweep(SweepSpec("adamw", WORKLOAD, tmp_path / "s", grid_points=2, trials=3,
                            seeds=2), broken)
    result = sweep.run()
    assert result["trials_counted"] == 3
    assert {t["status"] for t in result["trials"]} == {"error"}
    assert result["trials"][0]["error"] == "ValueError: bad hyperparameter"
    assert result["best"] is None and result["seeds"] == []


class Killed(KeyboardInterrupt):
    """Stands for the process being killed in the middle of a trial."""


def test_resume_after_kill_reruns_only_the_interrupted_trial(tmp_path: Path) -> None:
    fake = SyntheticTraining()
    calls = {"n": 0}

    def dies_on_third_trial(config: dict) -> dict:
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return fake(config)

    options = {"trials": 5}  # the default heartbeat grace (90 s): not waited for
    with pytest.raises(Killed):
        sweep = make_sweep(tmp_path, fake, **options)
        sweep.trial_fn = dies_on_third_trial
        sweep.run()
    assert [r.state for r in sweep.records()] == ["COMPLETE", "COMPLETE", "RUNNING"]

    # the killed trial's owner (this process's first sweep) has ended: failed at once
    started = time.time()
    restarted = make_sweep(tmp_path, fake, **options)
    before = len(fake.calls)
    result = restarted.run()
    assert time.time() - started < 30
    assert len(fake.calls) - before == 3  # the interrupted point and two more, nothing repeated
    assert result["trials_counted"] == 5 and result["interrupted"] == 1
    assert exponents(restarted) == [-2, -1, 0, 1, 2]  # the interrupted point first


def test_a_stale_heartbeat_fails_a_trial_owned_elsewhere(tmp_path: Path) -> None:
    """A trial of another machine (its owner cannot be checked here) is failed once its
    heartbeat is older than the grace period, and its point runs again."""
    from llmvalley.bench.study_lock import OWNER_ATTR

    fake = SyntheticTraining()
    options = {"heartbeat_s": 1, "grace_s": 1, "trials": 4, "poll_s": 0.2}
    sweep = make_sweep(tmp_path, fake, **options)
    with sweep.lock.hold():
        trial = sweep._ask(sweep.records())[0]
    trial.set_user_attr(OWNER_ATTR, {"machine": "elsewhere/boot", "pid": 1, "run": "x"})
    assert [r.state for r in sweep.records()] == ["RUNNING"]
    result = make_sweep(tmp_path, fake, **options).run()  # waits for the heartbeat to go stale
    assert result["trials_counted"] == 4 and result["interrupted"] == 1
    assert sorted(exponents(sweep)) == [-2, -1, 0, 1] and len(fake.calls) == 4


def test_best_configuration_is_rerun_with_fresh_seeds_once(tmp_path: Path) -> None:
    fake = SyntheticTraining()
    sweep = make_sweep(tmp_path, fake, trials=4, seeds=3)
    result = sweep.run()
    seeds = result["seeds"]
    assert [s["seed"] for s in seeds] == [1, 2, 3]
    assert all(c["lr"] == pytest.approx(4e-3) for c in fake.calls[4:])
    assert [s["final_val_loss"] for s in seeds] == pytest.approx([2.002, 2.004, 2.006])
    calls = len(fake.calls)
    make_sweep(tmp_path, fake, trials=4, seeds=3).run()  # everything is done: nothing re-runs
    assert len(fake.calls) == calls


def test_tpe_tunes_several_hyperparameters_with_the_same_budget(tmp_path: Path) -> None:
    fake = SyntheticTraining()
    tune = (TuneSpec.parse("weight_decay=0:0.2"), TuneSpec.parse("beta2=0.95,0.99"))
    sweep = make_sweep(tmp_path, fake, trials=6, tune=tune)
    result = sweep.run()
    assert result["search"]["mode"] == "tpe" and result["trials_counted"] == 6
    for config in fake.calls:
        assert 1e-3 <= config["lr"] <= 8e-3
        assert 0 <= config["weight_decay"] <= 0.2
        assert config["opt_args"]["beta2"] in (0.95, 0.99)


@pytest.mark.parametrize("text", ["lr=1:2", "wd", "wd=2:1", "wd=0:1:log", "wd=a:b"])
def test_bad_tune_specs_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        TuneSpec.parse(text)


@pytest.mark.parametrize("argv", [
    ["sweep", "--optimizer", "no-such-optimizer"],
    ["sweep", "--optimizer", "adamw", "--trials", "zero"],
    ["sweep", "--optimizer", "adamw", "--trials", "2", "--grid-points", "4"],
    ["sweep", "--optimizer", "adamw", "--factor", "1"],
    ["sweep", "--optimizer", "adamw", "--steps", "-5"],
    ["sweep", "--optimizer", "adamw", "--storage", "postgresql://valley@127.0.0.1:1/none"],
])
def test_sweep_cli_user_errors_are_one_line(argv: list[str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    assert main([*argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("valley sweep: error:") and "\n" not in err


def test_seed_runs_are_redone_when_a_larger_budget_changes_the_best(tmp_path: Path) -> None:
    fake = SyntheticTraining(default={"best_lr": 2.5e-4, "floor": 2.0, "curvature": 0.05,
                                      "power": 2.0, "diverge_above": 100.0})
    first = make_sweep(tmp_path, fake, trials=4, seeds=2).run()
    assert first["best"]["lr"] == pytest.approx(1e-3)
    assert [c["lr"] for c in fake.calls[4:]] == pytest.approx([1e-3, 1e-3])
    second = make_sweep(tmp_path, fake, trials=6, seeds=2).run()  # resumed, bigger budget
    assert second["best"]["lr"] == pytest.approx(2.5e-4)
    assert len(fake.calls) == 4 + 2 + 2 + 2  # two more trials, both seeds again
    assert [c["lr"] for c in fake.calls[-2:]] == pytest.approx([2.5e-4, 2.5e-4])
    assert len(second["seeds"]) == 2
