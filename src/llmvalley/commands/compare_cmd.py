"""``valley compare``: tune and compare several optimizers across model sizes, one protocol."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from llmvalley.bench.compare import PRESETS
from llmvalley.cli import UsageError
from llmvalley.commands.workload_args import (
    add_workload_options,
    positive_float,
    positive_int,
    workload_from_args,
)


def names(text: str | None, flag: str) -> list[str] | None:
    """A comma-separated list option (None when not given)."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    return items


def lr_centers(items: list[str] | None) -> dict[str, float]:
    """``--lr-center muon=0.02`` options as a dict."""
    result = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--lr-center: expected OPTIMIZER=LR, got {item!r}")
        result[name.strip()] = positive_float("--lr-center", value)
    return result


def check_search(search: str | None, tune: tuple) -> str | None:
    """The ``--search`` mode, checked against ``--tune`` (a UsageError when they clash)."""
    from llmvalley.bench.sweep import SEARCH_MODES

    if search is None:
        return None
    if search not in SEARCH_MODES:
        raise UsageError(f"--search: unknown mode {search!r}; accepted: "
                         f"{', '.join(SEARCH_MODES)}")
    if tune and search != "tpe":
        raise UsageError(f"--tune needs --search tpe (--search {search} chooses what it "
                         "tunes itself)")
    return search


def build_spec(args: argparse.Namespace):
    """The :class:`CompareSpec` from a preset (if any) and the options that override it."""
    from llmvalley.bench.compare import (
        CompareSpec,
        check_models,
        check_optimizers,
        check_shared_settings,
        parse_budgets,
    )
    from llmvalley.bench.sweep import TuneSpec

    preset = None
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UsageError(f"--preset: unknown preset {args.preset!r}; accepted: "
                             f"{', '.join(PRESETS)}")
        preset = PRESETS[args.preset]
    optimizers = names(args.optimizers, "--optimizers") or (
        list(preset.optimizers) if preset else None)
    models = names(args.models, "--models") or (list(preset.models) if preset else None)
    if optimizers is None or models is None:
        raise UsageError("give --optimizers and --models, or a --preset "
                         f"({', '.join(PRESETS)})")
    # a preset runs with whatever is registered; an explicit list must be all there
    available, skipped = check_optimizers(optimizers,
                                          skip_missing=args.optimizers is None)
    check_models(models)
    # an explicit budget (--steps, --tokens, --tokens-per-param) replaces the preset's
    explicit_budget = "w_steps" in vars(args) or "w_tokens" in vars(args)
    base = dict(preset.workload) if preset else {}
    if explicit_budget or args.tokens_per_param:
        base.pop("steps", None)
        base.pop("tokens", None)
    workload = workload_from_args(args, base=base)
    workload.pop("model", None)
    if args.tokens_per_param and explicit_budget:
        raise UsageError("give --tokens-per-param or --steps/--tokens, not both")
    if args.tokens_per_param:
        tokens_per_param = positive_float("--tokens-per-param", args.tokens_per_param)
    elif explicit_budget or preset is None:
        tokens_per_param = None
    else:
        tokens_per_param = preset.tokens_per_param

    def pick(option: str | None, flag: str, preset_value: int, default: int) -> int:
        if option is not None:
            return positive_int(flag, option)
        return preset_value if preset else default

    seeds = pick(args.seeds, "--seeds", preset.seeds if preset else 0, 3)
    centers = {**(preset.lr_centers if preset else {}), **lr_centers(args.lr_center)}
    tune = tuple(TuneSpec.parse(t) for t in args.tune or ())
    search = check_search(args.search, tune)
    check_shared_settings(available, workload, tune)
    budgets = (parse_budgets(args.budgets) if args.budgets is not None
               else list(preset.budgets) if preset else [1.0])
    return CompareSpec(
        optimizers=available, models=models, workload=workload, out=args.out,
        trials=pick(args.trials, "--trials", preset.trials if preset else 0, 5),
        grid_points=pick(args.grid_points, "--grid-points",
                         preset.grid_points if preset else 0, 4),
        factor=positive_float("--factor", args.factor), seeds=seeds,
        workers=pick(args.workers, "--workers", preset.workers if preset else 0, 1),
        tune=tune, lr_centers=centers,
        tokens_per_param=tokens_per_param, storage=args.storage, skipped=skipped,
        preset=args.preset, search=search, command=shlex.join(["valley", "compare", *sys.argv[2:]]),
        untuned=untuned_names(args.untuned, preset, available),
        method_args={k: v for k, v in (preset.method_args if preset else {}).items()
                     if k.split("@")[0] in available},
        budgets=budgets, keep_checkpoints=bool(getattr(args, "keep_checkpoints", False)))


