"""Comparisons: equal budgets, the matrix fallback, presets and registry checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmvalley.bench.compare import CompareSpec, Comparison, model_parameters, scale_workload
from llmvalley.cli import UsageError, build_parser, main
from llmvalley.commands.compare_cmd import build_spec
from tests.fake_runs import SyntheticTraining

SHAPES = {
    "lion": {"best_lr": 5e-4, "floor": 1.95, "power": 3.0},
    "muon": {"best_lr": 0.02, "floor": 1.90, "power": 3.0},
}
CENTERS = {"adamw": 4e-3, "lion": 5e-4, "muon": 0.02}


def run_fake_comparison(out: Path, models: list[str], trials: int = 4, seeds: int = 2
                        ) -> tuple[dict, SyntheticTraining]:
    fake = SyntheticTraining(shape=SHAPES)
    spec = CompareSpec(optimizers=["adamw", "lion", "muon"], models=models,
                       workload={"steps": 50, "batch_size": 8}, out=out, trials=trials,
                       grid_points=3, seeds=seeds, lr_centers=CENTERS, command="valley compare")
    return Comparison(spec, fake).run(), fake


def test_every_optimizer_gets_the_same_budget_and_workload(tmp_path: Path) -> None:
    manifest, fake = run_fake_comparison(tmp_path, ["nano"], trials=5, seeds=2)
    assert manifest["errors"] == [] and len(fake.calls) == 3 * (5 + 2)
    for optimizer in ("adamw", "lion", "muon"):
        sweep = json.loads((tmp_path / "nano" / optimizer / "sweep.json").read_text())
        assert sweep["trials_counted"] == 5 and len(sweep["trials"]) == 5
        assert [s["seed"] for s in sweep["seeds"]] == [1, 2]
    shared = {(c["model"], c["steps"], c["batch_size"]) for c in fake.calls}
    assert shared == {("nano", 50, 8)}
    assert json.loads((tmp_path / "compare.json").read_text())["wall_s"] is not None


def test_matrix_methods_use_the_tuned_adamw_settings_for_the_rest(tmp_path: Path) -> None:
    _, fake = run_fake_comparison(tmp_path, ["nano"])
    adamw = json.loads((tmp_path / "nano" / "adamw" / "sweep.json").read_text())
    muon_calls = [c for c in fake.calls if c["optimizer"] == "muon"]
    assert len(muon_calls) == 4 + 2
    assert all(c["fallback_args"]["lr"] == adamw["best"]["lr"] for c in muon_calls)
    # the baseline's LLM settings (benchmark-protocol.md), not AdamW's library defaults
    assert muon_calls[0]["fallback_args"]["weight_decay"] == 0.1
    assert muon_calls[0]["fallback_args"]["betas"] == (0.9, 0.95)
    assert muon_calls[0]["fallback_args"]["eps"] == 1e-8
    assert all("fallback_args" not in c for c in fake.calls if c["optimizer"] != "muon")


def parse(argv: list[str]):
    return build_parser().parse_args(["compare", *argv])


def test_preset_skips_unregistered_optimizers_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llmvalley.bench.compare.registered_optimizers",
                        lambda: {"adamw", "lion", "adafactor"})
    spec = build_spec(parse(["--preset", "cpu-quick", "--out", str(tmp_path)]))
    assert spec.optimizers == ["adamw", "lion", "adafactor"] and spec.skipped == ["muon"]
    assert spec.workers == 2 and spec.workload["threads"] == 1


def test_explicit_unregistered_optimizer_is_one_line_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("llmvalley.bench.compare.registered_optimizers",
                        lambda: {"adamw", "lion"})
    argv = ["compare", "--optimizers", "adamw,muon", "--models", "nano", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "muon" in err and "not registered" in err and "\n" not in err


@pytest.mark.parametrize("argv", [
    ["--optimizers", "adamw", "--models", "no-such-model"],
    ["--optimizers", "lion", "--models", "nano"],  # no baseline
    ["--preset", "no-such-preset"],
    ["--optimizers", "adamw"],  # no models
    ["--preset", "cpu-quick", "--trials", "0"],
    ["--preset", "cpu-quick", "--batch-size", "x"],
])
def test_compare_user_errors(argv: list[str], tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", *argv, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("valley compare: error:")


def test_gpu_ladder_budget_is_tokens_per_parameter(tmp_path: Path) -> None:
    spec = build_spec(parse(["--preset", "gpu-ladder", "--out", str(tmp_path)]))
    assert spec.models == ["llama-60m", "llama-130m", "llama-350m"]
    workload = scale_workload(spec, "llama-60m")
    assert "steps" not in workload
    assert workload["tokens"] == int(20 * model_parameters("llama-60m"))


def test_real_training_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real comparison (tiny model, a few steps, in-process) down to the report."""
    from llmvalley.bench.report import write_report
    from llmvalley.bench.sweep import run_training

    monkeypatch.setenv("LLMVALLEY_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(800)))
    workload = {"data": str(text), "val_fraction": 0.1, "model": "nano", "d_model": 32,
                "n_layers": 1, "n_heads": 2, "ffn_hidden": 64, "seq_len": 32, "steps": 6,
                "batch_size": 4, "eval_every": 3, "eval_batches": 1, "log_every": 3,
                "threads": 1, "device": "cpu"}
    spec = CompareSpec(optimizers=["adamw", "muon"], models=["nano"], workload=workload,
                       out=tmp_path / "results", trials=2, grid_points=2, seeds=1,
                       command="test")
    manifest = Comparison(spec, lambda config: run_training(config)).run()
    assert manifest["errors"] == []
    muon = json.loads((tmp_path / "results" / "nano" / "muon" / "sweep.json").read_text())
    assert muon["trials_counted"] == 2 and len(muon["seeds"]) == 1
    assert muon["fixed"]["fallback_args"]["lr"] > 0
    seed_dir = tmp_path / "results" / "nano" / "muon" / muon["seeds"][0]["run_dir"]
    assert (seed_dir / "log.jsonl").is_file()
    md, html = write_report(tmp_path / "results")
    assert "muon" in md.read_text() and html.stat().st_size > 10_000


def test_priority_pool_starts_urgent_runs_first() -> None:
    import time

    from llmvalley.bench.pool import BASELINE_TRIALS, SEEDS, PriorityPool

    pool = PriorityPool(1)
    finished: list[str] = []
    try:
        busy = pool.submit(time.sleep, 0.5)  # occupies the only worker while the others queue
        late = pool.submit(time.sleep, 0, priority=SEEDS)
        urgent = pool.submit(time.sleep, 0, priority=BASELINE_TRIALS)
        late.add_done_callback(lambda _: finished.append("seeds"))
        urgent.add_done_callback(lambda _: finished.append("baseline"))
        for future in (busy, late, urgent):
            future.result(timeout=60)
    finally:
        pool.shutdown()
    assert finished == ["baseline", "seeds"]


def test_an_explicit_budget_replaces_the_presets(tmp_path: Path) -> None:
    spec = build_spec(parse(["--preset", "gpu-ladder", "--steps", "1000", "--out", str(tmp_path)]))
    assert spec.tokens_per_param is None and scale_workload(spec, "llama-60m")["steps"] == 1000
    spec = build_spec(parse(["--preset", "cpu-quick", "--tokens", "2e5", "--out", str(tmp_path)]))
    assert "steps" not in spec.workload and spec.workload["tokens"] == 200_000
    assert main(["compare", "--preset", "cpu-quick", "--tokens-per-param", "5", "--steps", "10",
                 "--out", str(tmp_path)]) == 2


def test_progress_shows_each_trial_result_in_time_order(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_fake_comparison(tmp_path, ["nano"], trials=3, seeds=1)
    lines = capsys.readouterr().out.splitlines()
    stamps = [line[1:9] for line in lines if line.startswith("[")]
    assert stamps == sorted(stamps) and len(stamps) == len(lines)
    for optimizer in ("adamw", "lion", "muon"):
        results = [line for line in lines if f"nano: {optimizer}: trial " in line
                   and "final val loss" in line]
        assert len(results) == 3  # one line per finished trial, with its loss
        assert any(f"nano: {optimizer}: seed 1 final val loss" in line for line in lines)


def test_untuned_methods_get_one_trial_at_their_default_lr(tmp_path: Path) -> None:
    """Zero tuning budget (parameter-free methods beside tuned AdamW): one trial at the
    registry's default learning rate, then the seeds; never marked as a grid-edge bound."""
    import llmvalley
    from llmvalley.bench.analysis import analyse

    fake = SyntheticTraining(shape={**SHAPES, "prodigy": {"best_lr": 1.0}})
    spec = CompareSpec(optimizers=["adamw", "prodigy"], models=["nano"],
                       workload={"steps": 50, "batch_size": 8}, out=tmp_path, trials=4,
                       grid_points=3, seeds=2, lr_centers=CENTERS, untuned=["prodigy"],
                       command="valley compare")
    manifest = Comparison(spec, fake).run()
    assert manifest["errors"] == []
    calls = [c for c in fake.calls if c["optimizer"] == "prodigy"]
    default = llmvalley.get_spec("prodigy").defaults["lr"]
    assert len(calls) == 1 + 2 and {c["lr"] for c in calls} == {default}
    assert len([c for c in fake.calls if c["optimizer"] == "adamw"]) == 4 + 2
    sweep = json.loads((tmp_path / "nano" / "prodigy" / "sweep.json").read_text())
    assert sweep["untuned"] is True and sweep["best_at_edge"] is False
    assert manifest["cells"]["nano/prodigy"]["tuned"] == []
    cell = analyse(tmp_path).cell("nano", "prodigy")
    assert cell.untuned and not cell.best_at_edge


def test_untuned_names_must_be_compared(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--untuned: dog not among"):
        build_spec(parse(["--optimizers", "adamw,prodigy", "--models", "nano",
                          "--untuned", "dog", "--out", str(tmp_path)]))


def test_method_args_reach_only_that_methods_runs(tmp_path: Path) -> None:
    fake = SyntheticTraining(shape=SHAPES)
    spec = CompareSpec(optimizers=["adamw", "lion"], models=["nano"],
                       workload={"steps": 50, "batch_size": 8}, out=tmp_path, trials=3,
                       grid_points=3, seeds=1, lr_centers=CENTERS,
                       method_args={"lion": {"betas": (0.95, 0.98)}}, command="valley compare")
    assert Comparison(spec, fake).run()["errors"] == []
    lion = [c for c in fake.calls if c["optimizer"] == "lion"]
    adamw = [c for c in fake.calls if c["optimizer"] == "adamw"]
    assert lion and all(tuple(c["opt_args"]["betas"]) == (0.95, 0.98) for c in lion)
    assert all(tuple(c["opt_args"]["betas"]) == (0.9, 0.95) for c in adamw)


def test_cpu_families_preset_fits_nano():
    from llmvalley.bench.compare import PRESETS
    from llmvalley.models.presets import PRESETS as MODELS

    preset = PRESETS["cpu-families"]
    width = MODELS["nano"].d_model
    assert preset.method_args["galore"]["rank"] < width  # a rank GaLore accepts at this width
    assert preset.untuned == ("prodigy",) and "prodigy" not in preset.lr_centers


def test_model_specific_method_args_reach_only_that_models_runs(tmp_path: Path) -> None:
    fake = SyntheticTraining(shape=SHAPES)
    spec = CompareSpec(optimizers=["adamw", "lion"], models=["nano", "micro"],
                       workload={"steps": 50, "batch_size": 8}, out=tmp_path, trials=3,
                       grid_points=3, seeds=1, lr_centers=CENTERS,
                       method_args={"lion": {"betas": (0.95, 0.98)},
                                    "lion@micro": {"betas": (0.9, 0.99)}},
                       command="valley compare")
    assert Comparison(spec, fake).run()["errors"] == []
    betas = {(c["model"], tuple(c["opt_args"]["betas"])) for c in fake.calls
             if c["optimizer"] == "lion"}
    assert betas == {("nano", (0.95, 0.98)), ("micro", (0.9, 0.99))}


def test_memory_gpu_preset_runs_the_papers_settings(tmp_path: Path) -> None:
    """GaLore's and APOLLO's protocol: their models, ~20 tokens per parameter, batch 512 x 256,
    bf16 on a GPU, and each paper's rank at each size."""
    spec = build_spec(parse(["--preset", "memory-gpu", "--out", str(tmp_path)]))
    assert spec.models == ["llama-60m", "llama-130m"]
    workload = scale_workload(spec, "llama-60m")
    assert workload["tokens"] == int(20 * model_parameters("llama-60m"))
    assert (workload["batch_size"], workload["device"], workload["precision"]) == (
        512, "cuda", "bf16")
    assert "galore" in spec.optimizers and "apollo_mini" in spec.optimizers
    assert spec.args_for("galore", "llama-60m") == {}  # the registry's rank 128
    assert spec.args_for("galore", "llama-130m") == {"rank": 256}
    assert spec.args_for("apollo", "llama-130m") == {"rank": 192}
    assert spec.args_for("apollo_mini", "llama-130m") == {"scale_front": True}
    import llmvalley

    assert llmvalley.get_spec("galore").defaults["rank"] == 128
