"""Comparing optimizers across model sizes under one protocol: ``valley compare``.

Every (model, optimizer) cell is a :class:`~llmvalley.bench.sweep.Sweep` with the same workload
(data, batch size, token budget, schedule, warmup, evaluation) and the same search budget.
The AdamW baseline follows LLM practice (betas (0.9, 0.95), eps 1e-8, weight decay 0.1) unless
the workload says otherwise. A shared ``--opt-arg`` goes to every optimizer that accepts it;
matrix-only methods (registry ``applies_to == "matrix"``) train embeddings, head and norms with
AdamW at the AdamW baseline's tuned settings (workload AdamW settings included; a user's
``--fallback-arg`` wins), so their sweeps start once AdamW's trials at that scale are done.
Trials run in ``workers`` worker processes (a fresh process per run, so the peak memory of a
run is its own); cells are scheduled concurrently so the workers stay busy, the baseline's
trials first, seed runs last.

With several token budgets (``budgets``: multiples of the workload's steps or tokens, e.g. 1, 2,
4) every (model, budget) pair is a scale of its own, tuned and seeded like any other: its folder
is ``MODEL`` at budget 1 and ``MODEL@Bx`` otherwise (``nano@2x``); its evaluation interval is
scaled with the budget, so every budget has the same evaluation points. The report fits AdamW's
loss against the budget (:mod:`llmvalley.bench.scaling`).

The results folder::

    RESULTS/compare.json            the comparison: command, machine, workload, search, cells
    RESULTS/command.txt             the exact command
    RESULTS/optuna.db               every study (unless --storage names another database)
    RESULTS/MODEL/OPTIMIZER/        a sweep folder: sweep.json, trials/*, seeds/seed-*/
    RESULTS/MODEL@2x/OPTIMIZER/     the same at twice the budget (with --budgets)
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
import threading
import time
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmvalley.bench.pool import BASELINE_TRIALS, PriorityPool
from llmvalley.bench.records import write_json
from llmvalley.bench.sweep import (
    Sweep,
    SweepSpec,
    TrialFn,
    TuneSpec,
    merged_config,
    run_training,
)
from llmvalley.cli import UsageError

COMPARE_FILE = "compare.json"
BASELINE = "adamw"
# AdamW settings a matrix method's fallback takes from the tuned baseline (plus its lr and any
# other AdamW hyperparameter the baseline ran with).
FALLBACK_KEYS = ("betas", "eps", "weight_decay")
#: The AdamW baseline of LLM pretraining (GPT-3, LLaMA, Wen et al. 2025; benchmark-protocol.md):
#: the settings of every AdamW cell unless the workload gives its own. Library defaults
#: (betas (0.9, 0.999), weight decay 0.01) make a weak baseline.
BASELINE_OPT_ARGS: dict[str, Any] = {"betas": (0.9, 0.95), "eps": 1e-8}
BASELINE_WEIGHT_DECAY = 0.1
#: Drop-in AdamW implementations: they take the baseline's settings, so that a comparison with
#: them measures the implementation (or state precision), not different hyperparameters.
ADAMW_LIKE = ("adamw", "torch-adamw", "adamw8bit", "adamw4bit")
#: Keyword arguments of ``torch.optim.AdamW`` (the peer baseline ``torch-adamw``).
TORCH_ADAMW_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                              "foreach", "capturable", "differentiable", "fused"})


@dataclass
class Preset:
    """A named comparison: optimizers, scales, shared workload and search budget."""

    description: str
    optimizers: tuple[str, ...]
    models: tuple[str, ...]
    workload: dict[str, Any]
    trials: int = 5
    grid_points: int = 4
    seeds: int = 3
    workers: int = 1
    lr_centers: dict[str, float] = field(default_factory=dict)
    tokens_per_param: float | None = None  # token budget per scale = this x parameters
    untuned: tuple[str, ...] = ()  # zero tuning budget: default learning rate, seeds only
    # per-method arguments this scale needs (a rank below the model's width); a key
    # "METHOD@MODEL" adds arguments for one model only (GaLore's rank 256 at llama-130m)
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    # token budgets as multiples of the workload's (several: the scaling-law fit)
    budgets: tuple[float, ...] = (1.0,)


#: The memory-efficient methods of the ``memory`` presets, beside AdamW and 8-bit AdamW.
MEMORY_OPTIMIZERS = ("adamw", "adamw8bit", "galore", "fira", "apollo", "apollo_mini", "frugal",
                     "scale", "swan", "sinkgd", "adafactor")

PRESETS: dict[str, Preset] = {
    "cpu-quick": Preset(
        description="nano (0.9M parameters), byte-level stdlib sources, 100 steps of 16 x 128 "
                    "tokens, cosine with 10 warmup steps; AdamW baseline betas (0.9, 0.95), "
                    "weight decay 0.1; 5 learning rates (3-point grid + 2 extensions) + 3 seeds "
                    "per optimizer; two single-thread workers (about 25 minutes on 2 CPU "
                    "cores)",
        optimizers=("adamw", "muon", "lion", "adafactor"),
        models=("nano",),
        workload={"data": "stdlib", "steps": 100, "batch_size": 16, "warmup_steps": 10,
                  "schedule": "cosine", "eval_every": 20, "eval_batches": 8, "log_every": 5,
                  "threads": 1, "device": "cpu"},
        trials=5, grid_points=3, seeds=3, workers=2,
        # grid centers near each method's optimum for this workload (from a first run with a
        # 4-point grid); the grid extends itself where the best value sits at an edge
        lr_centers={"adamw": 2e-3, "torch-adamw": 2e-3, "lion": 1e-3, "muon": 0.04,
                    "adafactor": 0.04},
    ),
    "cpu-families": Preset(
        description="one representative per family on nano, the cpu-quick workload (100 steps "
                    "of 16 x 128 byte-level tokens, cosine, AdamW baseline betas (0.9, 0.95), "
                    "weight decay 0.1): 5 learning rates + 3 seeds per tuned optimizer; "
                    "prodigy at zero tuning budget (its default lr, seeds only), as its users "
                    "run it; two single-thread workers (about an hour on 2 CPU cores)",
        optimizers=("adamw", "lion", "adafactor", "muon", "soap", "galore",
                    "schedulefree_adamw", "prodigy", "stable_spam"),
        models=("nano",),
        workload={"data": "stdlib", "steps": 100, "batch_size": 16, "warmup_steps": 10,
                  "schedule": "cosine", "eval_every": 20, "eval_batches": 8, "log_every": 5,
                  "threads": 1, "device": "cpu"},
        trials=5, grid_points=3, seeds=3, workers=2,
        lr_centers={"adamw": 2e-3, "lion": 1e-3, "muon": 0.04, "adafactor": 0.04,
                    "soap": 4e-3, "galore": 1e-2, "schedulefree_adamw": 5e-3,
                    "stable_spam": 2e-3},
        untuned=("prodigy",),
        # nano's width is 128: GaLore's rank 128 (its 60M setting, a quarter of d=512) becomes
        # a quarter of 128
        method_args={"galore": {"rank": 32}},
    ),
    "memory": Preset(
        description="memory-efficient methods on micro: the cpu-quick workload at micro size; "
                    "state bytes and peak memory above the model's own beside the loss; 4 "
                    "learning rates (3-point grid + 1 extension) + 2 seeds each: "
                    "66 runs of about 4 minutes, about 2 hours on 2 CPU cores (GaLore's and "
                    "APOLLO's own comparisons are at llama-60m/130m: use --models)",
        optimizers=MEMORY_OPTIMIZERS,
        models=("micro",),
        workload={"data": "stdlib", "steps": 100, "batch_size": 16, "warmup_steps": 10,
                  "schedule": "cosine", "eval_every": 20, "eval_batches": 8, "log_every": 5,
                  "threads": 1, "device": "cpu"},
        # a micro run costs 5x a nano run: one grid extension and two seeds keep the eleven
        # methods to about two hours on 2 cores, every method with the same budget
        trials=4, grid_points=3, seeds=2, workers=2,
        lr_centers={"adamw": 2e-3, "adamw8bit": 2e-3, "galore": 1e-2, "fira": 1e-2,
                    "apollo": 1e-2, "apollo_mini": 1e-2, "frugal": 2e-3, "scale": 1e-2,
                    "swan": 1e-2, "sinkgd": 1e-2, "adafactor": 0.04},
    ),
    "memory-gpu": Preset(
        description="the memory preset at GaLore's and APOLLO's scales, on one GPU: llama-60m "
                    "and llama-130m, 20 tokens per parameter (1.2B and 2.7B tokens; GaLore's "
                    "Table 2 runs 1.1B and 2.2B), batch 512 x 256 tokens as GaLore's C4 "
                    "scripts, cosine with 10% warmup, bf16, BPE at the models' 32000 "
                    "vocabulary; ranks as the papers' scripts (GaLore and Fira 128 / 256, "
                    "APOLLO d/4: 128 / 192, APOLLO-Mini rank 1 with scale_front); 4 learning "
                    "rates + 2 seeds each. Give the corpus with --data (the papers use "
                    "hf:allenai/c4:en; the default is the stdlib sources so that an offline "
                    "machine runs it)",
        optimizers=MEMORY_OPTIMIZERS,
        models=("llama-60m", "llama-130m"),
        workload={"data": "stdlib", "batch_size": 512, "schedule": "cosine",
                  "eval_every": 1000, "eval_batches": 32, "log_every": 50, "device": "cuda",
                  "precision": "bf16"},
        trials=4, grid_points=3, seeds=2, workers=1,
        # the papers' learning rates: AdamW 1e-3 (GaLore's baseline), the low-rank methods 1e-2
        lr_centers={"adamw": 1e-3, "adamw8bit": 1e-3, "galore": 1e-2, "fira": 1e-2,
                    "apollo": 1e-2, "apollo_mini": 1e-2, "frugal": 1e-3, "scale": 1e-2,
                    "swan": 1e-2, "sinkgd": 1e-2, "adafactor": 1e-2},
        tokens_per_param=20.0,
        method_args={"apollo_mini": {"scale_front": True},
                     "galore@llama-130m": {"rank": 256}, "fira@llama-130m": {"rank": 256},
                     "apollo@llama-130m": {"rank": 192}},
    ),
    "cpu-curvature": Preset(
        description="curvature methods on nano, the cpu-quick workload: Shampoo, SOAP, PSGD "
                    "Kron and Sophia-G (its Gauss-Newton-Bartlett estimate every 10 steps, "
                    "counted in wall-clock) beside AdamW; 5 learning rates + 3 seeds each",
        optimizers=("adamw", "shampoo", "soap", "psgd_kron", "sophia"),
        models=("nano",),
        workload={"data": "stdlib", "steps": 100, "batch_size": 16, "warmup_steps": 10,
                  "schedule": "cosine", "eval_every": 20, "eval_batches": 8, "log_every": 5,
                  "threads": 1, "device": "cpu"},
        trials=5, grid_points=3, seeds=3, workers=2,
        lr_centers={"adamw": 2e-3, "shampoo": 2e-3, "soap": 4e-3, "psgd_kron": 1e-3,
                    "sophia": 1e-3},
    ),
    "cpu-scale": Preset(
        description="scale dependence on CPU: adamw, muon, lion, adafactor at nano (0.9M) and "
                    "micro (4.9M parameters), byte-level stdlib sources, three token budgets "
                    "(1x, 2x, 4x of 40 steps of 8 sequences: 41k tokens at nano, 82k at micro "
                    "per 1x), cosine with 10% warmup, 5 evaluation points per run (4 batches; "
                    "the shifted corpus 1); AdamW baseline betas (0.9, 0.95), weight decay "
                    "0.1; a 3-point learning-rate grid + 3 seeds per optimizer, size and "
                    "budget; the fit of AdamW's loss against data gives each method's "
                    "effective-data speedup; two single-thread workers (about 90 minutes on 2 "
                    "idle CPU cores; estimate in docs/benchmark.md)",
        optimizers=("adamw", "muon", "lion", "adafactor"),
        models=("nano", "micro"),
        workload={"data": "stdlib", "steps": 40, "batch_size": 8, "schedule": "cosine",
                  "eval_every": 8, "eval_batches": 4, "log_every": 4, "threads": 1,
                  "device": "cpu"},
        trials=3, grid_points=3, seeds=3, workers=2,
        lr_centers={"adamw": 2e-3, "torch-adamw": 2e-3, "lion": 1e-3, "muon": 0.04,
                    "adafactor": 0.04},
        budgets=(1.0, 2.0, 4.0),
    ),
    "gpu-ladder": Preset(
        description="llama-60m, llama-130m, llama-350m at 20 tokens per parameter (Chinchilla), "
                    "batch 64 x 256 tokens, cosine with 10% warmup, bf16 on one GPU; AdamW "
                    "baseline betas (0.9, 0.95), weight decay 0.1; 6 learning rates + 3 seeds per "
                    "optimizer",
        optimizers=("adamw", "muon", "lion", "adafactor"),
        models=("llama-60m", "llama-130m", "llama-350m"),
        workload={"data": "stdlib", "batch_size": 64, "schedule": "cosine", "eval_every": 200,
                  "eval_batches": 32, "log_every": 20, "device": "cuda", "precision": "bf16"},
        trials=6, grid_points=4, seeds=3, workers=1,
        lr_centers={"adamw": 2e-3, "torch-adamw": 2e-3, "lion": 3e-4, "muon": 0.02,
                    "adafactor": 1e-2},
        tokens_per_param=20.0,
    ),
}


@dataclass
class CompareSpec:
    """A whole comparison, resolved from a preset and/or command-line options."""

    optimizers: list[str]
    models: list[str]
    workload: dict[str, Any]
    out: str | Path
    trials: int = 5
    grid_points: int = 4
    factor: float = 2.0
    seeds: int = 3
    workers: int = 1
    tune: tuple[TuneSpec, ...] = ()
    lr_centers: dict[str, float] = field(default_factory=dict)
    tokens_per_param: float | None = None
    storage: str | None = None
    # grid (learning rate only), tpe (with --tune) or coordinate (coordinate descent over the
    # learning rate and each method's most sensitive hyperparameters); None: tpe with --tune
    search: str | None = None
    skipped: list[str] = field(default_factory=list)
    preset: str | None = None
    command: str | None = None
    # optimizers run at zero tuning budget (one trial at the default learning rate, then the
    # seeds): parameter-free methods beside tuned AdamW, as their users run them
    untuned: list[str] = field(default_factory=list)
    # per-method arguments every cell of that method runs with (a preset's method_args;
    # "METHOD@MODEL" keys for one model only, see :meth:`args_for`)
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    # token budgets as multiples of the workload's steps/tokens; each (model, budget) is a
    # scale of its own (see scale_key)
    budgets: list[float] = field(default_factory=lambda: [1.0])
    # seed runs keep their final checkpoint (for valley eval)
    keep_checkpoints: bool = False

    def scales(self) -> list[tuple[str, str, float]]:
        """(scale key, model, budget) of every scale, model by model, budgets ascending."""
        return [(scale_key(model, budget), model, budget)
                for model in self.models for budget in sorted(self.budgets)]

    def args_for(self, optimizer: str, model: str) -> dict[str, Any]:
        """The method arguments of one cell: the method's, then its ``METHOD@MODEL`` ones."""
        return {**self.method_args.get(optimizer, {}),
                **self.method_args.get(f"{optimizer}@{model}", {})}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["tune"] = [vars(t) for t in self.tune]
        return data


