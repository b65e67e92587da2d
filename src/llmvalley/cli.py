"""The ``valley`` command: one entry point whose sub-commands live in their own modules.

Each sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (called with the parsed namespace, returning an exit status). Building the parser must
not import torch (``valley --help`` stays fast): sub-commands import it in ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

# Sub-command modules, in the order they are listed by ``valley --help``.
COMMAND_MODULES = (
    "llmvalley.commands.list_cmd",
    "llmvalley.commands.train_cmd",
    "llmvalley.commands.sweep_cmd",
    "llmvalley.commands.compare_cmd",
    "llmvalley.commands.report_cmd",
    "llmvalley.commands.eval_cmd",
)


class UsageError(Exception):
    """A user error that the CLI reports as one line with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="valley", description="llmvalley: LLM optimizers and a benchmark to compare them."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a command whose module is not present yet
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"valley {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # RunInterrupted (a KeyboardInterrupt) carries the signal
        print(f"valley {args.command}: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)


if __name__ == "__main__":
    # Run the package's copy of this module, so that ``UsageError`` raised by sub-commands
    # (imported from ``llmvalley.cli``) is the class caught in ``main``.
    from llmvalley.cli import main as package_main

    sys.exit(package_main())
