"""``valley train`` from the command line: config files, run folders, quiet mode, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmvalley.cli import main
from tests.helpers import write_corpus

WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()


@pytest.fixture(autouse=True)
def isolated(private_cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private cache, and the run folders written under the test's own directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus", WORDS, seed=1, files=10, lines=50,
                        words_per_line=8)


def small_args(corpus: Path) -> list[str]:
    return ["train", "--data", str(corpus), "--val-fraction", "0.3", "--d-model", "32",
            "--n-layers", "1", "--n-heads", "2", "--ffn-hidden", "64", "--seq-len", "32",
            "--batch-size", "4", "--eval-batches", "2", "--steps", "6", "--eval-every", "3",
            "--optimizer", "torch-adamw", "--threads", "1", "--no-progress"]


def test_small_run_prints_a_report_and_writes_the_run_folder(corpus: Path, tmp_path: Path,
                                                             capsys) -> None:
    rc = main([*small_args(corpus), "--name", "cli", "--opt-arg", "betas=0.9,0.95",
               "--lr", "2e-3", "--weight-decay", "0.05", "--schedule", "wsd"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "final validation loss" in out and "byte-unigram entropy" in out
    run = tmp_path / "runs" / "cli"  # runs/ under the current directory by default
    assert {"config.json", "command.txt", "log.jsonl", "summary.json"} <= {
        p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["opt_args"] == {"betas": [0.9, 0.95]} and config["schedule"] == "wsd"
    assert config["lr"] == 2e-3 and config["weight_decay"] == 0.05
    command = (run / "command.txt").read_text()
    assert command.startswith("valley train --data") and "--opt-arg betas=0.9,0.95" in command


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "lr: 0.002\nschedule: linear\nopt-args:\n  betas: [0.9, 0.95]\nsteps: 4\n"),
    (".toml", "lr = 0.002\nschedule = \"linear\"\nsteps = 4\n[opt_args]\nbetas = [0.9, 0.95]\n"),
])
def test_config_file_with_command_line_override(corpus: Path, tmp_path: Path, capsys,
                                                suffix: str, text: str) -> None:
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    args = [a for a in small_args(corpus) if a not in ("--steps", "6")]
    rc = main([*args, "--config", str(path), "--schedule", "cosine", "--quiet", "--opt-arg",
               "eps=1e-7"])
    out = capsys.readouterr().out.strip()
    assert rc == 0
    run = Path(out)  # quiet mode prints only the run folder
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["lr"] == 0.002 and config["steps"] == 4
    assert config["schedule"] == "cosine"  # the command line wins
    assert config["opt_args"] == {"betas": [0.9, 0.95], "eps": 1e-7}


def test_resume_from_the_command_line(corpus: Path, tmp_path: Path, capsys) -> None:
    assert main([*small_args(corpus), "--name", "r", "--checkpoint-every", "3", "--quiet"]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "r"
    # a finished run is not resumed: one line, exit 2, and its summary stays as it was
    summary = (run / "summary.json").read_bytes()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already finished (completed at step 6)" in err
    assert (run / "summary.json").read_bytes() == summary
    # a run stopped after its last checkpoint but before its summary is finished by --resume
    (run / "summary.json").unlink()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(run)
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "no-such-opt"], "optimizer 'no-such-opt'"),
    (["--model", "gigantic"], "unknown model 'gigantic'; accepted: nano"),
    (["--data", "missing/corpus.txt"], "does not exist; --data accepts stdlib"),
    (["--data", "__binary__"], "not a text file"),
    (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
    (["--steps", "ten"], "--steps: expected an integer"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--schedule", "step"], "--schedule: unknown value 'step'; accepted: cosine"),
    (["--tokenizer", "sentencepiece"], "unknown tokenizer"),
    (["--opt-arg", "betas"], "--opt-arg: expected key=value"),
    (["--config", "nope.yaml"], "config file nope.yaml does not exist"),
    (["--resume", "runs/none"], "drop --data"),
    (["--steps", "5", "--tokens", "100"], "not both"),
    (["--n-heads", "3"], "bad model shape"),
])
def test_user_errors_exit_2_with_one_line(args: list[str], message: str, corpus: Path,
                                          tmp_path: Path, capsys) -> None:
    (tmp_path / "__binary__").write_bytes(bytes(range(256)))
    data = [] if "--data" in args else ["--data", str(corpus)]  # small data: fast failures
    rc = main(["train", *data, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("valley train: error: ")
    assert message in err


def test_gpu_flags_without_a_gpu(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for args in (["--device", "cuda"], ["--precision", "bf16"]):
        assert main(["train", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "CUDA" in err


def test_resume_errors(capsys) -> None:
    assert main(["train", "--resume", "runs/none"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert main(["train", "--resume", "runs/none", "--lr", "1"]) == 2
    assert "--resume continues a run with its saved config; drop --lr" in capsys.readouterr().err