def registered_optimizers() -> set[str]:
    """Names ``create_optimizer`` accepts, plus the peer baseline ``torch-adamw``."""
    import llmvalley

    return {spec.name for spec in llmvalley.list_optimizers()} | {"torch-adamw"}


def is_matrix(optimizer: str) -> bool:
    """Whether the method applies to hidden matrices only (needs the AdamW fallback)."""
    import llmvalley

    if optimizer == "torch-adamw":
        return False
    return llmvalley.get_spec(optimizer).applies_to == "matrix"


def check_optimizers(names: list[str], *, skip_missing: bool, need_baseline: bool = True
                     ) -> tuple[list[str], list[str]]:
    """Split ``names`` into (available, skipped); unknown names are a UsageError unless
    ``skip_missing`` (presets run with whatever is registered)."""
    known = registered_optimizers()
    missing = [n for n in names if n not in known]
    if missing and not skip_missing:
        raise UsageError(f"optimizer{'s' if len(missing) > 1 else ''} not registered: "
                         f"{', '.join(missing)}; registered: {', '.join(sorted(known))}")
    available = [n for n in names if n in known]
    if need_baseline and BASELINE not in available:
        raise UsageError(f"the comparison needs the {BASELINE} baseline in --optimizers "
                         "(speedups are measured against it)")
    return available, missing


