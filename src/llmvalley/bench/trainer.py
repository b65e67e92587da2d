"""The training loop behind ``valley train`` and :func:`llmvalley.bench.train`.

One update = ``grad_accum`` micro-batches (forward + backward), gradient clipping, then the
optimizer step. Each update is timed in three parts: data (batch gathering), forward/backward
(clipping included) and the optimizer step; on CUDA the device is synchronised around them so
the split is real. Evaluation and checkpoint time is kept out of tokens/s.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmvalley.bench.config import TrainConfig, coerce_config
from llmvalley.bench.metrics import (
    DIVERGENCE_WINDOW,
    SPIKE_K,
    SPIKE_WINDOW,
    SpikeCounter,
    bits_per_byte,
    divergence_reason,
    optimizer_state_bytes,
    peak_memory_bytes,
    perplexity,
)
from llmvalley.bench.optimizers import PEER_BASELINE, build_optimizer
from llmvalley.bench.records import (
    CHECKPOINT_FILE,
    COMMAND_FILE,
    CONFIG_FILE,
    SUMMARY_FILE,
    RunLog,
    load_checkpoint,
    new_run_dir,
    save_checkpoint,
    write_json,
)
from llmvalley.bench.schedules import lr_multiplier
from llmvalley.bench.setup import Budget, Workload, load_workload, plan_budget, resolve_device
from llmvalley.cli import UsageError
from llmvalley.data import train_batch
from llmvalley.models import Llama, build_model

SPIKE_RULE = (f"train loss above median + {SPIKE_K:g} * MAD of the previous {SPIKE_WINDOW} "
              "losses (MAD floored at 0.1% of the median); consecutive spiking steps count once")


@dataclass
class Interval:
    """Sums over the steps since the last log record."""

    steps: int = 0
    loss: float = 0.0
    data_s: float = 0.0
    fwd_bwd_s: float = 0.0
    optimizer_s: float = 0.0

    @property
    def step_s(self) -> float:
        return self.data_s + self.fwd_bwd_s + self.optimizer_s


@dataclass
class Progress:
    """Everything about a run's history that a checkpoint must carry for an exact resume."""

    step: int = 0
    initial_loss: float | None = None
    best_val: float = math.inf
    best_val_step: int | None = None
    last_val: float | None = None
    max_grad_norm: float = 0.0
    recent_losses: list[float] = field(default_factory=list)  # for the divergence rule
    last_train_loss: float | None = None
    train_time_s: float = 0.0  # data + forward/backward + optimizer, summed over steps
    fwd_bwd_s: float = 0.0
    optimizer_s: float = 0.0
    elapsed_s: float = 0.0  # wall-clock of earlier segments of a resumed run
    interval: Interval = field(default_factory=Interval)


