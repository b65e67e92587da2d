"""Throughput of ``valley train``'s training loop against a minimal plain-PyTorch loop.

Both loops train the same model (same preset, initialisation seed and batches) with the same
optimizer for the same number of steps, in the same process, in ``--rounds`` back-to-back pairs
whose order alternates, so machine noise and drift hit both alike; the ratio is the median over
pairs. The valley loop is timed end to end (``Trainer.run``: data, forward/backward, clipping,
schedule, optimizer, logging, progress accounting) minus the time of its final evaluation; the
plain loop is batch -> forward -> backward -> clip -> step.

Reported: tokens/s of each loop, their ratio (target >= 0.95), and the optimizer's share of the
step time as recorded by the valley loop.

    python benchmarks/train_throughput.py --model nano --steps 30 --rounds 8 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from llmvalley.bench import Trainer, coerce_config
from llmvalley.bench.optimizers import build_optimizer
from llmvalley.data import train_batch


def valley_round(config: dict) -> tuple[float, float, Trainer]:
    """Seconds of training (evaluation excluded) and optimizer share of one valley run."""
    trainer = Trainer(coerce_config(config))
    eval_time = 0.0
    evaluate = trainer.evaluate

    def timed_evaluate() -> float:
        nonlocal eval_time
        t0 = time.perf_counter()
        result = evaluate()
        eval_time += time.perf_counter() - t0
        return result

    trainer.evaluate = timed_evaluate  # type: ignore[method-assign]
    t0 = time.perf_counter()
    summary = trainer.run()
    seconds = time.perf_counter() - t0 - eval_time
    return seconds, summary["optimizer_share"], trainer


def plain_round(trainer: Trainer, config: dict) -> float:
    """Seconds of a minimal loop over the same model shape, batches and optimizer
    (``trainer`` only lends its loaded workload)."""
    torch.manual_seed(config["seed"])
    model = type(trainer.model)(trainer.work.model_config)
    optimizer = build_optimizer(config["optimizer"], model, lr=config["lr"], weight_decay=None,
                                opt_args={}, fallback_args={})
    tokens, seq_len = trainer.work.train.tokens, trainer.work.seq_len
    t0 = time.perf_counter()
    for step in range(config["steps"]):
        x, y = train_batch(tokens, seed=config["seed"], step=step, micro=0,
                           batch_size=config["batch_size"], seq_len=seq_len)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--optimizer", action="append",
                        help="optimizers to measure (repeatable; default torch-adamw and adamw)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    optimizers = args.optimizer or ["torch-adamw", "adamw"]
    out_dir = tempfile.mkdtemp(prefix="valley-throughput-")
    print(f"# train_throughput: {args.model}, batch {args.batch_size}, {args.steps} steps, "
          f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| optimizer | valley tokens/s | plain tokens/s | ratio (median of rounds) "
          "| optimizer share |")
    print("|---|---|---|---|---|")
    for name in optimizers:
        config = dict(model=args.model, optimizer=name, lr=1e-3, steps=args.steps,
                      batch_size=args.batch_size, eval_every=10**9, eval_batches=1,
                      progress=False, quiet=True, seed=0, out=out_dir)
        valley_tps, plain_tps, ratios, shares = [], [], [], []
        warm = {**config, "steps": 5}  # first steps of a process are slow: run them unmeasured
        trainer = valley_round(warm)[2]
        plain_round(trainer, warm)
        for r in range(args.rounds):  # pairs in alternating order, so drift cancels
            if r % 2:
                plain_seconds = plain_round(trainer, config)
                seconds, share, trainer = valley_round(config)
            else:
                seconds, share, trainer = valley_round(config)
                plain_seconds = plain_round(trainer, config)
            n_tokens = args.steps * trainer.budget.tokens_per_step
            valley_tps.append(n_tokens / seconds)
            plain_tps.append(n_tokens / plain_seconds)
            ratios.append(plain_seconds / seconds)
            shares.append(share)
        print(f"| {name} | {statistics.median(valley_tps):,.0f} | "
              f"{statistics.median(plain_tps):,.0f} | {statistics.median(ratios):.3f} "
              f"({', '.join(f'{r:.3f}' for r in ratios)}) | {statistics.median(shares):.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
