"""What glibc's default malloc costs an optimizer step on CPU, and what keeping freed memory
(``llmvalley.optim.allocator``) saves: page faults and CPU time per step.

Each optimizer runs in fresh processes, alternating between three settings:

- released: ``LLMVALLEY_RETAIN_CPU_MEMORY=0``, glibc's defaults;
- kept <= 32 MiB: the setting as first shipped (mmap threshold 32 MiB, trim threshold 1 GiB),
  under which larger blocks were still mapped afresh;
- kept: the setting now applied by default, which also turns mmap off (``M_MMAP_MAX`` = 0).

The figures are per step after 3 warm-up steps (which also hold a compiled tier's compile).
Page faults are counted by the kernel, so they do not move with machine load; CPU time
(``time.process_time``) moves much less than wall time on a shared machine.

    python benchmarks/allocator.py                       # 3.7M LLaMA-shaped parameters
    python benchmarks/allocator.py --only nadam,adan --rounds 3
    python benchmarks/allocator.py --dim 512 --ffn 1376 --layers 4 --vocab 32000 \
        --only came,adafactor --implementation compiled   # 45M: a 64 MiB embedding
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from step_time import add_shape_args, machine

CHILD = """
import json, resource, sys, time
import torch
sys.path.insert(0, {here!r})
from step_time import params_with_gradients
import llmvalley
from llmvalley.optim import allocator
torch.set_num_threads(1)
if {setting!r} != "released":
    allocator.retain_freed_cpu_memory()  # as the shell does at its first CPU step
if {setting!r} == "kept <= 32 MiB":  # glibc's default M_MMAP_MAX again
    import ctypes
    ctypes.CDLL(None).mallopt(allocator.M_MMAP_MAX, 65536)
ps = list(params_with_gradients({dim}, {ffn}, {layers}, {vocab}).parameters())
name = {name!r}
if name.startswith("torch."):
    cls = getattr(torch.optim, name.split(".")[1])
    opt = cls(ps, lr=1e-5, foreach=True)
else:
    opt = llmvalley.create_optimizer(name, ps, lr=1e-5, **{kw!r})
for _ in range(3):
    opt.step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
for _ in range({steps}):
    opt.step()
r1, t1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
print(json.dumps({{"faults": (r1 - r0) / {steps}, "cpu_ms": (t1 - t0) / {steps} * 1e3}}))
"""


SETTINGS = ("released", "kept <= 32 MiB", "kept")


def run(name: str, setting: str, args: argparse.Namespace) -> dict[str, float]:
    kw = {"implementation": args.implementation} if args.implementation else {}
    code = CHILD.format(here=str(Path(__file__).parent), dim=args.dim, ffn=args.ffn,
                        layers=args.layers, vocab=args.vocab, name=name, steps=args.steps,
                        setting=setting, kw=kw)
    env = {**os.environ, "LLMVALLEY_RETAIN_CPU_MEMORY": "0" if setting == "released" else "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting")
    parser.add_argument("--only", default="adamw,nadam,laprop,adan,ademamix,lion,adafactor,"
                        "prodigy,schedulefree_sgd,schedulefree_adamw,torch.NAdam,torch.Adam")
    parser.add_argument("--implementation", default=None,
                        help="tier for llmvalley recipes (default: the recipe's default)")
    args = parser.parse_args()
    print(f"{machine('cpu')}, 1 thread; minimum over {args.rounds} processes per setting; "
          f"implementation: {args.implementation or 'default'}\n")
    cells = " | ".join(f"{what} {s}" for what in ("faults/step", "CPU ms") for s in SETTINGS)
    print(f"| optimizer | {cells} | kept / released | kept / kept <= 32 MiB |")
    print("|---|" + "---:|" * (2 * len(SETTINGS) + 2))
    for name in args.only.split(","):
        res: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
        for _ in range(args.rounds):
            for setting in SETTINGS:
                res[setting].append(run(name, setting, args))
        best = {k: min(v, key=lambda r: r["cpu_ms"]) for k, v in res.items()}
        faults = " | ".join(f"{best[s]['faults']:.0f}" for s in SETTINGS)
        ms = " | ".join(f"{best[s]['cpu_ms']:.1f}" for s in SETTINGS)
        kept = best["kept"]["cpu_ms"]
        print(f"| {name} | {faults} | {ms} | {kept / best['released']['cpu_ms']:.2f}x | "
              f"{kept / best['kept <= 32 MiB']['cpu_ms']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
