"""How many graphs the compiled tier compiles for each recipe as a run goes on: a recipe whose
count keeps growing recompiles at steps of its own (a number of the step specialising the
graph), which ``implementation="auto"`` stops after ``auto_tier.MAX_COMPILING_STEPS`` steps.

    python benchmarks/compile_graphs.py                      # every recipe, 30 steps
    python benchmarks/compile_graphs.py --only soap,spam --steps 60

Each recipe runs ``implementation="compiled"`` on the tests' tiny float32 model (a trainable
0-d gain included) for ``--steps`` steps; the counts after steps 5, 10, 20 and the last are
printed, with GROWING where the count rose after step 10.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llmvalley  # noqa: E402
from llmvalley.optim.compiled import compile_stats  # noqa: E402
from tests.helpers import make_model, make_optimizer, train  # noqa: E402 -- the tests' model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated optimizer names")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    names = args.only.split(",") if args.only else [s.name for s in llmvalley.list_optimizers()]
    marks = [m for m in (5, 10, 20) if m < args.steps] + [args.steps]
    print(f"graphs compiled after steps {marks}; torch {torch.__version__}")
    for name in names:
        start = time.perf_counter()
        try:
            model = make_model()
            opt = make_optimizer(name, model, implementation="compiled")
            counts = []
            for step in range(args.steps):
                train(model, opt, step, 1)
                counts.append(compile_stats(opt).graphs)
        except Exception as e:  # noqa: BLE001 -- report the failure and go on
            print(f"{name:24s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        shown = " ".join(str(counts[m - 1]) for m in marks)
        growing = "GROWING" if counts[-1] > counts[min(9, args.steps - 1)] else ""
        print(f"{name:24s} {shown:16s} {growing:8s} {time.perf_counter() - start:5.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
