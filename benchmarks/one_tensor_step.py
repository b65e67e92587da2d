"""Compiled-tier step time of a group holding one tensor, against torch's fused AdamW.

A group of one tensor is a path of its own through dynamo (one per-tensor number where a
larger group shares it): until d0ff075 it broke Adam's graph, and the segment then ran as
one small graph per transform. This times ``implementation="compiled"`` on one square
matrix, interleaved with ``torch.optim.AdamW(fused=True)`` on a copy (minimum of the
repetitions), and with ``--base REV`` the same at an earlier git revision
(``revision_ab.import_revision``)::

    OMP_NUM_THREADS=1 python benchmarks/one_tensor_step.py --only adamw,adamp --base 8afccfb
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from revision_ab import import_revision  # same folder
from step_time import machine, time_interleaved

import llmvalley


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="adam,adamw,adamp")
    parser.add_argument("--size", type=int, default=2048, help="the matrix is size x size")
    parser.add_argument("--base", help="also time this git revision's compiled tier")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    versions = {"this tree": llmvalley}
    with tempfile.TemporaryDirectory() as tmp:
        if args.base:
            versions[args.base] = import_revision(args.base, Path(tmp))
        print(f"{machine('cpu')}, {args.threads} thread(s), torch {torch.__version__}; one "
              f"{args.size}x{args.size} float32 tensor, nonfinite='ignore'")
        for name in args.only.split(","):
            opts = []
            for lib in versions.values():
                torch.manual_seed(0)
                p = torch.nn.Parameter(torch.randn(args.size, args.size))
                p.grad = torch.randn_like(p) * 1e-3
                opts.append(lib.create_optimizer(name, [p], implementation="compiled",
                                                 nonfinite="ignore"))
            q = torch.nn.Parameter(torch.randn(args.size, args.size))
            q.grad = torch.randn_like(q) * 1e-3
            opts.append(torch.optim.AdamW([q], fused=True))
            times = time_interleaved(opts, "cpu", warmup=4, reps=args.reps)
            fused = times[-1]
            cells = [f"{label} {t * 1e3:.2f} ms ({t / fused:.2f}x)"
                     for label, t in zip(versions, times)]
            print(f"  {name:10} " + ", ".join(cells) + f"; fused AdamW {fused * 1e3:.2f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