def accepted_keys(optimizer: str) -> frozenset[str]:
    """Hyperparameter names ``optimizer`` accepts (registry defaults and shell options)."""
    if optimizer == "torch-adamw":
        return TORCH_ADAMW_KEYS
    import llmvalley
    from llmvalley.optim.spec import SHELL_DEFAULTS

    return frozenset(llmvalley.get_spec(optimizer).defaults) | frozenset(SHELL_DEFAULTS)


def key_targets(optimizers: list[str], key: str) -> tuple[list[str], list[str]]:
    """Where a shared hyperparameter goes: (the optimizers that take it themselves, the matrix
    methods whose AdamW fallback takes it)."""
    methods = [o for o in optimizers if key in accepted_keys(o)]
    fallbacks = [o for o in optimizers if is_matrix(o) and key in accepted_keys(BASELINE)]
    return methods, fallbacks


def check_shared_settings(optimizers: list[str], workload: dict[str, Any],
                          tune: tuple[TuneSpec, ...] = ()) -> None:
    """UsageError for a shared setting that would be dropped everywhere or break every run:
    an ``--opt-arg`` or ``--tune`` name no optimizer of the comparison (nor the AdamW fallback)
    accepts, a ``--fallback-arg`` AdamW does not accept or with no matrix method to take it."""
    accepted = ", ".join(sorted(set().union(*(accepted_keys(o) for o in optimizers))
                                - {"lr"}))
    for flag, names in (("--opt-arg", list(workload.get("opt_args") or {})),
                        ("--tune", [t.name for t in tune])):
        for key in names:
            methods, fallbacks = key_targets(optimizers, key)
            if not methods and not fallbacks:
                raise UsageError(f"{flag} {key}: no optimizer of the comparison "
                                 f"({', '.join(optimizers)}) nor the AdamW fallback accepts it; "
                                 f"accepted: {accepted}")
    fallback_args = workload.get("fallback_args") or {}
    if fallback_args:
        if not any(is_matrix(o) for o in optimizers):
            raise UsageError("--fallback-arg: no matrix-only method in the comparison has an "
                             "AdamW fallback (--opt-arg sets AdamW's own hyperparameters)")
        unknown = sorted(set(fallback_args) - accepted_keys(BASELINE))
        if unknown:
            raise UsageError(f"--fallback-arg {', '.join(unknown)}: not an AdamW "
                             f"hyperparameter; accepted: "
                             f"{', '.join(sorted(accepted_keys(BASELINE)))}")


