"""What glibc's default malloc costs a foreach optimizer step on CPU, and what keeping freed
memory (``llmvalley.optim.allocator``) saves: page faults and CPU time per step.

Each optimizer runs in two fresh processes, one with the setting (the default) and one with
``LLMVALLEY_RETAIN_CPU_MEMORY=0``, alternating; the figures are per step after 3 warm-up
steps. Page faults are counted by the kernel, so they do not move with machine load; CPU time
(``time.process_time``) moves much less than wall time on a shared machine.

    python benchmarks/allocator.py                       # 3.7M LLaMA-shaped parameters
    python benchmarks/allocator.py --only nadam,adan --rounds 3
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
torch.set_num_threads(1)
ps = list(params_with_gradients({dim}, {ffn}, {layers}, {vocab}).parameters())
name = {name!r}
if name.startswith("torch."):
    cls = getattr(torch.optim, name.split(".")[1])
    opt = cls(ps, lr=1e-5, foreach=True)
    from llmvalley.optim.allocator import retain_freed_cpu_memory
    retain_freed_cpu_memory()  # as the shell does at its first CPU step
else:
    opt = llmvalley.create_optimizer(name, ps, lr=1e-5)
for _ in range(3):
    opt.step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
for _ in range({steps}):
    opt.step()
r1, t1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
print(json.dumps({{"faults": (r1 - r0) / {steps}, "cpu_ms": (t1 - t0) / {steps} * 1e3}}))
"""


def run(name: str, retain: bool, args: argparse.Namespace) -> dict[str, float]:
    code = CHILD.format(here=str(Path(__file__).parent), dim=args.dim, ffn=args.ffn,
                        layers=args.layers, vocab=args.vocab, name=name, steps=args.steps)
    env = {**os.environ, "LLMVALLEY_RETAIN_CPU_MEMORY": "1" if retain else "0"}
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
    args = parser.parse_args()
    print(f"{machine('cpu')}, 1 thread; minimum over {args.rounds} processes per setting\n")
    print("| optimizer | faults/step released | faults/step kept | CPU ms released | "
          "CPU ms kept | kept / released |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.only.split(","):
        res: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for retain in (False, True):
                res[retain].append(run(name, retain, args))
        best = {k: min(v, key=lambda r: r["cpu_ms"]) for k, v in res.items()}
        print(f"| {name} | {best[False]['faults']:.0f} | {best[True]['faults']:.0f} | "
              f"{best[False]['cpu_ms']:.1f} | {best[True]['cpu_ms']:.1f} | "
              f"{best[True]['cpu_ms'] / best[False]['cpu_ms']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
