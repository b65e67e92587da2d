"""The cache-blocked eager step (``implementation="auto"`` on CPU, ``llmvalley.optim.blocked``)
against the foreach tier it replaces, and the block size.

Each row times, round-robin in one process (minimum of the repetitions), one element-wise
recipe with ``implementation="foreach"`` (every ``torch._foreach_*`` call over the whole
group) and with ``implementation="auto"`` before its compile threshold (the chain in blocks),
each block size of ``--blocks`` in its own optimizer, plus ``torch.optim.AdamW(fused=True)``
for scale. Results are bit-identical by construction (``tests/test_blocked.py``); this
measures only time. Usage::

    python benchmarks/blocked_step.py [--layers 2 --threads 1 --reps 7]
        [--only lion,nadam] [--blocks 262144,524288] [--markdown]
"""

from __future__ import annotations

import argparse
import os

import torch
from step_time import add_run_args, machine, params_with_gradients, time_interleaved

import llmvalley
from llmvalley.optim import blocked

#: recipes whose default runs blocked: element-wise ones in row blocks, then per-tensor ones
#: in blocks of whole tensors (adam/adamw run torch's fused kernel unless a shell option
#: such as caution changes their chain; ``fused=False`` asks for the plain foreach tier)
RECIPES = ("lion", "signum", "nadam", "grams", "ademamix", "adan", "laprop", "adabelief",
           "diffgrad", "exadam", "ano", "rmsprop", "adagrad", "schedulefree_adamw",
           "schedulefree_sgd",
           # blocks of whole tensors (per-tensor reductions)
           "adamp", "sgd_sai", "fadam", "adafactor", "came", "mars", "sinkgd",
           "adamw (cautious=True)")


class Blocked(torch.optim.Optimizer):
    """An ``"auto"`` optimizer whose blocks have ``block`` elements (its layout is made, and
    cached, at its first blocked step)."""

    def __init__(self, inner: torch.optim.Optimizer, block: int) -> None:
        self.inner, self.block = inner, block

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim signature
        saved, blocked.BLOCK_NUMEL = blocked.BLOCK_NUMEL, self.block
        try:
            return self.inner.step()
        finally:
            blocked.BLOCK_NUMEL = saved


def build(label: str, implementation: str, args: argparse.Namespace) -> torch.optim.Optimizer:
    """``label`` is a recipe name, optionally with keyword hyperparameters in parentheses."""
    name, _, extra = label.partition(" (")
    hp = eval(f"dict({extra.rstrip(')')})") if extra else {}  # noqa: S307 - our own labels
    model = params_with_gradients(args.dim, args.ffn, args.layers, args.vocab)
    return llmvalley.optim.create_optimizer(name, model, implementation=implementation, **hp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap, reps=7)
    ap.add_argument("--blocks", default=str(blocked.BLOCK_NUMEL),
                    help="comma-separated block sizes in elements")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LLMVALLEY_AUTO_COMPILE", "off")  # time the blocked eager step
    sizes = [int(b) for b in args.blocks.split(",")]
    names = args.only.split(",") if args.only else list(RECIPES)
    n = sum(p.numel() for p in params_with_gradients(args.dim, args.ffn, args.layers,
                                                     args.vocab).parameters())
    header = (f"{machine('cpu')}, {args.threads} thread(s), torch {torch.__version__}; "
              f"{n / 1e6:.1f}M LLaMA-shaped parameters (d={args.dim}, ffn={args.ffn}, "
              f"layers={args.layers}, vocab={args.vocab}); minimum of {args.reps} "
              f"round-robin repetitions after 2 warm-up steps")
    cols = [f"blocked {b} / foreach" for b in sizes]
    rows = []
    for label in names:
        fused = torch.optim.AdamW(list(params_with_gradients(
            args.dim, args.ffn, args.layers, args.vocab).parameters()), fused=True)
        opts = [fused, build(label, "foreach", args)]
        opts += [Blocked(build(label, "auto", args), b) for b in sizes]
        t = time_interleaved(opts, "cpu", warmup=2, reps=args.reps)
        rows.append((label, t[1] / t[0], [x / t[1] for x in t[2:]], t[1] * 1e3))
        print(f"  {label:22s} foreach {t[1] * 1e3:7.2f} ms ({t[1] / t[0]:.2f}x fused AdamW)  "
              + "  ".join(f"{c} {x / t[1]:.2f}x" for c, x in zip(cols, t[2:])), flush=True)
    print()
    print(header)
    if args.markdown:
        print()
        print("| recipe | foreach ms | foreach / fused AdamW | " + " | ".join(cols) + " |")
        print("|---|---:|---:|" + "---:|" * len(cols))
        for label, vs_fused, ratios, ms in rows:
            print(f"| {label} | {ms:.1f} | {vs_fused:.2f}x | "
                  + " | ".join(f"{r:.2f}x" for r in ratios) + " |")


if __name__ == "__main__":
    main()