def routing_summary(optimizers: list[str], workload: dict[str, Any],
                    tune: tuple[TuneSpec, ...] = ()) -> list[str]:
    """One line per shared ``--opt-arg`` and ``--tune`` name: which optimizers take it."""
    lines = []
    for flag, names in (("--opt-arg", list(workload.get("opt_args") or {})),
                        ("--tune", [t.name for t in tune])):
        for key in names:
            methods, fallbacks = key_targets(optimizers, key)
            targets = methods + [f"{o}'s AdamW fallback" for o in fallbacks]
            skipped = [o for o in optimizers if o not in methods and o not in fallbacks]
            lines.append(f"{flag} {key}: {', '.join(targets)}"
                         + (f" (not {', '.join(skipped)}: no such hyperparameter)"
                            if skipped else ""))
    return lines


def check_models(names: list[str]) -> None:
    from llmvalley.models.presets import PRESETS as MODEL_PRESETS

    unknown = [n for n in names if n not in MODEL_PRESETS]
    if unknown:
        raise UsageError(f"unknown model preset {', '.join(unknown)}; accepted: "
                         f"{', '.join(MODEL_PRESETS)}")


@functools.cache
def model_parameters(model: str) -> int:
    """Parameters of a preset (with its own vocabulary), counted without allocating."""
    from llmvalley.models.presets import build_model, model_config

    return build_model(model_config(model), "meta").num_parameters()


