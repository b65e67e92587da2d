"""The training loop: schedules, metrics, run records, resume equivalence and divergence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llmvalley.bench import TrainConfig, Trainer, coerce_config, lr_multiplier, train
from llmvalley.bench.metrics import SpikeCounter, divergence_reason, tensor_state_bytes
from llmvalley.bench.records import read_log
from llmvalley.cli import UsageError

pytestmark = pytest.mark.usefixtures("private_cache")


def small(corpus: Path, tmp_path: Path, **overrides) -> dict:
    """A seconds-long run: a 1-layer width-32 model on the toy corpus."""
    config = dict(data=str(corpus), val_fraction=0.25, model="nano", d_model=32, n_layers=1,
                  n_heads=2, ffn_hidden=64, seq_len=32, batch_size=4, eval_batches=2,
                  eval_every=5, log_every=2, steps=10, optimizer="torch-adamw", lr=3e-3,
                  progress=False, quiet=True, threads=1, out=str(tmp_path / "runs"))
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------- schedules
def schedule(kind: str, total: int = 100, warmup: int = 10, **kw) -> list[float]:
    return [lr_multiplier(s, total_steps=total, warmup_steps=warmup, schedule=kind, **kw)
            for s in range(total)]


def test_warmup_is_linear_for_every_schedule() -> None:
    for kind in ("cosine", "wsd", "linear", "constant"):
        values = schedule(kind)
        assert values[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
        assert values[10] == pytest.approx(1.0)


def test_cosine_and_linear_end_at_the_floor() -> None:
    cos = schedule("cosine", min_ratio=0.1)
    assert cos[-1] == pytest.approx(0.1) and min(cos) == pytest.approx(0.1)
    assert cos[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))  # monotone after warmup
    lin = schedule("linear", min_ratio=0.0)
    assert lin[-1] == pytest.approx(0.0)
    assert np.allclose(np.diff(lin[10:]), -1 / 89)


def test_wsd_is_stable_then_decays() -> None:
    values = schedule("wsd", min_ratio=0.0, decay_fraction=0.2)
    assert values[10:80] == pytest.approx([1.0] * 70)
    assert values[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(values[80:], values[81:]))


def test_constant_and_no_warmup() -> None:
    assert schedule("constant", warmup=0) == [1.0] * 100
    assert schedule("cosine", warmup=0)[0] == pytest.approx(1.0)


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError):
        lr_multiplier(0, total_steps=10, warmup_steps=0, schedule="step")


# ----------------------------------------------------------------------------- metrics
def test_spike_counter_counts_events_not_steps() -> None:
    counter = SpikeCounter(window=20, k=6)
    rng = np.random.default_rng(0)
    losses = list(3.0 + 0.01 * rng.standard_normal(100))
    losses[50] = losses[51] = 4.0  # one event spanning two steps
    losses[80] = 3.5
    flags = [counter.update(step, loss) for step, loss in enumerate(losses, start=1)]
    assert counter.count == 2 and counter.steps == [51, 81]
    assert sum(flags) == 3
    assert not any(flags[:20])  # nothing before the window is full


def test_spike_counter_ignores_a_falling_loss() -> None:
    counter = SpikeCounter()
    for step, loss in enumerate(np.linspace(5.0, 1.0, 300), start=1):
        counter.update(step, float(loss))
    assert counter.count == 0


def test_divergence_rules() -> None:
    assert "non-finite loss" in divergence_reason(3, math.nan, 1.0, 5.0, 10, [5.0])
    assert "non-finite gradient" in divergence_reason(3, 4.0, math.inf, 5.0, 10, [4.0])
    assert divergence_reason(5, 9.0, 1.0, 5.0, 10, [9.0]) is None  # still warming up
    assert "above the initial loss" in divergence_reason(11, 9.0, 1.0, 5.0, 10, [5.0, 9.0])
    # batch noise around the initial loss of a run that is not learning yet is no divergence
    assert divergence_reason(11, 5.1, 1.0, 5.0, 10, [4.9, 5.1]) is None
    # only the last 10 losses count
    assert divergence_reason(30, 5.0, 1.0, 5.0, 10, [9.0] * 5 + [5.0] * 10) is None


# ----------------------------------------------------------------------------- runs
def test_run_folder_records(corpus: Path, tmp_path: Path) -> None:
    summary = train(small(corpus, tmp_path, name="rec"))
    run = Path(summary["run_dir"])
    assert run == tmp_path / "runs" / "rec"
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["lr"] == 3e-3 and saved["resolved"]["steps"] == 10
    assert saved["resolved"]["model"]["vocab_size"] == 256
    log = read_log(run)
    assert [r["step"] for r in log] == [2, 4, 5, 6, 8, 10]
    keys = {"step", "tokens", "train_loss", "lr", "grad_norm", "time_fwd_bwd_s",
            "time_optimizer_s", "tokens_per_s", "peak_memory_bytes", "state_bytes"}
    assert all(keys <= set(r) for r in log)
    assert {"val_loss", "val_ppl", "val_bpb"} <= set(log[2]) and "val_loss" not in log[1]
    assert log[-1]["tokens"] == 10 * 4 * 32
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["status"] == "completed" and not summary["diverged"]
    assert summary["tokens"] == 1280 and summary["steps"] == 10
    assert summary["final_val_loss"] < math.log(256)
    assert summary["final_val_ppl"] == pytest.approx(math.exp(summary["final_val_loss"]))
    assert summary["best_val_loss"] <= summary["final_val_loss"]
    assert summary["final_val_bpb"] > 0 and summary["unigram_entropy"] > 0
    assert summary["loss_spikes"] == 0 and "MAD" in summary["spike_rule"]
    assert 0 < summary["optimizer_share"] < 1 and summary["peak_memory_bytes"] > 0


def test_optimizer_compile_time_is_reported_apart(corpus: Path, tmp_path: Path) -> None:
    """A compiled optimizer step (``implementation="compiled"``, or ``"auto"`` once it
    switches) spends seconds compiling once: that time is ``optimizer_compile_s``, not part
    of the optimizer's share of the steady step (``train_time_s`` excludes it,
    ``wall_clock_s`` includes it)."""
    plain = train(small(corpus, tmp_path, name="eager", optimizer="lion", steps=4))
    assert plain["optimizer_compile_s"] == 0
    summary = train(small(corpus, tmp_path, name="compiled", optimizer="lion", steps=4,
                          opt_args={"implementation": "compiled"}))
    assert summary["optimizer_compile_s"] > 0
    assert summary["train_time_s"] < summary["wall_clock_s"] - summary["optimizer_compile_s"]
    assert 0 < summary["optimizer_share"] < 1


def test_torch_adamw_baseline_and_state_bytes(corpus: Path, tmp_path: Path) -> None:
    trainer = Trainer(coerce_config(small(corpus, tmp_path, steps=2, weight_decay=0.1)))
    opt = trainer.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    decays = {p.dim() >= 2: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {True: 0.1, False: 0.0}
    summary = trainer.run()
    n = trainer.model.num_parameters()
    assert summary["state_bytes"] == tensor_state_bytes(opt) >= 8 * n


def test_registry_optimizer(corpus: Path, tmp_path: Path) -> None:
    llmvalley = pytest.importorskip("llmvalley")
    if not hasattr(llmvalley, "create_optimizer"):
        pytest.skip("optimizer registry not available")
    summary = train(small(corpus, tmp_path, optimizer="adamw", steps=4,
                          opt_args={"betas": (0.9, 0.95)}))
    assert summary["status"] == "completed" and summary["state_bytes"] > 0


def test_clipping_norm_replaces_the_optimizers_screen(corpus: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import llmvalley.optim.shell as shell

    calls = []
    monkeypatch.setattr(shell, "screen_finite", lambda grads: calls.append(1) or True)
    summary = train(small(corpus, tmp_path, optimizer="adamw", steps=3))
    assert summary["status"] == "completed" and calls == []


def test_token_budget_and_grad_accumulation(corpus: Path, tmp_path: Path) -> None:
    summary = train(small(corpus, tmp_path, steps=None, tokens=700, grad_accum=2,
                          eval_every=100))
    assert summary["steps"] == 3  # ceil(700 / (4 * 2 * 32))
    assert summary["tokens"] == 3 * 256


def test_same_seed_same_run_other_seed_other_run(corpus: Path, tmp_path: Path) -> None:
    a = train(small(corpus, tmp_path, steps=4))
    b = train(small(corpus, tmp_path, steps=4))
    c = train(small(corpus, tmp_path, steps=4, seed=1))
    losses = [[r["train_loss"] for r in read_log(s["run_dir"])] for s in (a, b, c)]
    assert losses[0] == losses[1] != losses[2]


def test_resume_is_bit_identical(corpus: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = small(corpus, tmp_path, steps=12, checkpoint_every=4, eval_every=6, log_every=3)
    straight = train({**config, "name": "straight"})

    original = Trainer._after_step

    def crash_after_step_6(self, step, *args):
        original(self, step, *args)
        if step == 6:  # checkpoint at 4; steps 5-6 must be redone after the resume
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_after_step", crash_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        train({**config, "name": "interrupted"})
    monkeypatch.setattr(Trainer, "_after_step", original)
    resumed = train(None, resume=tmp_path / "runs" / "interrupted")

    a = torch.load(Path(straight["run_dir"]) / "checkpoint.pt", weights_only=False)
    b = torch.load(Path(resumed["run_dir"]) / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(state_a[i][k], state_b[i][k]) for i in state_a for k in state_a[i])
    drop = ("time_", "tokens_per_s", "optimizer_share", "peak_memory", "elapsed")
    strip = [[{k: v for k, v in r.items() if not k.startswith(drop)}
              for r in read_log(s["run_dir"])] for s in (straight, resumed)]
    assert strip[0] == strip[1]
    for key in ("final_val_loss", "best_val_loss", "final_train_loss", "loss_spikes",
                "max_grad_norm", "steps", "tokens"):
        assert straight[key] == resumed[key]


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no checkpoint.pt"):
        train(None, resume=tmp_path)


def test_divergence_ends_cleanly_with_a_record(corpus: Path, tmp_path: Path) -> None:
    summary = train(small(corpus, tmp_path, lr=1e6, warmup_steps=0, steps=30, name="boom"))
    assert summary["status"] == "diverged" and summary["diverged"]
    assert 1 < summary["diverged_step"] <= 30 and summary["diverged_reason"]
    assert summary["final_val_loss"] is None and summary["steps"] == summary["diverged_step"] - 1
    on_disk = json.loads((tmp_path / "runs" / "boom" / "summary.json").read_text())
    assert on_disk["diverged"] is True
    last = read_log(tmp_path / "runs" / "boom")[-1]
    assert last["diverged"] is True and last["step"] == summary["diverged_step"]


def test_nan_loss_is_divergence(corpus: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    original = Trainer.train_step

    def poisoned(self, step):
        loss, grad, times = original(self, step)
        return (math.nan if step == 3 else loss), grad, times

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    summary = train(small(corpus, tmp_path))
    assert summary["diverged_step"] == 4 and "non-finite loss" in summary["diverged_reason"]
    assert summary["best_val_loss"] is None  # no evaluation happened before step 5


def test_config_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="--lr"):
        coerce_config({"lr": "fast"})
    with pytest.raises(UsageError, match="not both"):
        coerce_config({"steps": 10, "tokens": 1000})
    with pytest.raises(UsageError, match="unknown config keys: colour"):
        coerce_config({"colour": "blue"})
    assert coerce_config({"tokens": "2e6"}).tokens == 2_000_000
    assert coerce_config({"opt_args": ["betas=0.9,0.95", "eps=1e-8", "nesterov=true"]}
                         ).opt_args == {"betas": (0.9, 0.95), "eps": 1e-8, "nesterov": True}
    assert TrainConfig().optimizer == "adamw" and TrainConfig().model == "nano"
