"""``valley list``: print the optimizer registry as a table."""

from __future__ import annotations

import argparse

from llmvalley.optim import list_optimizers

#: the shape used to express state memory per parameter in the table
EXAMPLE_SHAPE = (4096, 4096)


def state_per_param(spec, shape: tuple[int, ...] = EXAMPLE_SHAPE) -> str:
    """State elements per parameter element for a large matrix, e.g. ``2`` or ``0.0005``."""
    ratio = spec.state_numel(shape) / (shape[0] * shape[1])
    return f"{ratio:g}"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    specs = list_optimizers(args.family)
    rows = [
        [s.name, s.family, s.applies_to, state_per_param(s), f"{s.paper.title} "
         f"[arXiv {s.paper.arxiv}]"]
        for s in specs
    ]
    print(format_table(rows, ["name", "family", "applies to", "state/param", "paper"]))
    print(f"\nstate/param: state elements per weight for a {EXAMPLE_SHAPE[0]}x"
          f"{EXAMPLE_SHAPE[1]} matrix with default hyperparameters.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list the registered optimizers")
    parser.add_argument("--family", help="only this family")
    parser.set_defaults(func=run)
