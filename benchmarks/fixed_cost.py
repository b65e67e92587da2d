"""The fixed (per-step, size-independent) cost of ``step()`` with warm and with cold caches.

A step on a few small tensors is almost all Python: the shell, the chain and the kernel
launches. In a training loop, or a benchmark that steps several optimizers in turn, the
memory-bound passes before it (backward, the other optimizers' steps) evict the interpreter's
code and objects from the caches, and the same Python then runs several times slower. This
times ``step()`` on ``--tensors`` tensors of ``--numel`` elements right after another step
(warm) and right after streaming ``--flush-mb`` MB through memory (cold), alternating, and
reports medians::

    OMP_NUM_THREADS=1 python benchmarks/fixed_cost.py --only schedulefree_sgd,lion,adamw
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step_time import machine  # same folder

import llmvalley


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="schedulefree_sgd,lion,adamw")
    parser.add_argument("--tensors", type=int, default=5)
    parser.add_argument("--numel", type=int, default=256)
    parser.add_argument("--flush-mb", type=int, default=64)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--nonfinite", default="raise", choices=("raise", "ignore"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    flush = torch.zeros(args.flush_mb << 18)  # float32: 4 bytes each
    print(f"{machine('cpu')}, 1 thread, torch {torch.__version__}; {args.tensors} tensors of "
          f"{args.numel} elements, nonfinite={args.nonfinite!r}; cold = after streaming "
          f"{args.flush_mb} MB; median of {args.reps} steps each")
    for name in args.only.split(","):
        params = []
        for _ in range(args.tensors):
            p = torch.nn.Parameter(torch.ones(args.numel))
            p.grad = torch.randn(args.numel) * 1e-3
            params.append(p)
        opt = llmvalley.create_optimizer(name, params, nonfinite=args.nonfinite)
        for _ in range(5):
            opt.step()
        warm, cold = [], []
        for i in range(2 * args.reps):
            if i % 2:
                flush.add_(1.0)
            t0 = time.perf_counter()
            opt.step()
            (cold if i % 2 else warm).append(time.perf_counter() - t0)
        w, c = statistics.median(warm), statistics.median(cold)
        print(f"  {name:18} warm {w * 1e6:6.0f} us   cold {c * 1e6:6.0f} us   "
              f"cold / warm {c / w:4.1f}x", flush=True)


if __name__ == "__main__":
    main()
