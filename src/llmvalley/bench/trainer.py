"""The training loop behind ``valley train`` and :func:`llmvalley.bench.train`.

One update = ``grad_accum`` micro-batches (forward + backward), gradient clipping, then the
optimizer step. Each update is timed in three parts: data (batch gathering), forward/backward
(clipping included) and the optimizer step; on CUDA the device is synchronised around them so
the split is real. Evaluation and checkpoint time is kept out of tokens/s.

Methods that need more than gradients get it here, through the optimizer's protocol
(:class:`~llmvalley.optim.shell.ChainOptimizer`): the step's loss (``step(loss=...)``, MoMo);
the evaluation iterate (``optimizer.eval()`` around every evaluation and checkpoint, then
``optimizer.train()``, schedule-free); and curvature estimates on the method's schedule
(``optimizer.curvature_request()``: a ``create_graph=True`` backward for Hessian-vector
products before the step, AdaHessian and Sophia-H; or, after the step, a backward of the loss
on labels sampled from the model, Sophia-G). Their extra forward/backward time counts in the
forward/backward time.

Checkpoints are written every ``checkpoint_every`` steps, at the end, and when SIGINT or SIGTERM
arrives: the signal is noted, the step under way finishes, the checkpoint is written and
:class:`RunInterrupted` (a ``KeyboardInterrupt``) is raised, so ``--resume`` continues the run
exactly; a second signal acts at once.

Under ``torchrun`` with ``parallel="ddp"`` or ``"fsdp"`` (:mod:`llmvalley.bench.distributed`)
each rank trains on its slice of the same global batch; losses, gradient norms and evaluations
are global, only rank 0 writes the run folder and prints, and checkpoints are DCP folders that
any number of ranks (one process without ``--parallel`` included) can resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmvalley.bench.config import TrainConfig, coerce_config
from llmvalley.bench.distributed import (
    DEFAULT_DIST_TIMEOUT_S,
    Parallel,
    load_dcp,
    load_full,
    save_dcp,
)
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
    DCP_CHECKPOINT,
    DCP_LOOP_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    PREVIOUS_DCP_CHECKPOINT,
    SUMMARY_FILE,
    CheckpointError,
    RunLog,
    check_output_folder,
    check_writable_folder,
    checkpoint_step,
    first_sentence,
    is_dcp_checkpoint,
    latest_checkpoint,
    new_run_dir,
    read_checkpoint,
    rotate_dcp,
    save_checkpoint,
    write_json,
)
from llmvalley.bench.schedules import lr_multiplier
from llmvalley.bench.setup import Budget, Workload, load_workload, plan_budget, resolve_device
from llmvalley.cli import UsageError
from llmvalley.data import cache_root, train_batch
from llmvalley.data.heldout import ShiftedEval, load_shifted_eval, shifted_batches
from llmvalley.models import Llama, build_model
from llmvalley.optim.shell import ChainOptimizer

#: signals that stop a run at the end of the step under way, after writing a checkpoint
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _NoLog:
    """The log of ranks other than 0: they write nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after its checkpoint was written."""

    def __init__(self, signum: int, step: int, steps: int, run_dir: Path) -> None:
        self.signum, self.step, self.steps, self.run_dir = signum, step, steps, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at step {step} of {steps}; checkpoint saved; "
                         f"continue with: valley train --resume {run_dir}")

    def __reduce__(self) -> tuple:  # picklable: worker processes send it to their parent
        return type(self), (self.signum, self.step, self.steps, self.run_dir)


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
    # the highest peak memory of earlier segments (a class default, so checkpoints written
    # before this field existed still load)
    peak_memory_bytes: int = 0
    # seconds the optimizer spent compiling its step (implementation="auto" switching to the
    # compiled tier, or "compiled"): kept out of optimizer_s and train_time_s, which measure
    # the steady step; wall_clock_s includes it
    compile_s: float = 0.0


class Trainer:
    """One run: model, optimizer, data, records; :meth:`run` trains and returns the summary."""

    def __init__(self, config: TrainConfig, *, run_dir: Path | None = None,
                 resume: bool = False, command: str | None = None,
                 checkpoint: dict[str, Any] | None = None, checkpoint_path: Path | None = None,
                 on_start: Callable[[Trainer], None] | None = None,
                 handle_signals: bool = True, parallel: Parallel | None = None) -> None:
        """``resume``: continue ``run_dir`` from ``checkpoint`` (already read from
        ``checkpoint_path``; default: the folder's ``checkpoint.pt``). ``on_start`` is called
        with the trainer when training starts (the run folder exists then). ``handle_signals``:
        turn SIGINT and SIGTERM into a checkpoint and :class:`RunInterrupted` while
        :meth:`run` trains (main thread only, when checkpoints are on and the signals have
        their default handlers). ``parallel``: this process's part in a ``torchrun`` run
        (its process group already formed; default: one process)."""
        self.config = config
        self.par = parallel or Parallel()
        self.on_start = on_start
        self.handle_signals = handle_signals
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device, self.precision = resolve_device(config)
        self.device = self.par.place(self.device)
        if not resume and run_dir is None:  # before the corpus is read, which can take minutes
            check_output_folder(config.out, config.name)
        check_optimizer_name(config.optimizer)
        self.par.check_batch(config.batch_size)
        with self.par.loading_lock(cache_root()):  # ranks fill the token cache one at a time
            self.work: Workload = load_workload(config)
        self.budget: Budget = plan_budget(config, self.work.seq_len)
        torch.manual_seed(config.seed)  # same initial weights for every optimizer
        self.model: Llama = build_model(self.work.model_config, self.device)
        # DDP wrapper or FSDP2 sharding (in place) before the optimizer sees the parameters
        self.wrapped = self.par.wrap(self.model, self.device)
        self.optimizer = build_optimizer(
            config.optimizer, self.model, lr=config.lr, weight_decay=config.weight_decay,
            opt_args=self._run_length_args(config), fallback_args=config.fallback_args)
        problem = getattr(self.optimizer, "sharding_problem", lambda: None)()
        if problem is not None:  # said before any step, in one line
            raise UsageError(f"--parallel {self.par.mode}: {problem}")
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", float(group["lr"]))
            # Sophia-G's batch size B (tokens per step), unless the user set it
            if "bs" in group and "bs" not in (config.opt_args or {}):
                group["bs"] = self.budget.tokens_per_step
        self.progress = Progress()
        self.spikes = SpikeCounter()
        # whether checkpoint.pt is known to be good: then a new checkpoint keeps it as
        # checkpoint-previous.pt (a corrupt one is overwritten, and the previous one kept)
        self._checkpoint_good = True
        self._saved_step: int | None = None
        self._stop_signal: int | None = None
        self._loss: torch.Tensor | None = None  # the last step's mean loss (for step(loss=))
        self._grad_norm: float | None = None  # the last step's global gradient norm
        self._stop_agreed = False  # parallel: whether any rank had a stop signal at the step
        if resume:
            assert run_dir is not None
            self.run_dir = run_dir
            path = checkpoint_path or run_dir / CHECKPOINT_FILE
            if checkpoint is None:
                try:
                    checkpoint = read_checkpoint(path)
                except CheckpointError as exc:
                    raise UsageError(f"--resume: {exc}") from None
            self._load(checkpoint, path)
            self._checkpoint_good = path.name in (CHECKPOINT_FILE, DCP_CHECKPOINT)
            self._saved_step = self.progress.step
        else:
            default_name = f"{config.model}-{config.optimizer}-lr{config.lr:g}-s{config.seed}"
            self.run_dir = run_dir or self.par.on_main(new_run_dir, config.out, config.name,
                                                       default_name)
            if self.par.is_main:
                write_json(self.run_dir / CONFIG_FILE,
                           {"config": config.to_dict(), "resolved": self.resolved()})
                if command:
                    (self.run_dir / COMMAND_FILE).write_text(command + "\n")
        self.log = RunLog(self.run_dir, resume_step=self.progress.step if resume else None) \
            if self.par.is_main else _NoLog()
        self.forward = torch.compile(self.wrapped) if config.compile else self.wrapped
        self.eval_set = [(x.to(self.device), y.to(self.device)) for x, y in self.work.eval_set]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    # ----------------------------------------------------------------- description
    def _run_length_args(self, config: TrainConfig) -> dict[str, Any] | None:
        """The user's optimizer arguments, plus the run's length for methods with a schedule
        of their own (Ranger21's ``total_steps``) unless the user gave it."""
        from llmvalley.optim.registry import get_spec

        args = dict(config.opt_args or {})
        if config.optimizer != PEER_BASELINE and "total_steps" not in args:
            try:
                if "total_steps" in get_spec(config.optimizer).defaults:
                    args["total_steps"] = self.budget.steps
            except (KeyError, ValueError):
                pass  # an unknown name is reported by build_optimizer
        return args or config.opt_args

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
            "parallel": self.par.mode,
            "world_size": self.par.world_size,
            "spike_rule": SPIKE_RULE,
        }

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """Write the checkpoint of the current step (the one it replaces is kept as
        ``checkpoint-previous.pt`` when it was good)."""
        p = self.progress
        p.elapsed_s += time.perf_counter() - self._segment_start
        self._segment_start = time.perf_counter()
        p.peak_memory_bytes = self.peak_memory()
        with self.eval_weights():  # schedule-free: the checkpoint holds the evaluated weights
            if self.par.active:
                self._save_dcp()
            else:
                save_checkpoint(self.run_dir, self._state(), keep_previous=self._checkpoint_good)
        self._checkpoint_good = True
        self._saved_step = p.step

    def peak_memory(self) -> int:
        """Peak memory of the whole run: this process's and earlier segments' of a resume."""
        return max(peak_memory_bytes(self.device), self.progress.peak_memory_bytes)

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": self.progress,
            "spikes": self.spikes.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def _save_dcp(self) -> None:
        """Every rank writes its shards to ``checkpoint.dcp.tmp``; rank 0 adds the loop state
        and renames it ``checkpoint.dcp`` (the one it replaces kept as the previous one)."""
        tmp = self.run_dir / (DCP_CHECKPOINT + ".tmp")
        save_dcp(tmp, self.model, self.optimizer, self.par)
        if self.par.is_main:
            loop = {k: v for k, v in self._state().items() if k not in ("model", "optimizer")}
            loop.update(parallel=self.par.mode, world_size=self.par.world_size)
            torch.save(loop, tmp / DCP_LOOP_FILE)
            rotate_dcp(self.run_dir, tmp, keep_previous=self._checkpoint_good)
        self.par.barrier()

    def _load(self, state: dict[str, Any], path: Path) -> None:
        try:
            if "dcp" in state:  # written under --parallel, by any number of ranks
                load_dcp(state["dcp"], self.model, self.optimizer)
            elif self.par.active:  # written by one process: full tensors, sharded here
                load_full(self.model, self.optimizer, state["model"], state["optimizer"])
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UsageError(f"--resume: {path} does not match the run's {CONFIG_FILE} "
                             f"({first_sentence(exc)})") from None
        if hasattr(self.optimizer, "train"):
            self.optimizer.train()  # saved on the evaluation iterate: back to training
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
        forward/backward times; the optimizer step is taken by :meth:`optimizer_step`. When
        the method asks for Hessian-vector products at this step, the backward keeps its
        graph and the estimate is taken before clipping.
        """
        cfg = self.config
        t0 = time.perf_counter()
        batches = self._batches(step)
        t1 = time.perf_counter()
        hvp = self._curvature_request() == "hessian_vector"
        loss_sum = torch.zeros((), device=self.device)
        # Hessian-vector products differentiate the backward: only the math attention kernel
        # has a second derivative
        for x, y in batches:
            kernels = sdpa_kernel(SDPBackend.MATH) if hvp else contextlib.nullcontext()
            with self._autocast(), kernels:
                loss = self.forward(x, y)
            (loss / cfg.grad_accum).backward(create_graph=hvp)
            loss_sum += loss.detach()
        if hvp:
            self.optimizer.update_curvature()  # which detaches the gradients' graph
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self._loss = loss_sum / cfg.grad_accum
        loss_value = self._loss.item()
        grad_value = self.par.grad_norm(grad_norm)  # global under DDP and FSDP2 alike
        # clip_grad_norm_'s scaling, skipped where its factor would be exactly 1 (a pass over
        # the gradients saved) and where the norm is not finite: the optimizer's check then
        # names the parameter at fault instead of every gradient turned NaN by the factor
        if cfg.grad_clip > 0 and math.isfinite(grad_value) and grad_value + 1e-6 > cfg.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
        self._grad_norm = grad_value  # proves the gradients finite to the optimizer's check
        if self.par.active:  # the global batch's loss, and whether any rank was signalled
            loss_sum_all, stops = self.par.all_sum(
                [loss_value, float(self._stop_signal is not None)])
            loss_value = loss_sum_all / self.par.world_size
            self._loss = torch.tensor(loss_value, dtype=self._loss.dtype, device=self.device)
            self._stop_agreed = stops > 0
        self._sync()
        t2 = time.perf_counter()
        return loss_value, grad_value, (t1 - t0, t2 - t1, 0.0)

    def _batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.config
        batches = [train_batch(self.work.train.tokens, seed=cfg.seed, step=step, micro=m,
                               batch_size=cfg.batch_size, seq_len=self.work.seq_len)
                   for m in range(cfg.grad_accum)]
        rows = self.par.rows  # this rank's share of the global batch (all of it in one process)
        return [(rows(x).to(self.device, non_blocking=True),
                 rows(y).to(self.device, non_blocking=True)) for x, y in batches]

    def _curvature_request(self) -> str | None:
        request = getattr(self.optimizer, "curvature_request", None)
        return request() if request is not None else None

    def sampled_label_backward(self, step: int) -> float:
        """Sophia-G's Gauss-Newton-Bartlett estimate after update ``step`` (0-based): the
        loss on labels drawn from the model's own predictions for the step's batches,
        backpropagated into zeroed gradients and handed to the optimizer. The draw is seeded
        by (seed, step), so a resumed run draws the same labels. Returns the seconds taken."""
        cfg = self.config
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        generator = torch.Generator(device=self.device)
        # each rank draws for its own rows (rank 0's stream is the single-process one)
        generator.manual_seed(cfg.seed * 1_000_003 + step + 7_919_993 * self.par.rank)
        for x, _ in self._batches(step):
            with self._autocast():
                logits = self.forward(x)
            flat = logits.float().reshape(-1, logits.shape[-1])
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(flat, dim=-1), 1,
                                            generator=generator).view(-1)
            loss = torch.nn.functional.cross_entropy(flat, sampled)
            (loss / cfg.grad_accum).backward()
        self.optimizer.update_curvature()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        return time.perf_counter() - t0

    @contextlib.contextmanager
    def eval_weights(self):
        """The model on the optimizer's evaluation iterate (schedule-free's ``x``) inside the
        block; a no-op for methods without one."""
        switch = getattr(self.optimizer, "eval", None)
        if switch is None or not getattr(self.optimizer, "training", True):
            yield
            return
        switch()
        try:
            yield
        finally:
            self.optimizer.train()

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
        compiled_before = getattr(self.optimizer, "compile_seconds", 0.0)
        if isinstance(self.optimizer, ChainOptimizer):
            # the clipping norm stands in for the non-finite screen: no second gradient pass
            self.optimizer.step(loss=self._loss, grad_norm=self._grad_norm)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        seconds = time.perf_counter() - t0
        compiling = getattr(self.optimizer, "compile_seconds", 0.0) - compiled_before
        if compiling > 0:  # a one-time compile: reported apart from the step's time
            self.progress.compile_s += compiling
            seconds = max(seconds - compiling, 0.0)
        return self.config.lr * factor, seconds

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss (nats per token) over the fixed held-out set; the shifted corpus's mean
        loss (fewer batches; :mod:`llmvalley.data.heldout`) goes to ``self.shifted_val``."""
        self.model.eval()
        total, count = 0.0, 0.0
        for x, y in self.eval_set:  # under --parallel, each rank its share of every batch
            x, y, weight = self.par.eval_rows(x, y)
            with self._autocast():
                loss = self.forward(x, y)
            total += loss.item() * y.numel() * weight
            count += y.numel() * weight
        total, count = self.par.all_sum([total, count])
        shifted = self.shifted_eval()
        if shifted is not None:  # the same way, on the shifted corpus's windows
            parts = [0.0, 0.0]
            for x, y in shifted.batches:
                x, y, weight = self.par.eval_rows(x, y)
                with self._autocast():
                    parts[0] += self.forward(x, y).item() * y.numel() * weight
                parts[1] += y.numel() * weight
            shifted_total, shifted_count = self.par.all_sum(parts)
            self.shifted_val = shifted_total / shifted_count
        self.model.train()
        return total / count

    def shifted_eval(self) -> ShiftedEval | None:
        """The shifted held-out corpus's fixed windows on the device, loaded at the first
        evaluation (None: none configured; a corpus that fails to load is warned about once
        and skipped, it must not stop the run)."""
        if not hasattr(self, "_shifted"):
            cfg, self._shifted = self.config, None
            try:
                with self.par.loading_lock(cache_root()):  # ranks fill the cache in turn
                    self._shifted = load_shifted_eval(
                        cfg.data, cfg.shifted_data, tokenizer=self.work.tokenizer,
                        seq_len=self.work.seq_len, batch_size=cfg.batch_size,
                        n_batches=shifted_batches(cfg.eval_batches, cfg.shifted_eval_batches),
                        text_field=cfg.text_field)
            except (UsageError, OSError, ValueError) as exc:
                print(f"warning: no shifted held-out evaluation ({cfg.shifted_data}): {exc}",
                      file=sys.stderr)
            if self._shifted is not None:
                self._shifted.batches = [(x.to(self.device), y.to(self.device))
                                         for x, y in self._shifted.batches]
        return self._shifted

    # ----------------------------------------------------------------- records
    def val_metrics(self, loss: float) -> dict[str, float]:
        tpb = self.work.val.tokens_per_byte
        metrics = {"val_loss": loss, "val_ppl": perplexity(loss),
                   "val_bpb": bits_per_byte(loss, tpb)}
        shifted = getattr(self, "shifted_val", None)
        if shifted is not None:
            metrics.update(shifted_val_loss=shifted, shifted_val_bpb=bits_per_byte(
                shifted, self._shifted.tokens_per_byte))
        return metrics

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
            "peak_memory_bytes": self.peak_memory(),
            "state_bytes": self.state_bytes(),
            "elapsed_s": self.progress.elapsed_s + time.perf_counter() - self._segment_start,
        }
        if val_loss is not None:
            record.update(self.val_metrics(val_loss))
        return record

    def state_bytes(self) -> int:
        """Optimizer-state bytes of the whole run: under FSDP2 the sum of every rank's local
        shards (the single-process count, plus any state each rank keeps whole, such as
        step counters); under DDP one rank's full copy."""
        if self.par.mode != "fsdp":
            return optimizer_state_bytes(self.optimizer,
                                         from_registry=self.config.optimizer != PEER_BASELINE)
        from llmvalley.optim.memory import global_state_bytes

        return global_state_bytes(self.optimizer)

    def summary(self, status: str, diverged_step: int | None, reason: str | None,
                final_val: float | None) -> dict[str, Any]:
        p = self.progress
        n_params = self.model.num_parameters()
        state_bytes = self.state_bytes()
        best = p.best_val if p.best_val_step is not None else None
        shifted_val = getattr(self, "shifted_val", None) if final_val is not None else None
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
            # the shifted held-out corpus (llmvalley.data.heldout), evaluated with the val set
            "shifted_corpus": self._shifted.corpus_name if getattr(self, "_shifted", None)
            else None,
            "final_shifted_val_loss": shifted_val,
            "final_shifted_val_bpb": bits_per_byte(shifted_val, self._shifted.tokens_per_byte)
            if shifted_val is not None else None,
            "wall_clock_s": p.elapsed_s + time.perf_counter() - self._segment_start,
            "train_time_s": p.train_time_s,
            "tokens_per_s": p.step * self.budget.tokens_per_step / p.train_time_s
            if p.train_time_s > 0 else None,
            "optimizer_share": p.optimizer_s / p.train_time_s if p.train_time_s > 0 else None,
            "optimizer_compile_s": p.compile_s,
            "peak_memory_bytes": self.peak_memory(),
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
        if self.par.is_main:
            write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary

    # ----------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        """Train to the end of the budget (or until divergence); returns the summary."""
        from tqdm.auto import tqdm

        cfg, p = self.config, self.progress
        self._segment_start = time.perf_counter()
        if self.on_start is not None and self.par.is_main:
            self.on_start(self)
        self.model.train()
        bar = tqdm(total=self.budget.steps, initial=p.step, unit="step", dynamic_ncols=True,
                   desc=f"{cfg.model} {cfg.optimizer}",
                   disable=cfg.quiet or not cfg.progress or not self.par.is_main,
                   file=sys.stderr)
        restore = self._catch_signals()
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
                if self._curvature_request() == "gauss_newton":
                    fwd_bwd_s += self.sampled_label_backward(index)
                p.step = step
                self._account(loss, grad_norm, data_s, fwd_bwd_s, optimizer_s)
                bar.update(1)
                self._after_step(step, lr, grad_norm, bar)
                if self._stopping() and p.step < self.budget.steps:
                    if self._saved_step != p.step:
                        self.save()
                    raise RunInterrupted(self._stop_signal or signal.SIGTERM, p.step,
                                         self.budget.steps, self.run_dir)
        finally:
            restore()
            bar.close()
            self.log.close()
        final_val = p.last_val if status == "completed" else None
        return self.summary(status, diverged_step, reason, final_val)

    def _stopping(self) -> bool:
        """Whether to stop after this step: a signal arrived (under --parallel: at any rank,
        as agreed at the step's all-reduce, so that every rank stops at the same step)."""
        return self._stop_agreed if self.par.active else self._stop_signal is not None

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
            with self.eval_weights():
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
            self.save()

    def _catch_signals(self) -> Callable[[], None]:
        """Note SIGINT/SIGTERM instead of dying mid-step; returns the function that restores
        the previous handlers. Nothing is changed off the main thread, without checkpoints,
        or for a signal whose handler someone else has set (or set to ignore)."""
        if (not self.handle_signals or not self.config.checkpoint_every
                or threading.current_thread() is not threading.main_thread()):
            return lambda: None
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        previous = {}
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            if current is defaults[signum]:
                previous[signum] = current

        def note(signum: int, frame: Any) -> None:
            self._stop_signal = signum
            signal.signal(signum, previous[signum])  # a second one acts at once

        for signum in previous:
            signal.signal(signum, note)

        def restore() -> None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        return restore


