"""``valley train --parallel ddp|fsdp`` with 2 gloo processes on CPU: the global batch gives the
single-process loss curve, DCP checkpoints resume on another number of ranks, rank 0 alone
writes, and bad launches, bad batch sizes and dead ranks end with one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmvalley.bench.records import read_log
from llmvalley.cli import main
from tests.dist_helpers import run_ranks

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box and jog".split()
STEPS = 4


def small(corpus: Path, out: Path, **overrides) -> dict:
    """A seconds-long run: a 2-layer width-32 model on the toy corpus, a checkpoint at step 2."""
    config = dict(data=str(corpus), val_fraction=0.25, model="nano", d_model=32, n_layers=2,
                  n_heads=2, ffn_hidden=64, seq_len=32, batch_size=4, eval_batches=2,
                  eval_every=2, log_every=1, steps=STEPS, checkpoint_every=2, optimizer="adamw",
                  lr=3e-3, progress=False, quiet=True, threads=1, out=str(out))
    config.update(overrides)
    return config


def train_rank(config: dict | None, parallel: str, resume: str | None = None,
               die_after_step: int | None = None, die_rank: int = 1) -> dict:
    """One rank of a run (called in each process by run_ranks); optionally one rank exits
    abruptly after a step, as a crashed process would."""
    from llmvalley.bench import Trainer, train

    if die_after_step is not None and int(os.environ["RANK"]) == die_rank:
        step = Trainer.optimizer_step

        def dying(self, index):
            result = step(self, index)
            if index + 1 >= die_after_step:
                os._exit(3)
            return result

        Trainer.optimizer_step = dying
    return train(config, resume=resume, parallel=parallel, dist_timeout=20)


def curve(run_dir: str | Path) -> list[tuple[int, float, float, float | None]]:
    return [(r["step"], r["train_loss"], r["grad_norm"], r.get("val_loss"))
            for r in read_log(run_dir)]


def assert_same_curve(a: list, b: list, rel: float = 2e-5) -> None:
    assert [r[0] for r in a] == [r[0] for r in b]
    for ra, rb in zip(a, b):
        assert ra[1:3] == pytest.approx(rb[1:3], rel=rel), (ra, rb)
        assert (ra[3] is None) == (rb[3] is None)
        if ra[3] is not None:
            assert ra[3] == pytest.approx(rb[3], rel=rel), (ra, rb)


def cut_at_previous(run_dir: Path, dest: Path, checkpoint: str) -> Path:
    """A copy of a finished run as it was when its previous checkpoint was written: no
    summary, no latest checkpoint; returns the previous checkpoint's path in the copy."""
    shutil.copytree(run_dir, dest)
    for name in ("summary.json", "checkpoint.pt", "checkpoint.dcp"):
        path = dest / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return dest / checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 4-step run in one process, and with 2 ranks under DDP and under FSDP2."""
    from llmvalley.bench import train
    from tests.helpers import write_corpus

    root = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(root / "corpus", WORDS, seed=0, files=12, lines=60, words_per_line=9)
    old = os.environ.get("LLMVALLEY_CACHE")
    os.environ["LLMVALLEY_CACHE"] = str(root / "cache")
    try:
        out = {"root": root, "corpus": corpus}
        single = train(small(corpus, root / "runs", name="single"))
        out["single"] = Path(single["run_dir"])
        for mode in ("ddp", "fsdp"):
            t0 = time.perf_counter()
            summaries = run_ranks(train_rank, 2, small(corpus, root / "runs", name=mode), mode,
                                  timeout=120)
            out[f"{mode}_s"] = time.perf_counter() - t0
            assert summaries[0]["run_dir"] == summaries[1]["run_dir"]
            out[mode] = Path(summaries[0]["run_dir"])
        yield out
    finally:
        if old is None:
            os.environ.pop("LLMVALLEY_CACHE", None)
        else:
            os.environ["LLMVALLEY_CACHE"] = old


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(runs: dict, mode: str) -> None:
    run = runs[mode]
    assert_same_curve(curve(run), curve(runs["single"]))
    summary = json.loads((run / "summary.json").read_text())
    single = json.loads((runs["single"] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=2e-5)
    assert summary["n_params"] == single["n_params"]
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert (resolved["parallel"], resolved["world_size"]) == (mode, 2)
    # rank 0 alone writes: one record per step, DCP checkpoints instead of checkpoint.pt
    assert [r["step"] for r in read_log(run)] == list(range(1, STEPS + 1))
    assert (run / "checkpoint.dcp" / "loop.pt").is_file()
    assert (run / "checkpoint-previous.dcp" / ".metadata").is_file()
    assert not (run / "checkpoint.pt").exists()
    assert sorted(p.name for p in run.parent.iterdir()) == ["ddp", "fsdp", "single"]


def test_fsdp_checkpoint_resumes_in_one_process(runs: dict) -> None:
    """A 2-rank FSDP2 checkpoint (step 2) continued by one process without --parallel ends
    where the 2-rank run did."""
    from llmvalley.bench import train

    path = cut_at_previous(runs["fsdp"], runs["root"] / "fsdp-to-1", "checkpoint-previous.dcp")
    summary = train(None, resume=str(path))
    assert summary["steps"] == STEPS
    assert_same_curve(curve(path.parent), curve(runs["fsdp"]))
    assert (path.parent / "checkpoint.pt").is_file()  # one process writes its own format


def test_one_process_checkpoint_resumes_on_two_ranks(runs: dict) -> None:
    """A single-process checkpoint (step 2) continued by 2 FSDP2 ranks ends where the
    single-process run did; so does a 2-rank DDP checkpoint continued under FSDP2."""
    path = cut_at_previous(runs["single"], runs["root"] / "1-to-fsdp", "checkpoint-previous.pt")
    run_ranks(train_rank, 2, None, "fsdp", resume=str(path), timeout=120)
    assert_same_curve(curve(path.parent), curve(runs["single"]))
    assert (path.parent / "checkpoint.dcp" / ".metadata").is_file()


def test_fsdp_without_torchrun_says_how_to_launch(monkeypatch, capsys, tmp_path) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--parallel", "fsdp", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun --nproc_per_node=N -m llmvalley train" in err[0]
    assert main(["train", "--parallel", "tp", "--out", str(tmp_path)]) == 2
    assert "accepted: none, ddp, fsdp" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_batch_not_divisible_by_world_size(monkeypatch, capsys, tmp_path) -> None:
    """Checked before the process group forms, so each rank can be tried alone: every rank
    exits with status 2, rank 0 prints one line."""
    argv = ["train", "--parallel", "ddp", "--batch-size", "5", "--out", str(tmp_path),
            "--steps", "2"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens there: no group may be formed
    errors = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert main(argv) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0].count("\n") == 1 and "divisible by the world size 2" in errors[0]
    assert errors[1] == ""
    assert not any(tmp_path.iterdir())


def test_a_dead_rank_ends_the_others(runs: dict) -> None:
    t0 = time.perf_counter()
    config = small(runs["corpus"], runs["root"] / "runs", name="dead", steps=6)
    outcomes = run_ranks(train_rank, 2, config, "ddp", die_after_step=2, timeout=60,
                         raise_errors=False)
    assert time.perf_counter() - t0 < 55
    assert outcomes[1].exitcode == 3 and not outcomes[1].ok
    assert not outcomes[0].ok and "PeerLost" in outcomes[0].error
    assert "another rank stopped" in outcomes[0].error


def test_valley_train_under_torchrun(runs: dict) -> None:
    """The real launcher: torchrun -m llmvalley train --parallel ddp, rank 0 alone prints."""
    out = runs["root"] / "torchrun"
    config = small(runs["corpus"], out)
    argv = ["--data", config["data"], "--val-fraction", "0.25", "--d-model", "32",
            "--n-layers", "2", "--n-heads", "2", "--ffn-hidden", "64", "--seq-len", "32",
            "--batch-size", "4", "--eval-batches", "2", "--eval-every", "2", "--steps", "2",
            "--log-every", "1", "--out", str(out), "--name", "tr", "--quiet",
            "--parallel", "ddp", "--dist-timeout", "60"]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node=2", "-m", "llmvalley", "train", *argv],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(out / "tr")]
    assert [r["step"] for r in read_log(out / "tr")] == [1, 2]
    assert "--parallel ddp" in (out / "tr" / "command.txt").read_text()


@pytest.mark.parametrize("optimizer, opt_args", [("muon", []), ("dion", ["rank_fraction=0.5"])])
def test_fsdp_matrix_methods_match_one_process(runs: dict, optimizer: str,
                                               opt_args: list[str]) -> None:
    """Methods that need whole matrices (the owner plan: Muon) or run on row shards (Dion)
    under `valley train --parallel fsdp` give the single-process curve. (Dion at full rank is
    left out: where ``M Q`` is rank-deficient its orthonormal completion amplifies fp32
    rounding, in one process too, so no two summation orders agree closely.)"""
    from llmvalley.bench import train

    out = runs["root"] / f"runs-{optimizer}"
    settings = dict(optimizer=optimizer, lr=0.02, opt_args=opt_args)
    single = train(small(runs["corpus"], out, name="single", **settings))
    sharded = run_ranks(train_rank, 2, small(runs["corpus"], out, name="fsdp", **settings),
                        "fsdp", timeout=120)
    assert_same_curve(curve(sharded[0]["run_dir"]), curve(single["run_dir"]), rel=1e-4)


def test_fsdp_with_a_hessian_vector_method_is_one_clear_error(runs: dict) -> None:
    """Sophia-H cannot run on FSDP2's graph-less gradients: every rank stops before the first
    step with the reason (the CLI prints it in one line and exits 2), and nothing is written."""
    out = runs["root"] / "runs-hvp"
    config = small(runs["corpus"], out, name="hvp", optimizer="sophia_h")
    outcomes = run_ranks(train_rank, 2, config, "fsdp", timeout=60, raise_errors=False)
    for outcome in outcomes:
        assert not outcome.ok and "UsageError" in outcome.error, outcome
        assert "--parallel fsdp: sophia_h: Hessian-vector curvature" in outcome.error
    assert not out.exists() or not any(out.iterdir())
