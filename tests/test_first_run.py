"""A new user's first runs: fast help and listing, the default run, interrupting and resuming,
and bad output folders or checkpoints reported as one line (exit status 2) with nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmvalley.bench import TrainConfig, train
from llmvalley.bench.config import DEFAULT_CHECKPOINT_EVERY, DEFAULT_STEPS
from llmvalley.bench.records import read_checkpoint, read_log
from llmvalley.bench.setup import plan_budget
from llmvalley.bench.trainer import Trainer
from llmvalley.cli import UsageError, main
from tests.helpers import write_corpus

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
TIMEOUT = 120  # seconds: a hung subprocess fails the test instead of the suite


@pytest.fixture(autouse=True)
def isolated(private_cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private cache; run folders under the test's own directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus", WORDS, seed=2, files=10, lines=50,
                        words_per_line=8)


def small_args(corpus: Path, steps: int = 12, every: int = 3) -> list[str]:
    """A seconds-long run from the command line, logging every step (so the log shows the
    loss of every batch: the data order)."""
    return ["train", "--data", str(corpus), "--val-fraction", "0.3", "--d-model", "32",
            "--n-layers", "1", "--n-heads", "2", "--ffn-hidden", "64", "--seq-len", "32",
            "--batch-size", "4", "--eval-batches", "2", "--eval-every", "5", "--log-every",
            "1", "--steps", str(steps), "--checkpoint-every", str(every), "--optimizer",
            "adamw", "--threads", "1", "--no-progress"]


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            **extra}


def python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (killed after TIMEOUT seconds)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=subprocess_env(**env))


def timeless(run_dir: Path) -> list[dict]:
    """Log records without wall-clock fields."""
    drop = ("time_", "tokens_per_s", "optimizer_share", "peak_memory", "elapsed")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_log(run_dir)]


def assert_same_final_state(a: Path, b: Path) -> None:
    """Bit-identical model and optimizer state in two run folders' final checkpoints."""
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (a, b))
    assert ca["progress"].step == cb["progress"].step
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert torch.equal(v, sb[i][k]) if torch.is_tensor(v) else v == sb[i][k], (i, k)


RESULT_KEYS = ("final_val_loss", "best_val_loss", "best_val_step", "final_train_loss",
               "loss_spikes", "max_grad_norm", "steps", "tokens", "status")


# ----------------------------------------------------------------------------- fast start
HELP_CODE = """
import sys
from llmvalley.cli import main
for argv in ([], ["--help"], ["train", "--help"], ["list", "--help"], ["sweep", "--help"],
             ["compare", "--help"], ["report", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def test_help_does_not_import_torch() -> None:
    result = python(HELP_CODE)
    assert result.returncode == 0, result.stderr
    assert "usage: valley" in result.stdout and "--resume RUN_DIR" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "torch imported: False"


LIST_CODE = """
import sys
from llmvalley.cli import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


def test_list_is_cached_and_then_does_not_import_torch(tmp_path: Path) -> None:
    cache = tmp_path / "list-cache"

    def run(*argv: str) -> subprocess.CompletedProcess:
        return python(LIST_CODE, *argv, LLMVALLEY_CACHE=str(cache))

    first = run("list")
    assert first.returncode == 0 and "torch imported: True" in first.stderr
    assert list((cache / "listing").glob("optimizers-*.json"))
    second = run("list")
    assert second.returncode == 0 and "torch imported: False" in second.stderr
    assert second.stdout == first.stdout
    # the same text as the live registry (in this process, which has imported it)
    import llmvalley

    live = [s.name for s in llmvalley.list_optimizers()]
    listed = [line.split()[0] for line in second.stdout.splitlines()[2:] if line.strip()]
    assert listed[:len(live)] == live
    details = run("list", "--details", "adan")
    assert details.returncode == 0 and "torch imported: False" in details.stderr
    assert "sail-sg/Adan" in details.stdout and "betas=(0.98, 0.92, 0.99)" in details.stdout
    family = run("list", "--family", "sign")
    assert family.returncode == 0 and "lion" in family.stdout and "adamw " not in family.stdout
    unknown = run("list", "--family", "signs")
    assert unknown.returncode == 2
    assert "unknown family 'signs'; accepted: " in unknown.stderr.splitlines()[0]


# ----------------------------------------------------------------------------- the default
def test_default_run_is_the_documented_two_minute_run() -> None:
    config = TrainConfig()
    assert (config.model, config.optimizer, config.data) == ("nano", "adamw", "stdlib")
    budget = plan_budget(config, seq_len=128)
    assert budget.steps == DEFAULT_STEPS == 400 and budget.tokens_per_step == 32 * 128
    assert config.checkpoint_every == DEFAULT_CHECKPOINT_EVERY == 100
    docs = (ROOT / "docs" / "train.md").read_text()
    assert "400 steps of 32 x 128 tokens" in docs and "about 2 minutes" in docs
    assert "| `--checkpoint-every` | `100` |" in docs


