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


def describe(spec) -> str:
    """Everything the registry knows about one optimizer, as text."""
    defaults = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
    lines = [
        f"{spec.name} ({spec.family}, applies to {spec.applies_to})",
        f"  paper:        {spec.paper}",
        f"  reference:    {spec.reference}",
        f"  defaults:     {defaults}",
        f"  weight decay: {spec.weight_decay}",
        f"  state:        {state_per_param(spec)} elements per weight of a large matrix",
    ]
    if spec.notes:
        lines.append(f"  notes:        {spec.notes}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.details:
        from llmvalley.cli import UsageError
        from llmvalley.optim import get_spec

        try:
            spec = get_spec(args.details)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        print(describe(spec))
        return 0
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
    parser.add_argument("--details", metavar="NAME", help="everything known about one optimizer")
    parser.set_defaults(func=run)
