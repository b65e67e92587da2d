"""Reports: the HTML page is self-contained, has every figure, and its tables hold the data."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

import pytest

from llmvalley.bench.analysis import analyse
from llmvalley.bench.plots import FIGURES as ALL_FIGURES
from llmvalley.bench.plots import NEEDS_BUDGETS
from llmvalley.bench.report import COLUMNS, write_report
from llmvalley.cli import main
from tests.test_compare import run_fake_comparison

# the figures of a comparison at one token budget (tests/test_scaling.py covers the others)
FIGURES = tuple(f for f in ALL_FIGURES if f[0] not in NEEDS_BUDGETS)


class PageParser(HTMLParser):
    """Collects images, leaderboard tables (model -> optimizer -> cells) and external links."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.tables: dict[str, dict[str, list[str]]] = {}
        self.headers: list[str] = []
        self.external: list[str] = []
        self._model: str | None = None
        self._row: list[str] | None = None
        self._optimizer: str | None = None
        self._cell: list[str] | None = None
        self._in_th = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])
        if tag == "img":
            self.images[a["id"]] = a["src"]
        elif tag == "table" and a.get("class") == "leaderboard":
            self._model = a["data-model"]
            self.tables[self._model] = {}
        elif tag == "tr" and self._model and a.get("data-optimizer"):
            self._optimizer, self._row = a["data-optimizer"], []
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "th" and self._model:
            self._in_th = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._model][self._optimizer] = self._row
            self._row = None
        elif tag == "table":
            self._model = None
        elif tag == "th":
            self._in_th = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        elif self._in_th and self._model == "nano":
            self.headers.append(data)


@pytest.fixture(scope="module")
def results_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("results")
    run_fake_comparison(folder, ["nano", "micro"], trials=3, seeds=2)
    write_report(folder)
    return folder


def test_html_is_self_contained_with_every_figure(results_folder: Path) -> None:
    page = PageParser()
    page.feed((results_folder / "report.html").read_text(encoding="utf-8"))
    assert set(page.images) == {f"fig-{stem}" for stem, _, _ in FIGURES}
    for src in page.images.values():
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert page.external == []
    for stem, _, _ in FIGURES:
        assert (results_folder / "plots" / f"{stem}.png").is_file()


def test_leaderboards_are_filled_from_the_data(results_folder: Path) -> None:
    page = PageParser()
    page.feed((results_folder / "report.html").read_text(encoding="utf-8"))
    results = analyse(results_folder)
    assert page.headers[:len(COLUMNS)] == list(COLUMNS)
    assert set(page.tables) == {"nano", "micro"}
    for model, rows in page.tables.items():
        assert set(rows) == {"adamw", "lion", "muon"}
        for optimizer, cells in rows.items():
            metrics = results.cell(model, optimizer)
            named = dict(zip(COLUMNS, cells))
            assert named["final val loss"].startswith(f"{metrics.final_loss_mean:.4f} ± ")
            assert named["final val loss"].endswith("(n=2)")
            assert named["best lr"].startswith(f"{metrics.best_lr:.3g}")
            assert named["diverged"] == (f"{metrics.trials_diverged}/3 trials, 0/2 seeds")
            assert all(cell.strip() for cell in cells)
        # the synthetic muon and lion curves fall faster than AdamW's: speedups above 1
        assert rows["adamw"][COLUMNS.index("tokens speedup")] == "1.00x"
        muon = results.cell(model, "muon")
        assert muon.token_speedup > 1
        assert rows["muon"][COLUMNS.index("tokens speedup")] == f"{muon.token_speedup:.2f}x"
    # rows are ranked by mean final loss: muon (floor 1.90) first, adamw (2.00) last
    assert list(page.tables["nano"]) == ["muon", "lion", "adamw"]


def test_markdown_summary_has_a_leaderboard_per_scale_and_the_figures(
        results_folder: Path) -> None:
    text = (results_folder / "report.md").read_text(encoding="utf-8")
    assert "## Leaderboard: nano" in text and "## Leaderboard: micro" in text
    assert "| " + " | ".join(COLUMNS) + " |" in text
    for stem, _, _ in FIGURES:
        assert f"(plots/{stem}.png)" in text
    assert (results_folder / "metrics.json").is_file()


def test_report_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path)]) == 2  # a folder without compare.json
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("valley report: error:") for line in err)


# ---------------------------------------------------------------------- v2 sections and layout
def table_rows(html_text: str, kind: str, model: str | None = None) -> dict[str, list[str]]:
    """Rows (optimizer -> cells) of the table of class ``kind`` (and ``data-model``)."""
    import re

    attrs = f"class='{kind}'" + (f" data-model='{model}'" if model else "")
    body = html_text.split(f"<table {attrs}>", 1)[1].split("</table>", 1)[0]
    rows = {}
    for optimizer, cells in re.findall(r"<tr data-optimizer='([^']+)'>(.*?)</tr>", body):
        rows[optimizer] = re.findall(r"<td>(.*?)</td>", cells)
    return rows


