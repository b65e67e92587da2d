"""``valley sweep``: tune one optimizer's learning rate (and optionally more) on one workload."""

from __future__ import annotations

import argparse
import shlex
import sys

from llmvalley.cli import UsageError
from llmvalley.commands.workload_args import (
    add_workload_options,
    positive_float,
    positive_int,
    workload_from_args,
)


def run(args: argparse.Namespace) -> int:
    from llmvalley.bench.compare import check_optimizers
    from llmvalley.bench.sweep import Sweep, SweepSpec, TuneSpec
    from llmvalley.commands.compare_cmd import check_search

    check_optimizers([args.optimizer], skip_missing=False, need_baseline=False)
    workload = workload_from_args(args)
    tune = tuple(TuneSpec.parse(t) for t in args.tune or ())
    search = check_search(args.search, tune)
    if args.seeds < 0:
        raise UsageError(f"--seeds: expected 0 or more, got {args.seeds}")
    spec = SweepSpec(
        optimizer=args.optimizer, workload=workload, out=args.out,
        lr_center=positive_float("--lr-center", args.lr_center) if args.lr_center else None,
        factor=positive_float("--factor", args.factor),
        grid_points=positive_int("--grid-points", args.grid_points),
        trials=positive_int("--trials", args.trials),
        tune=tune, search=search, seeds=args.seeds, storage=args.storage, study_name=args.study,
        keep_checkpoints=args.keep_checkpoints)
    sweep = Sweep(spec)
    sweep.log = lambda message: print(message, flush=True)
    (spec.out / "command.txt").write_text(shlex.join(["valley", "sweep", *sys.argv[2:]]) + "\n")
    if args.workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                 max_tasks_per_child=1) as pool:
            result = sweep.run(pool, parallel=args.workers)
    else:
        result = sweep.run()
    best = result["best"]
    if best is None:
        print(f"no trial completed ({result['trials_counted']} trials); see {spec.out}")
        return 1
    seeds = [s["final_val_loss"] for s in result["seeds"] if s.get("final_val_loss") is not None]
    seed_text = (f"; seeds {', '.join(f'{v:.4f}' for v in seeds)}" if seeds else "")
    edge = " (at the edge of the grid: widen it with more --trials)" \
        if result["best_at_edge"] else ""
    others = {k: v for k, v in best["params"].items() if k != "lr"}
    print(f"best: lr {best['lr']:.4g}{f' {others}' if others else ''}, final val loss "
          f"{best['final_val_loss']:.4f}{edge}{seed_text}")
    print(f"sweep folder: {spec.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` sub-command."""
    parser = subparsers.add_parser(
        "sweep", help="tune one optimizer's learning rate on one workload",
        description="Tune the learning rate on a log grid (factor 2) that extends itself when "
                    "the best value is at an edge, or several hyperparameters with TPE "
                    "(--tune), under a fixed trial budget; then re-run the best configuration "
                    "with fresh seeds. Trials are kept in an Optuna database, so a killed sweep "
                    "continues where it stopped, and several processes or machines started "
                    "on one --storage share the study: each trial and seed runs once, within "
                    "the budget.")
    parser.add_argument("--optimizer", required=True, help="a registry name or torch-adamw")
    parser.add_argument("--out", default="sweeps/sweep", help="sweep folder (sweeps/sweep)")
    parser.add_argument("--trials", default="5", help="trial budget (5)")
    parser.add_argument("--grid-points", default="4",
                        help="learning rates in the first grid round (4)")
    parser.add_argument("--factor", default="2", help="grid factor between learning rates (2)")
    parser.add_argument("--lr-center", help="grid center (default: the optimizer's default lr)")
    parser.add_argument("--tune", action="append", metavar="NAME=LOW:HIGH[:log]|NAME=A,B",
                        help="also tune this hyperparameter with TPE (repeatable)")
    parser.add_argument("--search", metavar="MODE",
                        help="grid (learning rate only; the default), coordinate (coordinate "
                             "descent over the learning rate, beta2 or momentum, weight decay "
                             "and warmup, Wen et al. 2025) or tpe (with --tune)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="fresh seeds for the best configuration (3)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes running trials in parallel (1)")
    parser.add_argument("--storage", help="Optuna database URL or SQLite path "
                                          "(default: OUT/optuna.db)")
    parser.add_argument("--study", help="study name (default: MODEL/OPTIMIZER)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="seed runs keep their final checkpoint (for valley eval)")
    add_workload_options(parser)
    parser.set_defaults(func=run)