def scale_key(model: str, budget: float = 1.0) -> str:
    """The name (and folder) of a scale: ``nano`` at budget 1, ``nano@2x`` at twice it."""
    return model if budget == 1 else f"{model}@{budget:g}x"


def parse_budgets(text: str | list[Any] | tuple[Any, ...]) -> list[float]:
    """``--budgets 1,2,4`` (or a list): distinct positive multiples, ascending."""
    items = [str(v).strip().removesuffix("x") for v in (
        text.split(",") if isinstance(text, str) else text)]
    try:
        values = [float(v) for v in items if v]
    except ValueError:
        raise UsageError(f"--budgets: expected comma-separated positive numbers (multiples of "
                         f"the workload's budget), got {text!r}") from None
    if not values or any(not (v > 0 and v != float("inf")) for v in values):
        raise UsageError(f"--budgets: expected positive numbers, got {text!r}")
    if len(set(values)) != len(values):
        raise UsageError(f"--budgets: a budget is given twice in {text!r}")
    return sorted(values)


def scale_workload(spec: CompareSpec, model: str, budget: float = 1.0) -> dict[str, Any]:
    """The workload of one scale: the shared one, the model, and its token budget (``budget``
    times the workload's steps, tokens or tokens per parameter; the evaluation interval scales
    with it, so every budget has the same evaluation points)."""
    from llmvalley.bench.config import DEFAULT_STEPS

    workload = {**spec.workload, "model": model}
    if spec.tokens_per_param:
        workload.pop("steps", None)
        workload["tokens"] = int(budget * spec.tokens_per_param * model_parameters(model))
    elif budget != 1:
        if workload.get("tokens"):
            workload["tokens"] = int(budget * workload["tokens"])
        else:
            workload["steps"] = max(1, round(budget * (workload.get("steps") or DEFAULT_STEPS)))
    if budget != 1:
        for key in ("eval_every", "log_every"):
            if workload.get(key):
                workload[key] = max(1, round(budget * workload[key]))
    return workload


