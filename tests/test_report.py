"""Reports: the HTML page is self-contained, has every figure, and its tables hold the data."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

import pytest

from llmvalley.bench.analysis import analyse
from llmvalley.bench.plots import FIGURES
from llmvalley.bench.report import COLUMNS, write_report
from llmvalley.cli import main
from tests.test_compare import run_fake_comparison


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
