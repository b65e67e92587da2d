"""Step time of the matrix / normalized optimizers on LLaMA-shaped matrices, and
Newton-Schulz throughput.

For each optimizer: mean wall time of ``optimizer.step()`` over the hidden matrices of a
LLaMA-shaped stack (per layer: q/k/v/o ``d x d``, gate/up ``ffn x d``, down ``d x ffn``),
as a ratio to torch's fused AdamW, to ``torch.optim.Muon`` and to a plain per-matrix float32
loop of Keller Jordan's reference Muon update on the same tensors. Newton-Schulz throughput
(matrices per second, 5 steps) compares our batched implementation, in each ``ns_form``, with
torch.optim.Muon's internal ``_zeropower_via_newtonschulz``.

Usage::

    python benchmarks/matrix_step_time.py [--dim 512 --ffn 1376 --layers 4 --reps 3]
        [--threads N] [--only muon,adamuon]

Optimizers are timed round-robin, one ``step()`` each per round, and each row reports the
median over the rounds, so load from other processes hits every row alike; on a shared CPU
ratios measured in the same run are what to compare.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import llmvalley
from llmvalley.optim.transforms.orthogonalize import NS_COEFFICIENTS, orthogonalize_matrices

#: every registered matrix and normalized method, at its defaults
OURS = [s.name for s in llmvalley.list_optimizers() if s.family in ("matrix", "normalized")]
#: settings worth a row of their own: (label, optimizer, hyperparameters)
VARIANTS = [
    ("muon (ns_dtype=bfloat16)", "muon", dict(ns_dtype=torch.bfloat16)),
    ("muon (ns_form=standard)", "muon", dict(ns_form="standard")),
    ("muon (ns_form=symmetric)", "muon", dict(ns_form="symmetric")),
    ("muon (ns_form=auto)", "muon", dict(ns_form="auto")),
    ("muon (ns_form=auto, ns_dtype=float32)", "muon", dict(ns_form="auto", ns_dtype=torch.float32)),
    ("muon (ns_dtype=float32)", "muon", dict(ns_dtype=torch.float32)),
    *[(f"{name} (ns_form=auto)", name, dict(ns_form="auto"))
      for name in ("adamuon", "namo", "namo_d", "cosmos", "auon_hybrid")],
    ("conda (update_proj_gap=1: an SVD every step)", "conda", dict(update_proj_gap=1)),
]
NS_FORM_ROWS = ("standard", "symmetric", "gram", "auto")


class KellerMuonFP32:
    """Peer: Keller Jordan's reference Muon update (KellerJordan/Muon ``muon_update`` with its
    ``zeropower_via_newtonschulz5``), one matrix at a time in float32 (no bf16 cast), written
    out from its equations: Nesterov momentum ``b = lerp(b, g, 1 - mu)``, ``u = lerp(g, b, mu)``;
    ``X = u / (||u||_F + 1e-7)`` (wide orientation), five ``X <- a X + (b A + c A^2) X`` with
    ``A = X X^T``; ``W <- W (1 - lr wd) - lr sqrt(max(1, rows / cols)) X``."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float = 0.02,
                 momentum: float = 0.95, weight_decay: float = 0.0) -> None:
        self.params = params
        self.lr, self.mu, self.wd = lr, momentum, weight_decay
        self.bufs = [torch.zeros_like(p) for p in params]

    @staticmethod
    def orthogonalize(u: torch.Tensor) -> torch.Tensor:
        a, b, c = NS_COEFFICIENTS
        x = u.float()
        tall = x.size(0) > x.size(1)
        if tall:
            x = x.T
        x = x / (x.norm() + 1e-7)
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        return x.T if tall else x

    @torch.no_grad()
    def step(self) -> None:
        for p, buf in zip(self.params, self.bufs):
            buf.lerp_(p.grad, 1 - self.mu)
            update = p.grad.lerp(buf, self.mu)
            ortho = self.orthogonalize(update) * max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1 - self.lr * self.wd).add_(ortho.to(p.dtype), alpha=-self.lr)


