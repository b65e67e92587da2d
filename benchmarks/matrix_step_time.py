"""Step time of the matrix / normalized optimizers on LLaMA-shaped matrices, and
Newton-Schulz throughput.

For each optimizer: mean wall time of ``optimizer.step()`` over the hidden matrices of a
LLaMA-shaped stack (per layer: q/k/v/o ``d x d``, gate/up ``ffn x d``, down ``d x ffn``),
as a ratio to torch's fused AdamW and to ``torch.optim.Muon`` on the same tensors.
Newton-Schulz throughput (matrices per second, 5 steps) compares our batched
implementation with torch.optim.Muon's internal ``_zeropower_via_newtonschulz``.

Usage::

    python benchmarks/matrix_step_time.py [--dim 512 --ffn 1376 --layers 4 --reps 3]

Timings on a shared CPU are noisy; ratios measured in the same run are what to compare.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from collections.abc import Callable

import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import llmvalley
from llmvalley.optim.transforms.orthogonalize import NS_COEFFICIENTS, map_by_shape, orthogonalize

#: every registered matrix and normalized method, at its defaults
OURS = [s.name for s in llmvalley.list_optimizers() if s.family in ("matrix", "normalized")]
#: settings worth a row of their own: (label, optimizer, hyperparameters)
VARIANTS = [
    ("muon (ns_dtype=bfloat16)", "muon", dict(ns_dtype=torch.bfloat16)),
    ("conda (update_proj_gap=1: an SVD every step)", "conda", dict(update_proj_gap=1)),
]


def llama_matrices(dim: int, ffn: int, layers: int, device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = ([(dim, dim)] * 4 + [(ffn, dim)] * 2 + [(dim, ffn)]) * layers
    return [torch.nn.Parameter((0.02 * torch.randn(s, generator=gen)).to(device))
            for s in shapes]


def time_steps(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
               params: list[torch.nn.Parameter], reps: int, sync: Callable[[], None]) -> float:
    """Mean seconds per ``step()`` after one warm-up step (which creates the state)."""
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)
    opt = make(params)
    opt.step()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        opt.step()
    sync()
    return (time.perf_counter() - start) / reps


def ns_throughput(shape: tuple[int, int], batch: int, reps: int, device: str,
                  sync: Callable[[], None]) -> dict[str, float]:
    """Matrices per second of 5-step Newton-Schulz: ours (batched, fp32 and bf16) vs torch's
    per-matrix bf16 implementation."""
    gen = torch.Generator().manual_seed(2)
    mats = [torch.randn(shape, generator=gen).to(device) for _ in range(batch)]
    runs = {
        "torch.optim.Muon NS (bf16, per matrix)": lambda: [
            _zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7) for m in mats],
        "llmvalley NS (bf16, batched)": lambda: map_by_shape(
            mats, lambda x: orthogonalize(x, "newton_schulz", 5, dtype=torch.bfloat16)),
        "llmvalley NS (fp32, batched)": lambda: map_by_shape(
            mats, lambda x: orthogonalize(x, "newton_schulz", 5, dtype=torch.float32)),
    }
    out = {}
    for label, fn in runs.items():
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        out[label] = batch * reps / (time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", help="comma-separated subset of the optimizers")
    args = ap.parse_args()
    ours = args.only.split(",") if args.only else OURS
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    params = llama_matrices(args.dim, args.ffn, args.layers, device)
    n = sum(p.numel() for p in params)
    print(f"# matrix optimizer step time ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} "
          "UTC)")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device "
          f"{device}, threads {torch.get_num_threads()}; {len(params)} matrices "
          f"(d={args.dim}, ffn={args.ffn}, {args.layers} layers, {n / 1e6:.1f}M params), "
          f"{args.reps} timed steps after 1 warm-up\n")

    def fresh() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(p.detach().clone()) for p in params]

    adamw = time_steps(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), fresh(),
                       args.reps, sync)
    muon = time_steps(lambda ps: torch.optim.Muon(ps, lr=0.02), fresh(), args.reps, sync)
    rows = [("torch.optim.AdamW (fused)", adamw), ("torch.optim.Muon", muon)]
    for name in ours:
        rows.append((name, time_steps(lambda ps, name=name: llmvalley.create_optimizer(
            name, ps), fresh(), args.reps, sync)))
    for label, name, hp in [v for v in VARIANTS if v[1] in ours]:
        rows.append((label, time_steps(lambda ps, name=name, hp=hp: llmvalley.create_optimizer(
            name, ps, **hp), fresh(), args.reps, sync)))

    print("| optimizer | ms / step | vs fused AdamW | vs torch.optim.Muon |")
    print("|---|---:|---:|---:|")
    for label, sec in rows:
        print(f"| {label} | {sec * 1e3:.1f} | {sec / adamw:.2f}x | {sec / muon:.2f}x |")

    print("\nNewton-Schulz, 5 steps (matrices / second):\n")
    print("| shape | batch | implementation | matrices / s |")
    print("|---|---:|---|---:|")
    for shape in [(args.dim, args.dim), (args.ffn, args.dim)]:
        for label, rate in ns_throughput(shape, 4, args.reps, device, sync).items():
            print(f"| {shape[0]}x{shape[1]} | 4 | {label} | {rate:.1f} |")


if __name__ == "__main__":
    main()
