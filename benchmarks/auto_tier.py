"""What ``implementation="auto"``'s move to the compiled tier costs and gains
(:mod:`llmvalley.optim.auto_tier`), per recipe and model size.

For each recipe and LLaMA-shaped size: the eager (foreach) and compiled step times, measured
round-robin in one process (minimum of the repetitions), the compile time (the compiled
optimizer's warm-up, ``compile_stats``), and what the rule makes of them: the step at which
``"auto"`` switches (threshold / parameters), the eager seconds spent before it, and the
steps the compiled step needs after the switch to repay its compile. The rent-or-buy rule is
right when the eager seconds before the switch are of the order of the compile time.

    OMP_NUM_THREADS=1 python benchmarks/auto_tier.py --markdown
    OMP_NUM_THREADS=1 python benchmarks/auto_tier.py --only nadam --sizes nano

Compile times depend on inductor's on-disk cache (a second run of the same recipe and shapes
compiles faster); the first run after a cache wipe is the cold figure.
"""

from __future__ import annotations

import argparse
import os

import torch
from step_time import machine, params_with_gradients, time_interleaved

import llmvalley
from llmvalley.optim import auto_tier
from llmvalley.optim.compiled import compile_stats

#: (dim, ffn, layers, vocab): the nano and micro presets' shapes (byte vocabulary) and a
#: 30M set of step_time.py's width
SIZES = {"nano": (128, 384, 4, 256), "micro": (256, 688, 6, 256),
         "30m": (512, 1376, 8, 4096)}
RECIPES = ("nadam", "lion", "ademamix", "laprop", "schedulefree_adamw")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(RECIPES))
    ap.add_argument("--sizes", default="nano,micro,30m")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    os.environ.pop(auto_tier.ENV, None)
    limit = auto_tier.threshold("cpu")
    assert limit is not None
    rows = []
    for size in args.sizes.split(","):
        shape = SIZES[size]
        for name in args.only.split(","):
            opts = []
            for impl in ("foreach", "compiled"):
                model = params_with_gradients(*shape)
                opts.append(llmvalley.create_optimizer(name, model, implementation=impl))
            n = sum(p.numel() for p in model.parameters())
            eager, compiled = time_interleaved(opts, "cpu", warmup=3, reps=args.reps)
            compile_s = compile_stats(opts[1]).seconds
            switch = limit / n
            saved = eager - compiled
            payback = compile_s / saved if saved > 0 else float("inf")
            rows.append((size, n, name, eager, compiled, compile_s, switch, switch * eager,
                         payback))
            print(f"{size} {name}: eager {eager * 1e3:.2f} ms, compiled {compiled * 1e3:.2f} ms, "
                  f"compile {compile_s:.1f} s", flush=True)
    head = (f"{machine('cpu')}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
            f"llmvalley {llmvalley.__version__}; threshold {limit:.0e} element-steps; "
            f"minimum of {args.reps} round-robin repetitions; 1-minute load average at the end "
            f"{os.getloadavg()[0]:.2f}")
    print("\n" + head + "\n")
    cols = ["size", "params", "recipe", "eager ms", "compiled ms", "compiled / eager",
            "compile s", "auto switches at step", "eager s before the switch",
            "steps to repay the compile"]
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * 2 + "---|" + "---:|" * (len(cols) - 3))
    for size, n, name, eager, compiled, compile_s, switch, before, payback in rows:
        cells = [size, f"{n / 1e6:.2f}M", name, f"{eager * 1e3:.2f}", f"{compiled * 1e3:.2f}",
                 f"{compiled / eager:.2f}x", f"{compile_s:.1f}",
                 f"{switch:,.0f}" if n >= auto_tier.MIN_NUMEL else "never (< 2^20 elements)",
                 f"{before:.0f}" if n >= auto_tier.MIN_NUMEL else "–", f"{payback:,.0f}"]
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
