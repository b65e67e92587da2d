"""``valley eval RUN_DIR --tasks ...``: lm-evaluation-harness tasks on a saved checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from llmvalley.cli import UsageError

EVAL_FILE = "lm_eval.json"  # in the run folder: every task's latest metrics


def run(args: argparse.Namespace) -> int:
    import importlib.util
    import json

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a folder (expected a valley train run folder)")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks: name one or more lm-eval tasks, e.g. --tasks "
                         "lambada_openai,hellaswag")
    limit = _number("--limit", args.limit)
    fewshot = int(_number("--num-fewshot", args.num_fewshot, integer=True, zero=True)) \
        if args.num_fewshot is not None else None
    batch_size = int(_number("--batch-size", args.batch_size, integer=True))
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("valley eval needs lm-evaluation-harness: pip install "
                         "'llmvalley[eval]' (or pip install lm-eval)")
    if not args.online:  # only data already present: fail at once rather than download
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llmvalley.bench.lm_eval_adapter import evaluate, load_run

    loaded = load_run(run_dir, tokenizer=args.tokenizer, device=args.device)
    result = evaluate(loaded, tasks, include=args.include or (), num_fewshot=fewshot,
                      limit=limit, batch_size=batch_size, device=args.device)
    out = Path(args.out) if args.out else run_dir / EVAL_FILE
    previous = json.loads(out.read_text()) if out.is_file() else {}
    merged = {**previous, "run_dir": str(run_dir),
              "results": {**previous.get("results", {}), **result["results"]}}
    out.write_text(json.dumps(merged, indent=2) + "\n")
    for task, metrics in result["results"].items():
        shown = ", ".join(f"{name.split(',')[0]} {value:.4g}" for name, value in metrics.items()
                          if isinstance(value, float) and "stderr" not in name)
        print(f"{task}: {shown}")
    print(f"results: {out}")
    return 0


def _number(option: str, text: str | None, *, integer: bool = False,
            zero: bool = False) -> float | None:
    """A positive number option (or None when not given); one-line error otherwise."""
    if text is None:
        return None
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise UsageError(f"{option}: expected a{'n integer' if integer else ' number'}, "
                         f"got {text!r}") from None
    if value < 0 or (value == 0 and not zero):
        raise UsageError(f"{option}: expected a {'non-negative' if zero else 'positive'} "
                         f"number, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` sub-command."""
    parser = subparsers.add_parser(
        "eval", help="run lm-eval tasks on a saved checkpoint",
        description="Evaluate a run folder's checkpoint (valley train, or a seed run of valley "
                    "sweep/compare with --keep-checkpoints) on lm-evaluation-harness tasks "
                    "through log-likelihoods (multiple choice, cloze, perplexity; generation "
                    "tasks are not supported). Needs the eval extra (pip install "
                    "'llmvalley[eval]'). Tasks run offline on data already present unless "
                    "--online. Results go to RUN_DIR/lm_eval.json.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder with checkpoint.pt")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include", action="append", metavar="FOLDER",
                        help="a folder (or file) of your own task YAMLs (repeatable)")
    parser.add_argument("--num-fewshot", help="few-shot examples (the task's default)")
    parser.add_argument("--limit", help="at most this many documents per task (a fraction "
                                        "below 1: that share)")
    parser.add_argument("--batch-size", default="16", help="sequences per forward pass (16)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--tokenizer", metavar="FILE",
                        help="the run's tokenizer.json, if it is no longer in the cache")
    parser.add_argument("--online", action="store_true",
                        help="let lm-eval download task data (default: offline)")
    parser.add_argument("--out", metavar="FILE", help=f"results file (RUN_DIR/{EVAL_FILE})")
    parser.set_defaults(func=run)