def llama_matrices(dim: int, ffn: int, layers: int, device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = ([(dim, dim)] * 4 + [(ffn, dim)] * 2 + [(dim, ffn)]) * layers
    return [torch.nn.Parameter((0.02 * torch.randn(s, generator=gen)).to(device))
            for s in shapes]


def time_round_robin(makers: dict[str, Callable[[list[torch.nn.Parameter]], object]],
                     params: list[torch.nn.Parameter], reps: int, sync: Callable[[], None],
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per ``step()`` of each optimizer, timed one step each per round (after one
    warm-up step, which creates the state), each on its own copy of ``params``."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen).to(p.device) for p in params]
    opts = {}
    for label, make in makers.items():
        own = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, g in zip(own, grads):
            p.grad = g.clone()
        opts[label] = make(own)
        opts[label].step()
    sync()
    times: dict[str, list[float]] = {label: [] for label in opts}
    for _ in range(reps):
        for label, opt in opts.items():
            start = clock()
            opt.step()
            sync()
            times[label].append(clock() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def ns_throughput(shape: tuple[int, int], batch: int, reps: int, device: str,
                  sync: Callable[[], None],
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Matrices per second of 5-step Newton-Schulz: ours (the optimizers' batched path,
    ``orthogonalize_matrices``, each ``ns_form``, bf16 and fp32, results cast back to fp32) vs
    torch's per-matrix bf16 implementation and a per-matrix fp32 loop of Keller Jordan's;
    round-robin, best of ``reps`` rounds."""
    gen = torch.Generator().manual_seed(2)
    mats = [torch.randn(shape, generator=gen).to(device) for _ in range(batch)]
    runs: dict[str, Callable[[], object]] = {
        "torch.optim.Muon NS (bf16, per matrix)": lambda: [
            _zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7) for m in mats],
        "Keller Jordan NS (fp32, per matrix)": lambda: [
            KellerMuonFP32.orthogonalize(m) for m in mats],
    }
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for form in NS_FORM_ROWS:
            group = dict(orthogonalizer="newton_schulz", ns_steps=5, ns_eps=1e-7,
                         ns_dtype=dtype, ns_form=form)
            runs[f"llmvalley NS ({label}, batched, ns_form={form})"] = (
                lambda group=group: orthogonalize_matrices(mats, group))
    best = dict.fromkeys(runs, float("inf"))
    for fn in runs.values():
        fn()
    for _ in range(reps):
        for label, fn in runs.items():
            sync()
            start = clock()
            fn()
            sync()
            best[label] = min(best[label], clock() - start)
    return {label: batch / sec for label, sec in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", help="comma-separated subset of the optimizers")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-ns", action="store_true", help="skip the Newton-Schulz table")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the process's CPU time (with --threads 1 on a CPU shared with "
                         "other jobs: immune to their preemption; with more threads it counts "
                         "spin-waits too)")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
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
          f"median of {args.reps} round-robin steps after 1 warm-up, {args.clock} clock\n")

    makers: dict[str, Callable[[list[torch.nn.Parameter]], object]] = {
        "torch.optim.AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch.optim.Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
        "Keller Jordan Muon (fp32, per matrix)": lambda ps: KellerMuonFP32(ps, lr=0.02),
    }
    for name in ours:
        makers[name] = lambda ps, name=name: llmvalley.create_optimizer(name, ps)
    for label, name, hp in [v for v in VARIANTS if v[1] in ours]:
        makers[label] = lambda ps, name=name, hp=hp: llmvalley.create_optimizer(name, ps, **hp)
    rows = time_round_robin(makers, params, args.reps, sync, clock)
    adamw, muon = rows["torch.optim.AdamW (fused)"], rows["torch.optim.Muon"]
    peer = min(muon, rows["Keller Jordan Muon (fp32, per matrix)"])

    print("| optimizer | ms / step | vs fused AdamW | vs torch.optim.Muon | vs faster Muon peer |")
    print("|---|---:|---:|---:|---:|")
    for label, sec in rows.items():
        print(f"| {label} | {sec * 1e3:.1f} | {sec / adamw:.2f}x | {sec / muon:.2f}x | "
              f"{sec / peer:.2f}x |")
    if args.no_ns:
        return

    print("\nNewton-Schulz, 5 steps (matrices / second, best of the rounds):\n")
    print("| shape | batch | implementation | matrices / s |")
    print("|---|---:|---|---:|")
    for shape in [(args.dim, args.dim), (args.ffn, args.dim)]:
        for label, rate in ns_throughput(shape, 4, args.reps, device, sync, clock).items():
            print(f"| {shape[0]}x{shape[1]} | 4 | {label} | {rate:.1f} |")


if __name__ == "__main__":
    main()
