"""Workload options shared by ``valley sweep`` and ``valley compare``.

They are ``valley train``'s options (same spelling, same parsing) less those a sweep decides per
run: optimizer, learning rate, seed, output folder, run name, checkpoints and console output.
"""

from __future__ import annotations

import argparse
from typing import Any

from llmvalley.bench.config import coerce_config, load_config_file, parse_key_values
from llmvalley.commands.train_cmd import LIST_OPTIONS, VALUE_OPTIONS

#: train options a sweep sets itself
SWEEP_OWNED = ("optimizer", "lr", "seed", "out", "name", "checkpoint_every")
WORKLOAD_OPTIONS = tuple(o for o in VALUE_OPTIONS if o[1] not in SWEEP_OWNED)


def add_workload_options(parser: argparse.ArgumentParser, *, with_model: bool = True) -> None:
    """Add the shared workload options (each defaults to "not given")."""
    group = parser.add_argument_group("workload (as in valley train, shared by every run)")
    group.add_argument("--config", metavar="FILE",
                       help="YAML, TOML or JSON file of workload options")
    for flag, key, metavar, text in WORKLOAD_OPTIONS:
        if key == "model" and not with_model:
            continue
        group.add_argument(flag, dest=f"w_{key}", metavar=metavar, help=text,
                           default=argparse.SUPPRESS)
    for flag, key, text in LIST_OPTIONS:
        group.add_argument(flag, dest=f"w_{key}", metavar="KEY=VALUE", action="append",
                           help=text, default=argparse.SUPPRESS)
    group.add_argument("--compile", dest="w_compile", action="store_true",
                       default=argparse.SUPPRESS, help="torch.compile the model")


def workload_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """The workload dict: ``base`` (a preset's), then ``--config``, then explicit options.

    Values are parsed and validated as a train config would (bad ones raise a UsageError).
    """
    workload: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        file_values = load_config_file(args.config)
        workload.update({k: v for k, v in file_values.items() if k not in SWEEP_OWNED})
    for key, value in vars(args).items():
        if key.startswith("w_"):
            name = key[2:]
            workload[name] = parse_key_values(name, value) if name.endswith("_args") else value
    config = coerce_config(workload)  # raises a one-line UsageError for bad values
    return {key: getattr(config, key) for key in workload}


def positive_int(flag: str, text: str | int) -> int:
    """Parse a positive integer option or raise a UsageError naming it."""
    from llmvalley.cli import UsageError

    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"{flag}: expected a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"{flag}: expected a positive integer, got {value}")
    return value


def positive_float(flag: str, text: str | float) -> float:
    """Parse a positive number option or raise a UsageError naming it."""
    from llmvalley.cli import UsageError

    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{flag}: expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{flag}: expected a positive number, got {text!r}")
    return value