def untuned_names(option: str | None, preset: Any, available: list[str]) -> list[str]:
    """The optimizers at zero tuning budget: ``--untuned`` (each must be compared), else the
    preset's."""
    if option is None:
        return [o for o in (preset.untuned if preset else ()) if o in available]
    names = [n.strip() for n in option.split(",") if n.strip()]
    stray = [n for n in names if n not in available]
    if stray:
        raise UsageError(f"--untuned: {', '.join(stray)} not among the compared optimizers "
                         f"({', '.join(available)})")
    return names


def run(args: argparse.Namespace) -> int:
    from llmvalley.bench.compare import Comparison, routing_summary

    spec = build_spec(args)
    if spec.skipped:
        print(f"skipped (not registered): {', '.join(spec.skipped)}")
    for line in routing_summary(spec.optimizers, spec.workload, spec.tune):
        print(line)
    budgets = (f" at budgets {', '.join(f'{b:g}x' for b in spec.budgets)}"
               if spec.budgets != [1.0] else "")
    print(f"comparing {', '.join(spec.optimizers)} on {', '.join(spec.models)}{budgets}: "
          f"{spec.trials} trials + {spec.seeds} seeds each, {spec.workers} worker(s); "
          f"results in {spec.out}", flush=True)
    started = time.time()
    manifest = Comparison(spec).run()
    print(f"finished in {(time.time() - started) / 60:.1f} min", flush=True)
    if not args.no_report:
        from llmvalley.bench.report import write_report

        paths = write_report(Path(spec.out))
        print("report: " + ", ".join(str(p) for p in paths))
    if manifest["errors"]:
        print("failed cells:\n  " + "\n  ".join(manifest["errors"]), file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command."""
    parser = subparsers.add_parser(
        "compare", help="tune and compare optimizers across model sizes",
        description="Run a sweep for every optimizer and model size with one shared workload "
                    "(data, batch, token budget, schedule, warmup) and one trial budget, re-run "
                    "each best configuration with several seeds, and write one results folder "
                    "with a report. The AdamW baseline uses betas (0.9, 0.95), weight decay 0.1 "
                    "unless the workload says otherwise. A shared --opt-arg goes to every "
                    "optimizer that accepts it; matrix methods train embeddings, head and norms "
                    "with AdamW at the tuned AdamW baseline's settings (--fallback-arg wins).")
    parser.add_argument("--preset", help="cpu-quick, cpu-families, cpu-curvature, memory, "
                        "cpu-scale or gpu-ladder (options below override it)")
    parser.add_argument("--optimizers", help="comma-separated, adamw included, e.g. "
                                             "adamw,muon,lion,adafactor")
    parser.add_argument("--models", help="comma-separated model presets, e.g. nano,micro")
    parser.add_argument("--out", default="results", help="results folder (results)")
    parser.add_argument("--trials", help="trial budget per optimizer and size (5)")
    parser.add_argument("--grid-points", help="learning rates in the first grid round (4)")
    parser.add_argument("--factor", default="2", help="grid factor (2)")
    parser.add_argument("--lr-center", action="append", metavar="OPTIMIZER=LR",
                        help="grid center of one optimizer (default: its default lr)")
    parser.add_argument("--tune", action="append", metavar="NAME=LOW:HIGH[:log]|NAME=A,B",
                        help="also tune this hyperparameter with TPE, for every optimizer")
    parser.add_argument("--search", metavar="MODE",
                        help="grid (learning rate only; the default), coordinate (coordinate "
                             "descent over the learning rate, beta2 or momentum, weight decay "
                             "and warmup of each method, Wen et al. 2025) or tpe (with --tune)")
    parser.add_argument("--untuned", metavar="NAMES",
                        help="comma-separated optimizers run at zero tuning budget: one trial "
                             "at their default learning rate, then the seeds (parameter-free "
                             "methods; cpu-families: prodigy)")
    parser.add_argument("--seeds", help="fresh seeds for each best configuration (3)")
    parser.add_argument("--workers", help="worker processes (1; cpu-quick: 2)")
    parser.add_argument("--budgets", metavar="B1,B2,...",
                        help="token budgets as multiples of the workload's steps or tokens, "
                             "e.g. 1,2,4: every size is compared at each (tuned and seeded "
                             "anew), and AdamW's loss is fitted against data, L(D) = a D^-b + c, "
                             "for each method's effective-data speedup (3 or more budgets; "
                             "cpu-scale: 1,2,4)")
    parser.add_argument("--tokens-per-param", help="token budget per size as a multiple of "
                                                   "its parameters (gpu-ladder: 20)")
    parser.add_argument("--storage", help="Optuna database URL (default: OUT/optuna.db)")
    parser.add_argument("--no-report", action="store_true", help="skip valley report")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="seed runs keep their final checkpoint (for valley eval)")
    add_workload_options(parser, with_model=False)
    parser.set_defaults(func=run)