def check_optimizer_name(name: str) -> None:
    """An unknown ``--optimizer`` fails before the corpus is read."""
    if name == PEER_BASELINE:
        return
    from llmvalley.optim import get_spec

    try:
        get_spec(name)
    except ValueError as exc:
        raise UsageError(f"--optimizer: {exc}; or {PEER_BASELINE} (the peer baseline)") from None


def _finished(run_dir: Path) -> str | None:
    """How a finished run ended (its summary.json exists), or None."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        return f"{summary['status']} at step {summary['steps']}"
    except (ValueError, KeyError, TypeError):
        return "its summary.json exists"


def _last_good_checkpoint(run_dir: Path, bad: Path) -> tuple[Path, int] | None:
    """The checkpoint of ``run_dir`` other than ``bad`` that loads, with its step."""
    good = []
    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, DCP_CHECKPOINT,
                 PREVIOUS_DCP_CHECKPOINT):
        path = run_dir / name
        if path.exists() and path.resolve() != bad.resolve():
            try:
                good.append((path, checkpoint_step(read_checkpoint(path))))
            except (CheckpointError, AttributeError, TypeError, ValueError):
                continue
    return max(good, key=lambda item: item[1]) if good else None


def open_resume(resume: str | Path) -> tuple[Path, Path, dict[str, Any], dict[str, Any]]:
    """Check ``--resume RUN_DIR`` (or a checkpoint file in a run folder) before anything slow:
    the run folder, its config, that it has not finished, and that the checkpoint loads.

    Returns the run folder, the checkpoint's path, the checkpoint and the saved config; every
    problem is a one-line UsageError that names the file (and the last good checkpoint, if any).
    """
    given = Path(resume).expanduser()
    if given.is_file() or is_dcp_checkpoint(given):
        run_dir, path = given.parent, given
    else:
        run_dir, path = given, latest_checkpoint(given)
    ending = _finished(run_dir) if run_dir.is_dir() else None
    if ending is not None:
        raise UsageError(f"--resume {resume}: the run has already finished ({ending}); its "
                         f"{SUMMARY_FILE} is kept as it is; start a new run to train more")
    if not path.exists():
        where = "no such folder" if not run_dir.is_dir() else (
            f"not a run folder: no {CONFIG_FILE}" if not (run_dir / CONFIG_FILE).is_file()
            else "the run stopped before its first checkpoint")
        hint = ""
        fallback = _last_good_checkpoint(run_dir, path) if run_dir.is_dir() else None
        if fallback is not None:
            hint = (f"; the last good checkpoint is {fallback[0]} (step {fallback[1]}): "
                    f"continue from it with --resume {fallback[0]}")
        raise UsageError(f"--resume {resume}: no {CHECKPOINT_FILE} there ({where}){hint}")
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))["config"]
    except FileNotFoundError:
        raise UsageError(f"--resume {resume}: no {CONFIG_FILE} in {run_dir}; not a run folder "
                         "of valley train") from None
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"--resume {resume}: {run_dir / CONFIG_FILE} is corrupt (not the "
                         "JSON valley train writes)") from None
    try:
        state = read_checkpoint(path)
        checkpoint_step(state)
    except (CheckpointError, AttributeError, TypeError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, CheckpointError) else (
            f"{path} is not a valley train checkpoint")
        fallback = _last_good_checkpoint(run_dir, path)
        hint = (f"; the last good checkpoint is {fallback[0]} (step {fallback[1]}): continue "
                f"from it with --resume {fallback[0]}" if fallback is not None
                else f"; no other checkpoint in {run_dir} loads")
        raise UsageError(f"--resume: {reason}{hint}") from None
    check_writable_folder(run_dir, f"--resume {resume}")
    return run_dir, path, state, saved


def train(config: TrainConfig | dict[str, Any] | None = None, *,
          resume: str | Path | None = None, command: str | None = None,
          on_start: Callable[[Trainer], None] | None = None,
          handle_signals: bool = True, parallel: str = "none",
          dist_timeout: float = DEFAULT_DIST_TIMEOUT_S) -> dict[str, Any]:
    """Train one run and return its summary (also written to the run folder's summary.json).

    ``config`` is a :class:`TrainConfig` or a dict of its fields. With ``resume`` (a run folder
    holding a checkpoint, or a checkpoint file in a run folder) the run continues from that
    checkpoint with its saved config; only ``quiet``, ``progress`` and ``threads`` are taken
    from ``config`` then. A finished run (one with a summary.json) is not resumed. ``on_start``
    and ``handle_signals``: see :class:`Trainer`. SIGINT or SIGTERM during training writes a
    checkpoint and raises :class:`RunInterrupted`.

    ``parallel`` (``none``, ``ddp``, ``fsdp``) and ``dist_timeout`` (seconds a collective waits
    for the other ranks) are how the run is executed, not what it is: they are not part of the
    saved config, and a run may be resumed in another mode or on another number of ranks.
    Under ``ddp``/``fsdp`` every process started by ``torchrun`` calls this; each returns the
    summary, rank 0 writes it. A rank that stops ends the others with
    :class:`~llmvalley.bench.distributed.PeerLost`.
    """
    par = Parallel.from_launch(parallel, dist_timeout)
    if isinstance(config, dict):
        config = coerce_config(config)
    if resume is None:
        config = config or TrainConfig()
        par.check_batch(config.batch_size)
        with par.session(resolve_device(config)[0].type):
            return Trainer(config, command=command, on_start=on_start,
                           handle_signals=handle_signals, parallel=par).run()
    run_dir, path, state, saved = open_resume(resume)
    if config is not None:
        saved.update(quiet=config.quiet, progress=config.progress, threads=config.threads)
    resumed = coerce_config(saved)
    par.check_batch(resumed.batch_size)
    with par.session(resolve_device(resumed)[0].type):
        return Trainer(resumed, run_dir=run_dir, resume=True, checkpoint=state,
                       checkpoint_path=path, on_start=on_start,
                       handle_signals=handle_signals, parallel=par).run()