def cell_workload(spec: CompareSpec, model: str, optimizer: str,
                  budget: float = 1.0) -> dict[str, Any]:
    """The workload of one cell: the scale's, with the shared ``opt_args`` an optimizer does
    not accept left out (they reach a matrix method's fallback through the baseline, see
    :func:`fallback_from`) and the user's ``fallback_args`` kept for matrix methods only."""
    workload = scale_workload(spec, model, budget)
    if workload.get("opt_args"):
        accepted = accepted_keys(optimizer)
        workload["opt_args"] = {k: v for k, v in workload["opt_args"].items() if k in accepted}
    if not is_matrix(optimizer):
        workload.pop("fallback_args", None)
    return workload


def cell_fixed(optimizer: str, fallback: dict[str, Any] | None,
               method_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The compare's own settings of one cell (the workload's win over them): the protocol's
    AdamW baseline for AdamW cells, the baseline-derived fallback for matrix methods, and the
    method's own arguments at this scale (a preset's ``method_args``: GaLore's rank)."""
    fixed: dict[str, Any] = {}
    if optimizer in ADAMW_LIKE:
        fixed = {"opt_args": dict(BASELINE_OPT_ARGS), "weight_decay": BASELINE_WEIGHT_DECAY}
    if method_args:
        fixed["opt_args"] = {**fixed.get("opt_args", {}), **method_args}
    if fallback:
        fixed["fallback_args"] = dict(fallback)
    return fixed


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def fallback_from(baseline: dict[str, Any]) -> dict[str, Any]:
    """The AdamW fallback of matrix methods from the baseline's ``sweep.json`` contents: the
    exact AdamW settings its best trial ran with (registry defaults < the compare's baseline
    settings < the workload's AdamW settings < tuned values) and its learning rate."""
    import llmvalley

    best = baseline.get("best")
    if best is None:
        raise RuntimeError("the AdamW baseline has no completed trial to take settings from")
    config = merged_config(baseline.get("workload") or {}, baseline.get("fixed") or {},
                           {k: v for k, v in best["params"].items() if k != "lr"})
    opt_args = {k: _tuples(v) for k, v in config["opt_args"].items()}
    settings = {**llmvalley.get_spec(BASELINE).defaults, **opt_args}
    if config.get("weight_decay") is not None:
        settings["weight_decay"] = config["weight_decay"]
    fallback = {**opt_args, **{k: settings[k] for k in FALLBACK_KEYS if k in settings}}
    fallback["lr"] = best["lr"]
    return fallback


