"""Scale dependence: the fit of AdamW's loss against data, effective-data speedups with their
bootstrap interval, ``valley compare --budgets``, the report's scaling parts and cpu-scale."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llmvalley.bench.analysis import analyse
from llmvalley.bench.compare import PRESETS, CompareSpec, Comparison, parse_budgets
from llmvalley.bench.plots import data_speedup_vs_size
from llmvalley.bench.report import DATA_COLUMN, leaderboard_rows, write_report
from llmvalley.bench.scaling import PowerLaw, data_speedups, fit_power_law
from llmvalley.cli import UsageError, build_parser, main
from llmvalley.commands.compare_cmd import build_spec
from tests.fake_runs import SyntheticTraining

LAW = PowerLaw(a=1.2, b=0.6, c=2.0, d0=5_000.0)
BUDGETS = [5_000.0, 10_000.0, 20_000.0]


def test_the_fit_recovers_a_power_law_from_three_budgets() -> None:
    fit = fit_power_law(BUDGETS, [LAW.loss(d) for d in BUDGETS])
    assert fit.law is not None and fit.reason is None and fit.rms < 1e-8
    assert fit.law.a == pytest.approx(LAW.a, rel=1e-5)
    assert fit.law.b == pytest.approx(LAW.b, rel=1e-5)
    assert fit.law.c == pytest.approx(LAW.c, abs=1e-5)
    # D_eff inverts the law; a with D in tokens is a * d0^b
    assert fit.law.tokens_for(LAW.loss(7_000.0)) == pytest.approx(7_000.0, rel=1e-5)
    assert fit.law.a_tokens == pytest.approx(LAW.a * 5_000.0**LAW.b, rel=1e-4)
    assert fit.law.tokens_for(1.9) == math.inf


@pytest.mark.parametrize("budgets, losses, reason", [
    ([5e3, 1e4], [3.0, 2.8], "3 or more budgets"),
    ([5e3, 1e4, 2e4], [3.0, 3.1, 3.2], "does not fall"),
    ([5e3, 5e3, 1e4], [3.0, 3.0, 2.9], "3 or more budgets"),
])
def test_an_undefined_fit_says_why_and_speedups_stay_empty(budgets, losses, reason) -> None:
    baseline = {d: {1: v} for d, v in zip(budgets, losses)}
    fit, speedups = data_speedups(baseline, {"muon": (budgets[0], {1: 2.5})})
    assert fit.law is None and reason in fit.reason
    assert speedups["muon"].value is None and reason in speedups["muon"].note


def paired(noise: dict[int, float], loss_at: float) -> dict[int, float]:
    return {seed: loss_at + offset for seed, offset in noise.items()}


def test_speedups_bounds_extrapolation_and_a_paired_interval() -> None:
    noise = {1: -0.01, 2: 0.0, 3: 0.012}
    baseline = {d: paired(noise, LAW.loss(d)) for d in BUDGETS}
    methods = {
        "muon": (5_000.0, paired(noise, LAW.loss(7_500.0))),  # 1.5x, inside the budgets
        "far": (5_000.0, paired(noise, LAW.loss(60_000.0))),  # 12x: beyond the largest budget
        "great": (5_000.0, {1: 1.90, 2: 1.92, 3: 1.91}),  # below the asymptote c = 2
        "adamw": (10_000.0, baseline[10_000.0]),
    }
    fit, speedups = data_speedups(baseline, methods)
    muon, far, great, adamw = (speedups[k] for k in ("muon", "far", "great", "adamw"))
    assert muon.value == pytest.approx(1.5, rel=1e-3) and not muon.extrapolated
    assert muon.bound is None and muon.low <= 1.5 + 1e-6 and muon.high >= 1.5 - 1e-6
    # paired seeds: the common seed noise cancels, so the interval is narrow
    assert muon.high - muon.low < 0.05
    assert far.value == pytest.approx(12.0, rel=1e-2) and far.extrapolated
    assert great.bound == "lower" and great.value == pytest.approx(20_000.0 / 5_000.0)
    assert great.effective_tokens == math.inf and "asymptote" in great.note
    assert adamw.value == pytest.approx(1.0, rel=1e-3)
    # the bootstrap is seeded: the same numbers twice
    assert data_speedups(baseline, methods)[1]["muon"].low == muon.low


def test_unpaired_noise_widens_the_interval_around_the_truth() -> None:
    baseline = {d: {1: LAW.loss(d) + 0.02, 2: LAW.loss(d) - 0.02, 3: LAW.loss(d)}
                for d in BUDGETS}
    method = {1: LAW.loss(10_000.0) - 0.02, 2: LAW.loss(10_000.0) + 0.02,
              3: LAW.loss(10_000.0)}
    _, speedups = data_speedups(baseline, {"m": (5_000.0, method)})
    m = speedups["m"]
    assert m.value == pytest.approx(2.0, rel=1e-3)
    assert m.low < 2.0 < m.high and m.high - m.low > 0.2


@dataclass
class BudgetedTraining(SyntheticTraining):
    """SyntheticTraining whose final loss falls with the run's tokens as ``LAW`` does, as if the
    optimizer had seen ``data`` times the tokens (its effective-data speedup), and which also
    records a shifted-corpus loss (0.5 nats above the in-domain one, plus ``shift``)."""

    data: dict[str, float] = field(default_factory=dict)
    shift: dict[str, float] = field(default_factory=dict)

    def final_loss(self, optimizer: str, lr: float, seed: int,
                   config: dict[str, Any] | None = None) -> float | None:
        base = super().final_loss(optimizer, lr, seed, config)
        if base is None:
            return None
        tokens = (config or {}).get("steps", 100) * 100 * self.data.get(optimizer, 1.0)
        return base + LAW.loss(tokens) - LAW.c

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        summary = super().__call__(config)
        if summary["final_val_loss"] is not None:
            shifted = summary["final_val_loss"] + 0.5 + self.shift.get(config["optimizer"], 0.0)
            summary.update(shifted_corpus="pydoc-topics-test", final_shifted_val_loss=shifted,
                           final_shifted_val_bpb=shifted / math.log(2))
            path = Path(summary["run_dir"]) / "summary.json"
            path.write_text(json.dumps(summary))
        return summary


SHAPES = {"adamw": {"best_lr": 4e-3, "floor": 0.0}, "muon": {"best_lr": 0.02, "floor": 0.0}}


def budget_comparison(out: Path, models: list[str]) -> BudgetedTraining:
    fake = BudgetedTraining(shape=SHAPES, data={"muon": 1.5}, shift={"muon": 0.1})
    spec = CompareSpec(optimizers=["adamw", "muon"], models=models,
                       workload={"steps": 50, "batch_size": 8, "eval_every": 10}, out=out,
                       trials=3, grid_points=3, seeds=2, budgets=[1.0, 2.0, 4.0],
                       lr_centers={"adamw": 4e-3, "muon": 0.02},
                       command="valley compare --budgets 1,2,4")
    assert Comparison(spec, fake).run()["errors"] == []
    return fake


@pytest.fixture(scope="module")
def budget_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BudgetedTraining]:
    folder = tmp_path_factory.mktemp("budgets")
    return folder, budget_comparison(folder, ["nano"])


def test_budgets_are_scales_with_their_own_sweeps_and_evaluation_points(
        budget_results: tuple[Path, BudgetedTraining]) -> None:
    tmp_path, fake = budget_results
    for key, steps, every in (("nano", 50, 10), ("nano@2x", 100, 20), ("nano@4x", 200, 40)):
        for optimizer in ("adamw", "muon"):
            sweep = json.loads((tmp_path / key / optimizer / "sweep.json").read_text())
            assert sweep["trials_counted"] == 3 and len(sweep["seeds"]) == 2
            assert sweep["workload"]["steps"] == steps
            assert sweep["workload"]["eval_every"] == every
            assert sweep["search"]["study"] == f"{key}/{optimizer}"
    # muon's fallback comes from AdamW at the same budget
    muon_4x = [c for c in fake.calls if c["optimizer"] == "muon" and c["steps"] == 200]
    adamw_4x = json.loads((tmp_path / "nano@4x" / "adamw" / "sweep.json").read_text())
    assert all(c["fallback_args"]["lr"] == adamw_4x["best"]["lr"] for c in muon_4x)


def test_the_report_shows_effective_data_speedups_and_shifted_gaps(
        budget_results: tuple[Path, BudgetedTraining]) -> None:
    tmp_path = budget_results[0]
    results = analyse(tmp_path)
    assert results.models == ["nano", "nano@2x", "nano@4x"]
    assert results.size_keys() == ["nano"]
    fit = results.fits["nano"]
    assert fit.law.b == pytest.approx(LAW.b, rel=1e-3)
    assert fit.law.a_tokens == pytest.approx(LAW.a * 5_000.0**LAW.b, rel=1e-3)
    for key in ("nano", "nano@2x", "nano@4x"):
        muon = results.cell(key, "muon")
        assert muon.data_speedup.value == pytest.approx(1.5, rel=1e-3)
        # the shifted corpus's gap: the in-domain gap plus muon's extra 0.1 nats
        assert muon.shifted_delta_vs_baseline == pytest.approx(muon.delta_vs_baseline + 0.1)
        assert muon.shifted_corpus == "pydoc-topics-test"
    rows = {r["optimizer"]: r for r in leaderboard_rows(results, "nano@2x")}
    assert rows["muon"][DATA_COLUMN].startswith("1.50x [")
    assert rows["adamw"][DATA_COLUMN] == "baseline (fit 1.00x)"
    gap = results.cell("nano@2x", "muon").shifted_delta_vs_baseline
    assert rows["muon"]["shifted-corpus loss (vs AdamW)"].endswith(f"({gap:+.4f})")
    md, html = write_report(tmp_path)
    text = md.read_text(encoding="utf-8")
    assert "## Scale dependence: nano" in text and "## Leaderboard: nano@4x" in text
    assert "AdamW's loss against data (nano)" in text and "pydoc-topics-test" in text
    assert "fig-data-speedup-vs-size" in html.read_text(encoding="utf-8")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["scaling_fits"]["nano"]["law"]["b"] == pytest.approx(LAW.b, rel=1e-3)
    assert metrics["nano@2x"][0]["data_speedup"] is not None


def test_a_bound_beyond_the_asymptote_and_an_edge_are_marked() -> None:
    from llmvalley.bench.analysis import CellMetrics
    from llmvalley.bench.report import data_speedup_text
    from llmvalley.bench.scaling import DataSpeedup

    cell = CellMetrics("nano@2x", "lion", data_speedup=DataSpeedup(
        2.0, low=2.0, high=math.inf, bound="lower", effective_tokens=math.inf))
    assert data_speedup_text(cell) == "≥2.00x [2.00–∞] (beyond AdamW's asymptote)"
    cell.speedup_bound = "upper"  # and AdamW's best lr at an edge: neither bound holds
    assert data_speedup_text(cell).startswith("~2.00x")
    cell.data_speedup = DataSpeedup(12.0, low=10.0, high=14.0, extrapolated=True)
    cell.speedup_bound = None
    assert data_speedup_text(cell) == "12.00x [10.00–14.00x] (extrapolated)"
    cell.data_speedup = DataSpeedup(None, note="AdamW's loss does not fall with more data")
    assert data_speedup_text(cell) == "– (AdamW's loss does not fall with more data)"


def test_results_from_before_budgets_still_load_without_a_fit(
        budget_results: tuple[Path, BudgetedTraining], tmp_path: Path) -> None:
    """A compare.json without ``budgets`` (every recorded result so far): one budget, no fit,
    no data-speedup figure, "–" in the column and a note saying what it needs."""
    folder = budget_results[0]
    manifest = json.loads((folder / "compare.json").read_text())
    del manifest["spec"]["budgets"]
    (tmp_path / "compare.json").write_text(json.dumps(manifest))
    (tmp_path / "nano").symlink_to(folder / "nano", target_is_directory=True)
    results = analyse(tmp_path)
    assert results.models == ["nano"] and results.fits == {}
    assert data_speedup_vs_size(results) is None
    assert {r[DATA_COLUMN] for r in leaderboard_rows(results, "nano")} == {"–"}
    write_report(tmp_path)
    assert "needs three or more token budgets" in (tmp_path / "report.md").read_text()


def parse(argv: list[str]):
    return build_parser().parse_args(["compare", *argv])


def test_budgets_option_and_cpu_scale_preset(tmp_path: Path) -> None:
    spec = build_spec(parse(["--optimizers", "adamw,lion", "--models", "nano", "--budgets",
                             "4,1,2x", "--out", str(tmp_path)]))
    assert spec.budgets == [1.0, 2.0, 4.0]
    assert [k for k, _, _ in spec.scales()] == ["nano", "nano@2x", "nano@4x"]
    spec = build_spec(parse(["--preset", "cpu-scale", "--out", str(tmp_path)]))
    assert spec.models == ["nano", "micro"] and spec.budgets == [1.0, 2.0, 4.0]
    assert spec.optimizers == list(PRESETS["cpu-quick"].optimizers)
    assert spec.seeds >= 3 and spec.workers == 2
    assert build_spec(parse(["--optimizers", "adamw", "--models", "nano", "--out",
                             str(tmp_path)])).budgets == [1.0]
    for bad in ("0,1,2", "1,1,2", "a,b", ""):
        with pytest.raises(UsageError, match="--budgets"):
            parse_budgets(bad)
    assert main(["compare", "--preset", "cpu-scale", "--budgets", "1,-2", "--out",
                 str(tmp_path)]) == 2


def test_cpu_scale_smoke_real_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cpu-scale shrunk to seconds (tiny shapes, 2-8 steps, AdamW and Muon, one trial, one
    seed): real training at both sizes and three budgets, down to the fit and the report."""
    from llmvalley.bench.sweep import run_training

    monkeypatch.setenv("LLMVALLEY_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
    config = tmp_path / "shifted.json"  # the shifted corpus through a config file
    config.write_text(json.dumps({"shifted_data": "pydoc-topics"}))
    spec = build_spec(parse([
        "--preset", "cpu-scale", "--optimizers", "adamw,muon", "--trials", "1",
        "--grid-points", "1", "--seeds", "1", "--workers", "1", "--steps", "2",
        "--config", str(config),
        "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1", "--data", str(text),
        "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--ffn-hidden", "32",
        "--seq-len", "16", "--out", str(tmp_path / "results")]))
    manifest = Comparison(spec, lambda config: run_training(config)).run()  # in-process
    assert manifest["errors"] == []
    results = analyse(tmp_path / "results")
    assert set(results.fits) == {"nano", "micro"}
    for key in ("nano", "nano@2x", "nano@4x", "micro@4x"):
        adamw = results.cell(key, "adamw")
        assert adamw.seeds == 1 and adamw.shifted_corpus.startswith("pydoc-topics")
        assert adamw.shifted_loss_mean > 0
    assert results.cell("micro@4x", "adamw").tokens == 4 * results.cell("micro", "adamw").tokens
    write_report(tmp_path / "results")  # whatever the tiny runs' fit is, the report renders
    assert (tmp_path / "results" / "report.html").is_file()


def test_budget_figures_keep_the_layout_rules(
        budget_results: tuple[Path, BudgetedTraining]) -> None:
    """Several scales wrap onto rows of panels; every figure stays page-wide with its legend
    off the panels (the rules test_report checks at one budget)."""
    import matplotlib.pyplot as plt

    from llmvalley.bench.plots import FIGURES, WIDTH
    from tests.test_report import boxes_overlap

    results = analyse(budget_results[0])
    for stem, _, build in FIGURES:
        fig = build(results)
        if fig is None:
            assert stem == "performance-profile" or stem == "data-speedup-vs-size", stem
            continue
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert fig.get_size_inches()[0] == WIDTH, stem
        for legend in fig.legends:
            box = legend.get_window_extent(renderer)
            assert not any(boxes_overlap(box, ax.get_window_extent(renderer))
                           for ax in fig.axes), stem
        plt.close(fig)
    assert data_speedup_vs_size(results) is not None
