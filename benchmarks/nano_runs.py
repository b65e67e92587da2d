"""A short `nano` training run per optimizer, at each optimizer's default learning rate.

A smoke check that every method trains a real language model end to end (through
``create_optimizer(name, model)``'s routing), not a comparison: nothing is tuned.

    python benchmarks/nano_runs.py --family matrix,normalized --steps 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import llmvalley
from llmvalley.bench import train


def first_train_loss(run_dir: str) -> float:
    with open(Path(run_dir) / "log.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if "train_loss" in record:
                return record["train_loss"]
    raise ValueError(f"no train loss logged in {run_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", help="comma-separated families (default: all)")
    parser.add_argument("--only", help="comma-separated optimizer names")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    families = args.family.split(",") if args.family else None
    specs = [s for s in llmvalley.list_optimizers()
             if (families is None or s.family in families)
             and (not args.only or s.name in args.only.split(","))]
    print(f"nano preset, stdlib bytes, {args.steps} steps of {args.batch_size} x 128 tokens, "
          "cosine with 10% warmup, each optimizer's default lr (matrix methods: AdamW fallback "
          "with the spec's fallback settings for embeddings, head, norms)\n")
    print("| optimizer | lr | first train loss | final val loss | unigram entropy | diverged |")
    print("|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as out:
        for spec in specs:
            summary = train({
                "model": "nano", "optimizer": spec.name, "lr": spec.defaults["lr"],
                "steps": args.steps, "batch_size": args.batch_size,
                "eval_every": args.steps, "quiet": True, "out": out,
            })
            print(f"| {spec.name} | {spec.defaults['lr']:g} | "
                  f"{first_train_loss(summary['run_dir']):.3f} | "
                  f"{summary['final_val_loss']:.3f} | {summary['unigram_entropy']:.3f} | "
                  f"{summary['diverged']} |", flush=True)


if __name__ == "__main__":
    main()