# ----------------------------------------------------------------------------- interrupts
SLOW_RUN = """
import sys, time
from llmvalley.bench.trainer import Trainer
step = Trainer.train_step
def slow(self, index):  # a slow machine: time to send the signal mid-run
    time.sleep(0.1)
    return step(self, index)
Trainer.train_step = slow
from llmvalley.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run(
        signum: int, corpus: Path, tmp_path: Path, capsys) -> None:
    args = small_args(corpus, steps=40, every=4)
    run = tmp_path / "runs" / "stopped"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, *args, "--name", "stopped"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run / "checkpoint.pt").exists():  # the first periodic checkpoint
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.02)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, err
    assert out.startswith(f"run folder: {Path('runs') / 'stopped'}\n")  # printed at the start
    assert err.count("\n") == 1 and "Traceback" not in err, err
    name = signal.Signals(signum).name
    assert err.startswith(f"valley train: interrupted by {name} at step ")
    assert f"continue with: valley train --resume {Path('runs') / 'stopped'}" in err
    stopped_at = int(err.split(" at step ")[1].split()[0])
    assert 4 <= stopped_at < 40
    assert read_checkpoint(run / "checkpoint.pt")["progress"].step == stopped_at
    assert not (run / "summary.json").exists()

    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run folder: {run} (resuming at step {stopped_at} of 40)\n")
    assert main([*args, "--name", "straight"]) == 0
    capsys.readouterr()
    straight = tmp_path / "runs" / "straight"
    resumed, reference = (json.loads((d / "summary.json").read_text()) for d in (run, straight))
    assert {k: resumed[k] for k in RESULT_KEYS} == {k: reference[k] for k in RESULT_KEYS}
    assert timeless(run) == timeless(straight)  # every step's loss: the same batches in order
    assert [r["step"] for r in read_log(run)] == list(range(1, 41))
    assert_same_final_state(run, straight)


def test_signal_handlers_are_restored_and_off_without_checkpoints(corpus: Path,
                                                                  tmp_path: Path) -> None:
    seen = []
    original = Trainer._after_step

    def spy(self, step, *args):
        seen.append(signal.getsignal(signal.SIGINT))
        return original(self, step, *args)

    config = {"data": str(corpus), "val_fraction": 0.3, "d_model": 32, "n_layers": 1,
              "n_heads": 2, "ffn_hidden": 64, "seq_len": 32, "batch_size": 4,
              "eval_batches": 2, "steps": 2, "optimizer": "torch-adamw", "threads": 1,
              "quiet": True, "out": str(tmp_path / "runs")}
    Trainer._after_step = spy
    try:
        train(config)
        train({**config, "checkpoint_every": 0})
    finally:
        Trainer._after_step = original
    assert seen[0] is not signal.default_int_handler  # caught while training
    assert seen[-1] is signal.default_int_handler  # checkpoints off: left alone
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_run_interrupted_survives_pickling() -> None:
    """A worker process sends the exception to its parent pickled."""
    import pickle

    from llmvalley.bench import RunInterrupted

    exc = pickle.loads(pickle.dumps(RunInterrupted(signal.SIGTERM, 7, 40, Path("runs/x"))))
    assert isinstance(exc, KeyboardInterrupt)
    assert (exc.signum, exc.step, exc.steps, exc.run_dir) == (signal.SIGTERM, 7, 40,
                                                              Path("runs/x"))
    assert str(exc).startswith("interrupted by SIGTERM at step 7 of 40; checkpoint saved")


# ----------------------------------------------------------------------------- bad --out
def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("valley train: error: "), err
    return err


@pytest.mark.parametrize("out, message", [
    ("a-file", "--out a-file: a-file is a file, not a folder"),
    ("a-file/runs", "--out a-file/runs: a-file is a file, so no folder can be made in it"),
])
def test_out_that_is_a_file(out: str, message: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("not a folder\n")
    assert main(["train", "--out", out]) == 2  # the default workload: stdlib, never read
    assert message in one_line_error(capsys)
    assert not (tmp_path / "cache").exists()  # said before the corpus is prepared
    assert (tmp_path / "a-file").read_text() == "not a folder\n"


def test_out_that_is_not_writable(tmp_path: Path, capsys) -> None:
    places = []
    if Path("/proc/self").is_dir():
        places.append("/proc/llmvalley-runs")  # unwritable even for root
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        places.append(str(locked / "runs"))
    if not places:
        pytest.skip("no unwritable folder on this machine")
    for out in places:
        assert main(["train", "--out", out]) == 2
        err = one_line_error(capsys)
        assert f"--out {out}: cannot write in " in err
    assert not (tmp_path / "cache").exists()


def test_out_error_from_python_before_the_corpus(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import llmvalley.bench.trainer as trainer

    def no_data(config):
        raise AssertionError("the corpus was read before the output folder was checked")

    monkeypatch.setattr(trainer, "load_workload", no_data)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        train({"out": str(tmp_path / "a-file")})
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "log.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="already exists; continue it with --resume"):
        train({"out": str(tmp_path / "runs"), "name": "taken"})


# ----------------------------------------------------------------------------- bad --resume
@pytest.fixture
def interrupted(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> Path:
    """A run killed at step 8 of 12 (checkpoints at 3 and 6), and a straight one for reference."""
    assert main([*small_args(corpus), "--name", "straight", "--quiet"]) == 0
    original = Trainer._after_step

    def crash(self, step, *args):
        original(self, step, *args)
        if step == 8:
            raise KeyboardInterrupt  # as a kill would: no checkpoint at step 8

    monkeypatch.setattr(Trainer, "_after_step", crash)
    assert main([*small_args(corpus), "--name", "cut", "--quiet"]) == 130
    monkeypatch.setattr(Trainer, "_after_step", original)
    capsys.readouterr()
    run = tmp_path / "runs" / "cut"
    assert read_checkpoint(run / "checkpoint.pt")["progress"].step == 6
    assert read_checkpoint(run / "checkpoint-previous.pt")["progress"].step == 3
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_names_the_file_and_the_last_good_one(damage: str, interrupted: Path,
                                                                 tmp_path: Path,
                                                                 capsys) -> None:
    run = interrupted
    path = run / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:len(data) // 2], "garbage": b"\x00junk" * 100,
                      "empty": b""}[damage])
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = one_line_error(capsys)
    assert f"{path} is truncated or corrupt" in err
    previous = run / "checkpoint-previous.pt"
    assert f"the last good checkpoint is {previous} (step 3): continue from it with --resume " \
           f"{previous}" in err
    assert snapshot(run) == before  # nothing lost: log, checkpoints and config untouched

    # the suggestion works, and the run ends as if never stopped
    assert main(["train", "--resume", str(previous), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(run)
    straight = tmp_path / "runs" / "straight"
    assert timeless(run) == timeless(straight)
    assert_same_final_state(run, straight)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (run, straight)]
    assert {k: summaries[0][k] for k in RESULT_KEYS} == {k: summaries[1][k] for k in RESULT_KEYS}
    # the good checkpoint resumed from was kept, not replaced by the corrupt one
    assert read_checkpoint(previous)["progress"].step >= 3


def test_no_good_checkpoint_at_all(interrupted: Path, capsys) -> None:
    run = interrupted
    for name in ("checkpoint.pt", "checkpoint-previous.pt"):
        (run / name).write_bytes(b"PK\x03\x04 cut short")
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = one_line_error(capsys)
    assert f"{run / 'checkpoint.pt'} is truncated or corrupt" in err
    assert f"no other checkpoint in {run} loads" in err
    assert snapshot(run) == before


def test_missing_checkpoint_suggests_the_previous_one(interrupted: Path, capsys) -> None:
    run = interrupted
    (run / "checkpoint.pt").unlink()
    assert main(["train", "--resume", str(run)]) == 2
    err = one_line_error(capsys)
    assert "no checkpoint.pt there" in err
    assert f"the last good checkpoint is {run / 'checkpoint-previous.pt'} (step 3)" in err


def test_not_a_checkpoint(interrupted: Path, capsys) -> None:
    path = interrupted / "checkpoint.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    assert main(["train", "--resume", str(interrupted)]) == 2
    assert f"{path} is not a valley train checkpoint" in one_line_error(capsys)


def test_finished_run_is_not_resumed_and_its_summary_kept(interrupted: Path, tmp_path: Path,
                                                          capsys) -> None:
    done = tmp_path / "runs" / "straight"
    before = snapshot(done)
    assert main(["train", "--resume", str(done)]) == 2
    assert "the run has already finished (completed at step 12)" in one_line_error(capsys)
    with pytest.raises(UsageError, match="already finished"):
        train(None, resume=done)
    assert snapshot(done) == before


def test_peak_memory_of_earlier_segments_is_kept(interrupted: Path, capsys) -> None:
    path = interrupted / "checkpoint.pt"
    state = read_checkpoint(path)
    state["progress"].peak_memory_bytes = 10**15  # the first segment's peak: far above ours
    torch.save(state, path)
    assert main(["train", "--resume", str(interrupted), "--quiet"]) == 0
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["peak_memory_bytes"] == 10**15
