"""The shifted held-out corpus: its sources, its evaluation set, and its loss in the trainer's
log and summary (and in the leaderboard when the runs recorded it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmvalley.bench import train
from llmvalley.bench.analysis import CellMetrics, add_shifted
from llmvalley.bench.config import coerce_config
from llmvalley.bench.report import shifted_text
from llmvalley.cli import UsageError
from llmvalley.data import ByteTokenizer, load_corpus
from llmvalley.data.heldout import load_shifted_eval, shifted_batches, shifted_source
from llmvalley.data.sources import pydoc_topics_corpus


def test_pydoc_topics_is_english_prose_split_by_topic() -> None:
    from pydoc_data.topics import topics

    held_out = pydoc_topics_corpus(1.0)
    assert list(held_out.documents("train")) == []
    docs = list(held_out.documents("val"))
    assert len(docs) == len(topics) and all(isinstance(d, str) for d in docs)
    assert sum(d.count(" the ") for d in docs) > 1000  # prose, not code
    split = load_corpus("pydoc-topics", val_fraction=0.3)
    train_docs, val_docs = list(split.documents("train")), list(split.documents("val"))
    assert train_docs and val_docs and len(train_docs) + len(val_docs) == len(topics)
    assert split.key == load_corpus("pydoc-topics", val_fraction=0.3).key != held_out.key


def test_the_shifted_source_is_another_kind_of_text() -> None:
    assert shifted_source("stdlib", "auto") == "pydoc-topics"  # Python source -> prose
    assert shifted_source("hf:allenai/c4:en", "auto") == "stdlib"  # prose -> Python source
    assert shifted_source("corpus.txt", "none") is None
    assert shifted_source("stdlib", "my.txt") == "my.txt"
    assert shifted_batches(8, None) == 2 and shifted_batches(1, None) == 1
    assert shifted_batches(16, 5) == 5
    with pytest.raises(UsageError, match="--shifted-eval-batches"):
        coerce_config({"shifted_eval_batches": 0})


def test_the_shifted_evaluation_set_is_fixed(tmp_path: Path) -> None:
    kwargs = dict(tokenizer=ByteTokenizer(), seq_len=32, batch_size=4, n_batches=2,
                  root=tmp_path)
    first = load_shifted_eval("stdlib", "auto", **kwargs)
    again = load_shifted_eval("stdlib", "auto", **kwargs)
    assert first.corpus_name.startswith("pydoc-topics")
    assert len(first.batches) == 2 and tuple(first.batches[0][0].shape) == (4, 32)
    assert all((a[0] == b[0]).all() for a, b in zip(first.batches, again.batches))
    assert first.tokens_per_byte == pytest.approx(1.0, abs=1e-3)  # bytes (+ separators)
    assert load_shifted_eval("stdlib", "none", **kwargs) is None
    assert load_shifted_eval("pydoc-topics", "pydoc-topics", **kwargs) is None  # in-domain


TINY = {"model": "nano", "d_model": 16, "n_layers": 1, "n_heads": 2, "ffn_hidden": 32,
        "seq_len": 16, "steps": 4, "batch_size": 2, "eval_every": 2, "eval_batches": 4,
        "log_every": 2, "threads": 1, "device": "cpu", "quiet": True, "val_fraction": 0.1}


@pytest.fixture()
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMVALLEY_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"The value {i} is {'odd' if i % 2 else 'even'}.\n"
                            for i in range(600)))
    return text


def test_the_trainer_records_both_corpora(corpus: Path, tmp_path: Path) -> None:
    summary = train({**TINY, "data": str(corpus), "out": str(tmp_path / "runs"),
                     "shifted_data": "pydoc-topics"})
    assert summary["shifted_corpus"].startswith("pydoc-topics")
    assert summary["final_shifted_val_loss"] > 0
    assert summary["final_shifted_val_bpb"] > 0
    assert summary["final_shifted_val_loss"] != summary["final_val_loss"]
    log = [json.loads(line) for line in
           (Path(summary["run_dir"]) / "log.jsonl").read_text().splitlines()]
    evaluated = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    assert all(r["shifted_val_loss"] > 0 for r in evaluated)
    assert evaluated[-1]["shifted_val_loss"] == summary["final_shifted_val_loss"]


def test_no_shifted_corpus_or_a_missing_one_does_not_stop_the_run(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    off = train({**TINY, "data": str(corpus), "out": str(tmp_path / "runs"),
                 "shifted_data": "none"})
    assert off["shifted_corpus"] is None and off["final_shifted_val_loss"] is None
    missing = train({**TINY, "data": str(corpus), "out": str(tmp_path / "runs"),
                     "shifted_data": str(tmp_path / "no-such.txt")})
    assert missing["status"] == "completed" and missing["final_shifted_val_loss"] is None
    assert "no shifted held-out evaluation" in capsys.readouterr().err
    # the shifted evaluation changes nothing else: same training, same in-domain losses
    on = train({**TINY, "data": str(corpus), "out": str(tmp_path / "runs"),
                "shifted_data": "pydoc-topics"})
    assert on["final_shifted_val_loss"] is not None
    assert off["final_val_loss"] == missing["final_val_loss"] == on["final_val_loss"]
    assert off["final_train_loss"] == on["final_train_loss"]


def test_runs_without_a_shifted_loss_leave_the_column_empty() -> None:
    cell = CellMetrics("nano", "muon")
    add_shifted(cell, [{"final_val_loss": 2.0}, {}])  # summaries recorded before it existed
    assert cell.shifted_loss_mean is None and shifted_text(cell) == "–"
    add_shifted(cell, [{"shifted_corpus": "pydoc-topics-py3.11", "final_shifted_val_loss": 3.0,
                        "final_shifted_val_bpb": 4.3}, {"final_shifted_val_loss": 3.2}])
    cell.shifted_delta_vs_baseline = 0.05
    assert cell.shifted_loss_mean == pytest.approx(3.1)
    assert shifted_text(cell) == "3.1000 (+0.0500)"
