"""``valley report RESULTS``: Markdown and self-contained HTML reports of a compare folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmvalley.cli import UsageError
from llmvalley.commands.workload_args import positive_float


def run(args: argparse.Namespace) -> int:
    from llmvalley.bench.report import write_report

    folder = Path(args.results)
    if not folder.is_dir():
        raise UsageError(f"results folder {folder} does not exist")
    margin = positive_float("--margin", args.margin) if args.margin is not None else None
    for path in write_report(folder, margin):
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command."""
    parser = subparsers.add_parser(
        "report", help="write report.md and report.html for a valley compare results folder",
        description="Analyse a valley compare results folder and write report.md, a "
                    "self-contained report.html (figures embedded), plots/*.png and "
                    "metrics.json into it.")
    parser.add_argument("results", metavar="RESULTS", help="the results folder")
    parser.add_argument("--margin", help="learning-rate sensitivity margin in nats (0.02)")
    parser.set_defaults(func=run)
