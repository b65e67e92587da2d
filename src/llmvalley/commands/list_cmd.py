"""``valley list``: print the optimizer registry as a table.

The registry imports torch (``llmvalley.optim`` does at module level), which costs seconds on a
busy machine, so the listing is cached as JSON in ``$LLMVALLEY_CACHE/listing/`` (default
``~/.cache/llmvalley``) under a fingerprint of llmvalley's version and the optimizer package's
source files (paths, sizes, modification times): any change to a recipe or the catalogue makes a
new listing. A process that has already imported the registry (and may have registered its own
optimizers) always lists the live registry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from llmvalley.atomic import replacing

#: the shape used to express state memory per parameter in the table
EXAMPLE_SHAPE = (4096, 4096)
LISTING_VERSION = 1  # bump when the cached listing's layout changes
CACHE_ENV = "LLMVALLEY_CACHE"


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


# ------------------------------------------------------------------------------ the listing
def live_listing() -> list[dict[str, str]]:
    """Every registered optimizer as plain strings (sorted by family, then name)."""
    from llmvalley.optim import list_optimizers

    return [{"name": s.name, "family": s.family, "applies_to": s.applies_to,
             "state": state_per_param(s), "paper": f"{s.paper.title} [arXiv {s.paper.arxiv}]",
             "details": describe(s)} for s in list_optimizers()]


def fingerprint() -> str:
    """Version and source files of the optimizer package (found without importing it)."""
    import llmvalley

    root = Path(llmvalley.__file__).resolve().parent
    digest = hashlib.sha1(f"{LISTING_VERSION} {llmvalley.__version__} {EXAMPLE_SHAPE}".encode())
    for path in sorted((root / "optim").rglob("*.py")):
        info = path.stat()
        digest.update(f"{path.relative_to(root)} {info.st_size} {info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_path() -> Path:
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "llmvalley"
    return root / "listing" / f"optimizers-{fingerprint()}.json"


def read_cached() -> list[dict[str, str]] | None:
    try:
        entries = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = {"name", "family", "applies_to", "state", "paper", "details"}
    if not isinstance(entries, list) or not all(isinstance(e, dict) and keys <= set(e)
                                                for e in entries):
        return None
    return entries


def write_cached(entries: list[dict[str, str]]) -> None:
    """Best effort: an unwritable cache only means the next listing imports the registry."""
    try:
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    except OSError:
        pass


def listing() -> list[dict[str, str]]:
    """The live registry when this process has loaded it, else the cached listing (made and
    cached from the registry when missing or stale)."""
    if "llmvalley.optim.registry" in sys.modules:
        return live_listing()
    entries = read_cached()
    if entries is None:
        entries = live_listing()
        write_cached(entries)
    return entries


# ------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    from llmvalley.cli import UsageError

    entries = listing()
    if args.details:
        found = [e for e in entries if e["name"] == args.details]
        if not found:  # the registry's own message, which lists the names
            from llmvalley.optim import get_spec

            try:
                get_spec(args.details)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            found = [e for e in live_listing() if e["name"] == args.details]
        print(found[0]["details"])
        return 0
    if args.family is not None:
        families = sorted({e["family"] for e in entries})
        if args.family not in families:
            raise UsageError(f"--family: unknown family {args.family!r}; accepted: "
                             f"{', '.join(families)}")
        entries = [e for e in entries if e["family"] == args.family]
    rows: list[list[Any]] = [[e["name"], e["family"], e["applies_to"], e["state"], e["paper"]]
                             for e in entries]
    print(format_table(rows, ["name", "family", "applies to", "state/param", "paper"]))
    print(f"\nstate/param: state elements per weight for a {EXAMPLE_SHAPE[0]}x"
          f"{EXAMPLE_SHAPE[1]} matrix with default hyperparameters.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list the registered optimizers")
    parser.add_argument("--family", help="only this family")
    parser.add_argument("--details", metavar="NAME", help="everything known about one optimizer")
    parser.set_defaults(func=run)