class Comparison:
    """Runs every cell of a :class:`CompareSpec` and writes ``compare.json``."""

    def __init__(self, spec: CompareSpec, trial_fn: TrialFn = run_training) -> None:
        self.spec = spec
        self.trial_fn = trial_fn
        self.out = Path(spec.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cells: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._baseline_done: dict[str, threading.Event] = {key: threading.Event()
                                                           for key, _, _ in spec.scales()}
        self._baseline: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        check_shared_settings(spec.optimizers, spec.workload, spec.tune)

    def log(self, message: str) -> None:
        """Print one progress line; the time is taken under the lock, so lines printed from
        the cells' threads appear in time order."""
        with self._lock:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def sweep_spec(self, model: str, optimizer: str, fallback: dict[str, Any] | None,
                   budget: float = 1.0) -> SweepSpec:
        """One cell's sweep: the cell's workload and settings, the shared search. Every cell
        searches the same way (TPE when the comparison tunes anything, over the ``--tune``
        names the optimizer has; coordinate descent over each method's own axes when asked;
        else the learning-rate grid), with the same budget."""
        storage = self.spec.storage or f"sqlite:///{(self.out / 'optuna.db').resolve()}"
        accepted = accepted_keys(optimizer)
        key = scale_key(model, budget)
        workload = cell_workload(self.spec, model, optimizer, budget)
        if optimizer in self.spec.untuned:
            return SweepSpec(
                optimizer=optimizer, workload=workload,
                out=self.out / key / optimizer, lr_center=None, factor=self.spec.factor,
                grid_points=1, trials=1, seeds=self.spec.seeds,
                fixed=cell_fixed(optimizer, fallback, self.spec.args_for(optimizer, model)),
                search="grid", storage=storage,
                study_name=f"{key}/{optimizer}", untuned=True,
                keep_checkpoints=self.spec.keep_checkpoints)
        return SweepSpec(
            optimizer=optimizer, workload=workload,
            out=self.out / key / optimizer, lr_center=self.spec.lr_centers.get(optimizer),
            factor=self.spec.factor, grid_points=self.spec.grid_points, trials=self.spec.trials,
            tune=tuple(t for t in self.spec.tune if t.name in accepted), seeds=self.spec.seeds,
            fixed=cell_fixed(optimizer, fallback, self.spec.args_for(optimizer, model)),
            search=self.spec.search or ("tpe" if self.spec.tune else "grid"),
            storage=storage, study_name=f"{key}/{optimizer}",
            keep_checkpoints=self.spec.keep_checkpoints)

    def run_cell(self, model: str, optimizer: str, executor: Executor | None,
                 budget: float = 1.0) -> None:
        """One sweep; the baseline releases the matrix methods of its scale after its trials."""
        key = scale_key(model, budget)
        cell = f"{key}/{optimizer}"
        try:
            fallback = None
            if is_matrix(optimizer):
                self._baseline_done[key].wait()
                if key not in self._baseline:
                    raise RuntimeError(f"{key}/{BASELINE} failed, no fallback settings")
                fallback = fallback_from(self._baseline[key])
            sweep_spec = self.sweep_spec(model, optimizer, fallback, budget)
            settings = merged_config(sweep_spec.workload, sweep_spec.fixed)
            self.cells[cell] = {"status": "running", **cell_settings(settings, sweep_spec)}
            self.log(f"{cell}: " + ", ".join(f"{k} {v}" for k, v in self.cells[cell].items()
                                            if k != "status" and v))
            sweep = Sweep(sweep_spec, self.trial_fn)
            sweep.log = lambda message: self.log(f"{key}: {message}")
            if optimizer == BASELINE:  # matrix methods wait for these trials
                sweep.trial_priority = BASELINE_TRIALS
            sweep.run_trials(executor, parallel=max(1, self.spec.workers))
            if optimizer == BASELINE:
                self._baseline[key] = sweep.write()
                self._baseline_done[key].set()
            result = sweep.run(executor, parallel=max(1, self.spec.workers))
            best = result["best"]
            self.log(f"{cell}: done; best lr {best['lr']:.3g}, final val loss "
                     f"{best['final_val_loss']:.4f}" if best else f"{cell}: no trial completed")
            self.cells[cell]["status"] = "done"
        except Exception as exc:  # one failed cell must not stop the others
            self.errors.append(f"{cell}: {type(exc).__name__}: {exc}")
            self.cells[cell] = {**self.cells.get(cell, {}), "status": "failed",
                                "error": f"{type(exc).__name__}: {exc}"}
            self.log(f"{cell}: FAILED: {exc}")
        finally:
            if optimizer == BASELINE:
                self._baseline_done[key].set()

    def manifest(self, started: float, finished: float | None) -> dict[str, Any]:
        import torch

        return {
            "spec": self.spec.to_dict(),
            "command": self.spec.command,
            "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
            "finished": dt.datetime.fromtimestamp(finished, dt.timezone.utc).isoformat()
            if finished else None,
            "wall_s": finished - started if finished else None,
            "machine": {"platform": platform.platform(), "processor": cpu_name(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__,
                        "cuda": torch.cuda.get_device_name(0)
                        if torch.cuda.is_available() else None},
            "cells": self.cells,
            "errors": self.errors,
        }

    def run(self) -> dict[str, Any]:
        """Run all cells (concurrently, sharing the worker pool); returns ``compare.json``."""
        started = time.time()
        if self.spec.command:
            (self.out / "command.txt").write_text(self.spec.command + "\n")
        write_json(self.out / COMPARE_FILE, self.manifest(started, None))
        executor: Executor | None = None
        if self.spec.workers > 1 or self.trial_fn is run_training:
            executor = PriorityPool(self.spec.workers)
        order = sorted(self.spec.optimizers, key=lambda o: (o != BASELINE, is_matrix(o)))
        threads = [threading.Thread(target=self.run_cell,
                                    args=(model, optimizer, executor, budget),
                                    name=f"{key}/{optimizer}")
                   for key, model, budget in self.spec.scales() for optimizer in order]
        try:
            for thread in threads:
                thread.start()
                time.sleep(0.2)  # submit in order: the baseline's trials reach the pool first
            for thread in threads:
                thread.join()
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        manifest = self.manifest(started, time.time())
        write_json(self.out / COMPARE_FILE, manifest)
        return manifest


def cell_settings(config: dict[str, Any], sweep_spec: SweepSpec) -> dict[str, Any]:
    """What ``compare.json`` records of a cell's optimizer settings (before tuned values)."""
    return {"opt_args": config.get("opt_args") or {},
            "weight_decay": config.get("weight_decay"),
            "fallback_args": config.get("fallback_args") or None,
            "tuned": [] if sweep_spec.untuned else [
                "lr", *(t.name for t in sweep_spec.tune),
                *(a.name for a in sweep_spec.axes or ())]}


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux, where ``platform.processor()`` is empty)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor()


def load_compare(folder: str | Path) -> dict[str, Any]:
    """Read a results folder's ``compare.json``."""
    path = Path(folder) / COMPARE_FILE
    if not path.is_file():
        raise UsageError(f"{folder}: no {COMPARE_FILE} (not a valley compare results folder)")
    return json.loads(path.read_text())
