"""A synthetic stand-in for training: a loss curve as a function of the learning rate.

:class:`SyntheticTraining` is a trial function for sweeps and comparisons. It writes a run
folder like ``valley train`` does (``log.jsonl`` with validation points, ``summary.json``) in
microseconds, so the sweep, comparison and report machinery can be tested without training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVAL_POINTS = 10
TOKENS_PER_STEP = 100
INITIAL_LOSS = 5.0
MODEL_PARAMS = {"nano": 918_656, "micro": 4_880_000}


@dataclass
class SyntheticTraining:
    """Final loss ``floor + curvature * log2(lr / best_lr)**2`` (per optimizer, see ``shape``),
    diverging above ``diverge_above`` x best_lr; the curve decays as ``(1 - t)**power``, so a
    higher ``power`` reaches low losses sooner (a "faster" optimizer)."""

    shape: dict[str, dict[str, float]] = field(default_factory=dict)
    default: dict[str, float] = field(default_factory=lambda: {
        "best_lr": 4e-3, "floor": 2.0, "curvature": 0.05, "power": 2.0, "diverge_above": 8.0})
    calls: list[dict[str, Any]] = field(default_factory=list)
    #: per optimizer, other hyperparameters' optima: name -> (best value, nats per unit^2);
    #: names: beta2 (``opt_args["betas"][1]``), momentum, weight_decay, warmup_steps
    optima: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def params(self, optimizer: str) -> dict[str, float]:
        return {**self.default, **self.shape.get(optimizer, {})}

    def final_loss(self, optimizer: str, lr: float, seed: int,
                   config: dict[str, Any] | None = None) -> float | None:
        p = self.params(optimizer)
        if lr > p["diverge_above"] * p["best_lr"]:
            return None
        loss = p["floor"] + p["curvature"] * math.log2(lr / p["best_lr"]) ** 2 + 0.002 * seed
        for name, (best, weight) in self.optima.get(optimizer, {}).items():
            value = setting(config or {}, name)
            if value is not None:
                loss += weight * (value - best) ** 2
        return loss

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(config)
        optimizer, lr, seed = config["optimizer"], config["lr"], config.get("seed", 0)
        steps = config.get("steps", 100)
        run_dir = Path(config["out"]) / config["name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        final = self.final_loss(optimizer, lr, seed, config)
        power = self.params(optimizer)["power"]
        records = []
        for i in range(1, EVAL_POINTS + 1):
            step = steps * i // EVAL_POINTS
            t = step / steps
            if final is None and t > 0.3:  # diverged at 30% of the run
                records.append({"step": step, "tokens": step * TOKENS_PER_STEP,
                                "train_loss": None, "diverged": True})
                break
            loss = (final or 2.0) + (INITIAL_LOSS - (final or 2.0)) * (1 - t) ** power
            records.append({"step": step, "tokens": step * TOKENS_PER_STEP, "train_loss": loss,
                            "elapsed_s": 2.0 * step / steps, "val_loss": loss})
        (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        n_params = MODEL_PARAMS.get(config.get("model", ""), 1000)
        summary = {
            "status": "completed" if final is not None else "diverged",
            "run_dir": str(run_dir), "optimizer": optimizer, "model": config.get("model"),
            "final_val_loss": final, "final_val_bpb": final / math.log(2) if final else None,
            "best_val_loss": final, "tokens": steps * TOKENS_PER_STEP, "steps": steps,
            "wall_clock_s": 2.0, "train_time_s": 1.8, "tokens_per_s": 5000.0,
            "optimizer_share": 0.1, "peak_memory_bytes": 300 * 2**20,
            "state_bytes": 8 * n_params, "state_bytes_per_param": 8.0, "n_params": n_params,
            "loss_spikes": 0, "max_grad_norm": 1.5, "diverged": final is None,
            "diverged_step": None if final is not None else steps // 3,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary


def setting(config: dict[str, Any], name: str) -> float | None:
    """A hyperparameter of a trial config: ``beta2`` and ``momentum`` from ``opt_args``."""
    opt_args = config.get("opt_args") or {}
    if name == "beta2":
        betas = opt_args.get("betas")
        return float(betas[1]) if betas else None
    value = opt_args.get(name, config.get(name))
    return None if value is None else float(value)