def test_tuning_cost_profile_and_complexity_tables(results_folder: Path) -> None:
    text = (results_folder / "report.html").read_text(encoding="utf-8")
    results = analyse(results_folder)
    for model in ("nano", "micro"):
        rows = table_rows(text, "tuning-cost", model)
        assert set(rows) == {"adamw", "lion", "muon"}
        curve = results.cell(model, "lion").tuning_curve
        assert rows["lion"][1] == "3"  # trials
        assert rows["lion"][2].startswith(f"{curve[0][1]:.4f} [")  # k=1
        assert rows["lion"][-1].startswith(f"{curve[-1][1]:.4f} [")  # k=n
    profile = results.profile()
    rows = table_rows(text, "profile")
    assert set(rows) == {"adamw", "lion", "muon"}
    assert rows["muon"][1] == f"{profile.score('muon'):.3f}"
    complexity_rows = table_rows(text, "complexity")
    assert complexity_rows["muon"][4].startswith("1 (Newton-Schulz")
    assert complexity_rows["adamw"][1] == "0" and complexity_rows["adamw"][4] == "none"
    assert complexity_rows["lion"][5] == "nano 1.00x, micro 1.00x"  # same share as AdamW


def test_time_to_target_leads_with_the_load_independent_figure(results_folder: Path) -> None:
    from llmvalley.bench.report import TIME_COLUMN, leaderboard_rows

    results = analyse(results_folder)
    muon = results.cell("nano", "muon")
    text = {r["optimizer"]: r for r in leaderboard_rows(results, "nano")}["muon"][TIME_COLUMN]
    steps = muon.tokens_to_target / muon.tokens_per_step * muon.step_time_ratio
    assert text == f"{steps:.1f} AdamW steps; raw wall-clock {muon.seconds_to_target:.1f} s"
    notes = (results_folder / "report.md").read_text(encoding="utf-8")
    assert "min-max over seeds" in notes


def test_one_size_has_no_profile(tmp_path: Path) -> None:
    run_fake_comparison(tmp_path, ["nano"], trials=3, seeds=1)
    write_report(tmp_path)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "class='profile'" not in text and "fig-performance-profile" not in text
    assert "class='tuning-cost'" in text


def boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_figures_span_the_page_with_one_caption_and_legends_off_the_curves(
        results_folder: Path) -> None:
    import matplotlib.pyplot as plt

    from llmvalley.bench.plots import WIDTH

    results = analyse(results_folder)
    for stem, _, build in FIGURES:
        fig = build(results)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert fig.get_size_inches()[0] == WIDTH, stem
        assert fig._suptitle is None, stem  # the caption is the report's, shown once
        for legend in fig.legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not boxes_overlap(box, ax.get_window_extent(renderer)), stem
        assert all(ax.get_legend() is None for ax in fig.axes), stem
        plt.close(fig)
    text = (results_folder / "report.md").read_text(encoding="utf-8")
    for _, title, _ in FIGURES:
        assert text.count(title) == 2  # the heading, and the image's alt text


def test_loss_axes_start_where_the_curves_start(results_folder: Path) -> None:
    import matplotlib.pyplot as plt

    from llmvalley.bench.plots import loss_curves

    results = analyse(results_folder)
    fig = loss_curves(results, "tokens")
    for ax, model in zip(fig.axes, results.models):
        cells = [c for c in results.cells[model] if c.mean]
        assert ax.get_xlim()[0] == min(c.mean.tokens[0] for c in cells)
        first = max(curve.loss[0] for c in cells for curve in c.curves)
        assert ax.get_ylim()[1] >= first  # the curves' starts are inside the axes
    plt.close(fig)


def test_close_speedup_labels_do_not_overlap(results_folder: Path) -> None:
    import matplotlib.pyplot as plt

    from llmvalley.bench.plots import speedup_vs_size

    results = analyse(results_folder)
    for model in results.models:  # the case: 2.47x and 2.43x at the same size
        results.cell(model, "muon").token_speedup = 2.47
        results.cell(model, "lion").token_speedup = 2.43
    fig = speedup_vs_size(results)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_text().endswith("x")]
    assert len(boxes) >= 4
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not boxes_overlap(a, b)
    plt.close(fig)


def test_memory_figure_shows_the_peak_above_the_models_own(results_folder: Path) -> None:
    results = analyse(results_folder)
    base, lion = results.cell("nano", "adamw"), results.cell("nano", "lion")
    lion.peak_memory_bytes = base.peak_memory_bytes + 3 * 2**20
    assert results.peak_above_model("nano", "lion") == base.state_bytes + 3 * 2**20
    assert results.peak_above_model("nano", "adamw") == base.state_bytes
