"""Step time of every optimizer at this working tree against an earlier git revision, measured
in one process and interleaved (A/B), so that machine load hits both alike.

The base revision's package is extracted from git into a temporary folder and imported under
another name (``llmvalley_base``); both versions build the same optimizer on the same
LLaMA-shaped parameters and are timed round-robin (minimum of the repetitions).

    python benchmarks/revision_ab.py --base 21fd91f                 # every common optimizer
    python benchmarks/revision_ab.py --base 21fd91f --only adamw,came --reps 9 --markdown
    python benchmarks/revision_ab.py --base 21fd91f --only adamw --compiled  # both compiled
    python benchmarks/revision_ab.py --base a2c30a2 --only lion --compiled --state-dtype bfloat16

With ``--compiled`` both versions run ``implementation="compiled"`` (they compile in the
warm-up steps, at least two; the compile time is not part of the step time).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from step_time import LlamaShapedParams, machine, time_interleaved  # same folder

import llmvalley

ROOT = Path(__file__).resolve().parent.parent
#: hyperparameters a method cannot run without (Ranger21's schedule needs the run's length)
REQUIRED = {"ranger21": {"total_steps": 10_000}}


def import_revision(rev: str, folder: Path):
    """The package ``src/llmvalley`` of git revision ``rev``, imported as ``llmvalley_base``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/llmvalley"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    src = folder / "src" / "llmvalley"
    dest = folder / "llmvalley_base"
    src.rename(dest)
    for path in dest.rglob("*.py"):
        text = path.read_text()
        path.write_text(text.replace("llmvalley.", "llmvalley_base.")
                        .replace("import llmvalley\n", "import llmvalley_base\n"))
    sys.path.insert(0, str(folder))
    return importlib.import_module("llmvalley_base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", help="comma-separated optimizer names")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--compiled", action="store_true",
                        help='time implementation="compiled" in both versions')
    parser.add_argument("--state-dtype", choices=["bfloat16", "float16"],
                        help="store the optimizer state in this dtype (state_dtype=)")
    args = parser.parse_args()
    kw = {"implementation": "compiled"} if args.compiled else {}
    if args.state_dtype:
        kw["state_dtype"] = getattr(torch, args.state_dtype)
    warmup = max(args.warmup, 2) if args.compiled else args.warmup

    with tempfile.TemporaryDirectory() as tmp:
        base = import_revision(args.base, Path(tmp))
        torch.manual_seed(0)
        model = LlamaShapedParams(args.dim, args.ffn, args.layers, args.vocab)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        n_params = sum(p.numel() for p in params)
        ours = {s.name for s in llmvalley.list_optimizers()}
        theirs = {s.name for s in base.list_optimizers()}
        names = args.only.split(",") if args.only else sorted(ours & theirs)
        rows = []
        for name in names:
            hp = {**kw, **REQUIRED.get(name, {})}
            a = base.create_optimizer(name, model, nonfinite="ignore", lr=1e-4, **hp)
            b = llmvalley.create_optimizer(name, model, nonfinite="ignore", lr=1e-4, **hp)
            t_base, t_new = time_interleaved([a, b], "cpu", warmup, args.reps)
            rows.append((name, t_base, t_new))
            del a, b
    print(f"{n_params / 1e6:.1f}M parameters (d={args.dim}, ffn={args.ffn}, "
          f"layers={args.layers}, vocab={args.vocab}) on cpu ({machine('cpu')}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; base {args.base}, "
          f"{'implementation=compiled, ' if args.compiled else ''}"
          f"{f'state_dtype={args.state_dtype}, ' if args.state_dtype else ''}"
          f"minimum of {args.reps} interleaved repetitions")
    if args.markdown:
        print(f"\n| optimizer | {args.base} ms | this tree ms | ratio |")
        print("|---|---:|---:|---:|")
    for name, t_base, t_new in rows:
        if args.markdown:
            print(f"| {name} | {t_base * 1e3:.1f} | {t_new * 1e3:.1f} | "
                  f"{t_new / t_base:.2f}x |")
        else:
            print(f"{name:14} {t_base * 1e3:9.1f} {t_new * 1e3:9.1f} {t_new / t_base:6.2f}x")


if __name__ == "__main__":
    main()