class Trainer:
    """One run: model, optimizer, data, records; :meth:`run` trains and returns the summary."""

    def __init__(self, config: TrainConfig, *, run_dir: Path | None = None,
                 resume: bool = False, command: str | None = None) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device, self.precision = resolve_device(config)
        self.work: Workload = load_workload(config)
        self.budget: Budget = plan_budget(config, self.work.seq_len)
        torch.manual_seed(config.seed)  # same initial weights for every optimizer
        self.model: Llama = build_model(self.work.model_config, self.device)
        self.optimizer = build_optimizer(
            config.optimizer, self.model, lr=config.lr, weight_decay=config.weight_decay,
            opt_args=config.opt_args, fallback_args=config.fallback_args)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", float(group["lr"]))
        self.progress = Progress()
        self.spikes = SpikeCounter()
        if resume:
            assert run_dir is not None
            self.run_dir = run_dir
            self._load(load_checkpoint(run_dir))
        else:
            default_name = f"{config.model}-{config.optimizer}-lr{config.lr:g}-s{config.seed}"
            self.run_dir = run_dir or new_run_dir(config.out, config.name, default_name)
            write_json(self.run_dir / CONFIG_FILE,
                       {"config": config.to_dict(), "resolved": self.resolved()})
            if command:
                (self.run_dir / COMMAND_FILE).write_text(command + "\n")
        self.log = RunLog(self.run_dir, resume_step=self.progress.step if resume else None)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.eval_set = [(x.to(self.device), y.to(self.device)) for x, y in self.work.eval_set]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    # ----------------------------------------------------------------- description
    def resolved(self) -> dict[str, Any]:
        """What the options resolved to, for ``config.json``."""
        return {
            "corpus": self.work.corpus_name,
            "tokenizer": self.work.tokenizer.name,
            "tokenizer_key": self.work.tokenizer.key,
            "model": self.work.model_config.to_dict(),
            "n_params": self.model.num_parameters(),
            "steps": self.budget.steps,
            "warmup_steps": self.budget.warmup_steps,
            "tokens_per_step": self.budget.tokens_per_step,
            "tokens": self.budget.tokens,
            "train_tokens_available": self.work.train.n_tokens,
            "eval_tokens": sum(y.numel() for _, y in self.work.eval_set),
            "device": str(self.device),
            "precision": self.precision,
            "optimizer_class": type(self.optimizer).__name__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "spike_rule": SPIKE_RULE,
        }

    # ----------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": self.progress,
            "spikes": self.spikes.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = state["progress"]
        self.spikes.load_state_dict(state["spikes"])
        torch.set_rng_state(state["torch_rng"])

    # ----------------------------------------------------------------- steps
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> tuple[float, float, tuple[float, float, float]]:
        """Forward/backward over the micro-batches of update ``step`` (0-based) and clip.

        Returns the mean loss, the gradient norm (before clipping) and the data and
        forward/backward times; the optimizer step is taken by :meth:`optimizer_step`.
        """
        cfg = self.config
        t0 = time.perf_counter()
        batches = [train_batch(self.work.train.tokens, seed=cfg.seed, step=step, micro=m,
                               batch_size=cfg.batch_size, seq_len=self.work.seq_len)
                   for m in range(cfg.grad_accum)]
        batches = [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                   for x, y in batches]
        t1 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        for x, y in batches:
            with self._autocast():
                loss = self.forward(x, y)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        loss_value = loss_sum.item() / cfg.grad_accum
        grad_value = float(grad_norm)
        self._sync()
        t2 = time.perf_counter()
        return loss_value, grad_value, (t1 - t0, t2 - t1, 0.0)

    def optimizer_step(self, step: int) -> tuple[float, float]:
        """Set the scheduled learning rates and take the optimizer step; returns (lr, seconds)."""
        t0 = time.perf_counter()
        factor = lr_multiplier(step, total_steps=self.budget.steps,
                               warmup_steps=self.budget.warmup_steps,
                               schedule=self.config.schedule,
                               min_ratio=self.config.min_lr_ratio,
                               decay_fraction=self.config.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        return self.config.lr * factor, time.perf_counter() - t0

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss (nats per token) over the fixed held-out set."""
        self.model.eval()
        total, count = 0.0, 0
        for x, y in self.eval_set:
            with self._autocast():
                loss = self.forward(x, y)
            total += loss.item() * y.numel()
            count += y.numel()
        self.model.train()
        return total / count

    # ----------------------------------------------------------------- records
    def val_metrics(self, loss: float) -> dict[str, float]:
        tpb = self.work.val.tokens_per_byte
        return {"val_loss": loss, "val_ppl": perplexity(loss), "val_bpb": bits_per_byte(loss, tpb)}

    def log_record(self, step: int, lr: float, grad_norm: float,
                   val_loss: float | None) -> dict[str, Any]:
        iv = self.progress.interval
        n = max(iv.steps, 1)
        record: dict[str, Any] = {
            "step": step,
            "tokens": step * self.budget.tokens_per_step,
            "train_loss": iv.loss / n,
            "lr": lr,
            "grad_norm": grad_norm,
            "time_data_s": iv.data_s / n,
            "time_fwd_bwd_s": iv.fwd_bwd_s / n,
            "time_optimizer_s": iv.optimizer_s / n,
            "optimizer_share": iv.optimizer_s / iv.step_s if iv.step_s > 0 else None,
            "tokens_per_s": iv.steps * self.budget.tokens_per_step / iv.step_s
            if iv.step_s > 0 else None,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "state_bytes": self.state_bytes(),
            "elapsed_s": self.progress.elapsed_s + time.perf_counter() - self._segment_start,
        }
        if val_loss is not None:
            record.update(self.val_metrics(val_loss))
        return record

    def state_bytes(self) -> int:
        return optimizer_state_bytes(self.optimizer,
                                     from_registry=self.config.optimizer != PEER_BASELINE)

    def summary(self, status: str, diverged_step: int | None, reason: str | None,
                final_val: float | None) -> dict[str, Any]:
        p = self.progress
        n_params = self.model.num_parameters()
        state_bytes = self.state_bytes()
        best = p.best_val if p.best_val_step is not None else None
        summary: dict[str, Any] = {
            "status": status,
            "run_dir": str(self.run_dir),
            "optimizer": self.config.optimizer,
            "model": self.config.model,
            "n_params": n_params,
            "corpus": self.work.corpus_name,
            "tokenizer": self.work.tokenizer.name,
            "steps": p.step,
            "planned_steps": self.budget.steps,
            "tokens": p.step * self.budget.tokens_per_step,
            "final_train_loss": p.last_train_loss,
            "final_val_loss": final_val,
            "final_val_ppl": perplexity(final_val) if final_val is not None else None,
            "final_val_bpb": bits_per_byte(final_val, self.work.val.tokens_per_byte)
            if final_val is not None else None,
            "best_val_loss": best,
            "best_val_ppl": perplexity(best) if best is not None else None,
            "best_val_bpb": bits_per_byte(best, self.work.val.tokens_per_byte)
            if best is not None else None,
            "best_val_step": p.best_val_step,
            "unigram_entropy": self.work.train.unigram_entropy,
            "val_unigram_entropy": self.work.val.unigram_entropy,
            "wall_clock_s": p.elapsed_s + time.perf_counter() - self._segment_start,
            "train_time_s": p.train_time_s,
            "tokens_per_s": p.step * self.budget.tokens_per_step / p.train_time_s
            if p.train_time_s > 0 else None,
            "optimizer_share": p.optimizer_s / p.train_time_s if p.train_time_s > 0 else None,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "state_bytes": state_bytes,
            "state_bytes_per_param": state_bytes / n_params,
            "loss_spikes": self.spikes.count,
            "spike_steps": self.spikes.steps,
            "spike_rule": SPIKE_RULE,
            "max_grad_norm": p.max_grad_norm,
            "diverged": status == "diverged",
            "diverged_step": diverged_step,
            "diverged_reason": reason,
        }
        write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary

    # ----------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        """Train to the end of the budget (or until divergence); returns the summary."""
        from tqdm.auto import tqdm

        cfg, p = self.config, self.progress
        self._segment_start = time.perf_counter()
        self.model.train()
        bar = tqdm(total=self.budget.steps, initial=p.step, unit="step", dynamic_ncols=True,
                   desc=f"{cfg.model} {cfg.optimizer}", disable=cfg.quiet or not cfg.progress,
                   file=sys.stderr)
        status, diverged_step, reason = "completed", None, None
        try:
            while p.step < self.budget.steps:
                index = p.step  # 0-based index of this update
                loss, grad_norm, (data_s, fwd_bwd_s, _) = self.train_step(index)
                step = index + 1
                if p.initial_loss is None:
                    p.initial_loss = loss
                p.recent_losses = [*p.recent_losses, loss][-DIVERGENCE_WINDOW:]
                reason = divergence_reason(step, loss, grad_norm, p.initial_loss,
                                           self.budget.warmup_steps, p.recent_losses)
                if reason is not None:
                    status, diverged_step = "diverged", step
                    record = self.log_record(step, math.nan, grad_norm, None)
                    record.update({"train_loss": loss, "diverged": True, "reason": reason})
                    self.log.write(record)
                    break
                lr, optimizer_s = self.optimizer_step(index)
                p.step = step
                self._account(loss, grad_norm, data_s, fwd_bwd_s, optimizer_s)
                bar.update(1)
                self._after_step(step, lr, grad_norm, bar)
        finally:
            bar.close()
            self.log.close()
        final_val = p.last_val if status == "completed" else None
        return self.summary(status, diverged_step, reason, final_val)

    def _account(self, loss: float, grad_norm: float, data_s: float, fwd_bwd_s: float,
                 optimizer_s: float) -> None:
        p, iv = self.progress, self.progress.interval
        p.last_train_loss = loss
        p.max_grad_norm = max(p.max_grad_norm, grad_norm)
        p.train_time_s += data_s + fwd_bwd_s + optimizer_s
        p.fwd_bwd_s += fwd_bwd_s
        p.optimizer_s += optimizer_s
        iv.steps += 1
        iv.loss += loss
        iv.data_s += data_s
        iv.fwd_bwd_s += fwd_bwd_s
        iv.optimizer_s += optimizer_s
        self.spikes.update(p.step, loss)

    def _after_step(self, step: int, lr: float, grad_norm: float, bar: Any) -> None:
        cfg, p = self.config, self.progress
        last = step == self.budget.steps
        val_loss = None
        if step % cfg.eval_every == 0 or last:
            val_loss = self.evaluate()
            p.last_val = val_loss
            if val_loss < p.best_val:
                p.best_val, p.best_val_step = val_loss, step
        if step % cfg.log_every == 0 or val_loss is not None:
            record = self.log_record(step, lr, grad_norm, val_loss)
            self.log.write(record)
            postfix = {"loss": f"{record['train_loss']:.3f}"}
            if record["tokens_per_s"]:
                postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
            if p.last_val is not None:
                postfix["val"] = f"{p.last_val:.3f}"
            bar.set_postfix(postfix, refresh=False)
            p.interval = Interval()
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or last):
            p.elapsed_s += time.perf_counter() - self._segment_start
            self._segment_start = time.perf_counter()
            save_checkpoint(self.run_dir, self._state())


def train(config: TrainConfig | dict[str, Any] | None = None, *,
          resume: str | Path | None = None, command: str | None = None) -> dict[str, Any]:
    """Train one run and return its summary (also written to the run folder's summary.json).

    ``config`` is a :class:`TrainConfig` or a dict of its fields. With ``resume`` (a run folder
    holding a checkpoint) the run continues from its latest checkpoint with its saved config;
    only ``quiet``, ``progress`` and ``threads`` are taken from ``config`` then.
    """
    if isinstance(config, dict):
        config = coerce_config(config)
    if resume is None:
        return Trainer(config or TrainConfig(), command=command).run()
    run_dir = Path(resume)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise UsageError(f"--resume {run_dir}: no {CHECKPOINT_FILE} there (checkpoints are "
                         "written with --checkpoint-every N)")
    saved = json.loads((run_dir / CONFIG_FILE).read_text())["config"]
    if config is not None:
        saved.update(quiet=config.quiet, progress=config.progress, threads=config.threads)
    return Trainer(coerce_config(saved), run_dir=run_dir, resume=True).run()
