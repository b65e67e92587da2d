"""Step time of the low-rank, projection and compressed-state methods (issue 13).

For each method, on the same LLaMA-shaped parameters with fixed gradients and in one process:

- the steady step (no subspace refresh in it), timed round-robin with
  ``torch.optim.AdamW(fused=True)`` and, where the official package runs here (``galore-torch``,
  ``fira``, ``apollo-torch``), with that package; printed as ratios;
- the subspace refresh (GaLore's SVD, APOLLO's new random projection, DCT's column selection,
  FRUGAL's re-selection and state reset, subspace momentum's SVD) timed apart: a second
  instance with ``update_proj_gap = G`` (4) runs ``3 G`` steps after its first, which hold
  exactly three refreshes; their extra time is the window's total less ``3 G`` median steps,
  over three. Amortized over the method's own gap (200 by default) it is the refresh's share
  of an average step.

Matrix methods train the hidden matrices and leave the rest to AdamW on both sides, as the
model router and the references' training scripts do.

    python benchmarks/lowrank_step_time.py --markdown            # 5.3M parameters, 1 thread
    python benchmarks/lowrank_step_time.py --only galore,frugal
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from reference_step_time import low_rank
from step_time import (
    add_run_args,
    machine,
    params_with_gradients,
    time_interleaved,
)
from torch import nn

import llmvalley

Factory = Callable[[nn.Module, int], torch.optim.Optimizer]
REFRESH_GAP = 4  # update_proj_gap of the refresh-timing instances

# name shown -> (registry name, our hyperparameters); the settings each paper's 60M run uses
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw8bit": ("adamw8bit", {}),
    "galore": ("galore", {"rank": 128, "scale": 0.25}),
    "fira": ("fira", {"rank": 128, "scale": 0.25}),
    "apollo": ("apollo", {"rank": 128, "scale": 1.0}),
    "apollo_mini": ("apollo_mini", {}),
    "frugal": ("frugal", {}),
    "frugal (blockwise)": ("frugal", {"proj_type": "blockwise"}),
    "online_subspace_descent": ("online_subspace_descent", {"rank": 128}),
    "dct_adamw": ("dct_adamw", {"rank": 128}),
    "subset_norm": ("subset_norm", {}),
    "subspace_momentum": ("subspace_momentum", {"rank": 128}),
    "smmf": ("smmf", {}),
    "microadam": ("microadam", {}),
}


def references() -> dict[str, Factory]:
    """The official packages that run on CPU: name -> (model, gap) -> optimizer, with the
    same settings as ours."""
    from apollo_torch import APOLLOAdamW
    from fira import FiraAdamW
    from galore_torch import GaLoreAdamW

    return {
        "galore": low_rank(GaLoreAdamW, rank=128, scale=0.25, proj_type="std"),
        "fira": low_rank(FiraAdamW, rank=128, alpha=0.25, proj_type="std"),
        "apollo": low_rank(APOLLOAdamW, rank=128, scale=1.0, proj_type="std",
                           proj="random", scale_type="channel"),
        "apollo_mini": low_rank(APOLLOAdamW, rank=1, scale=128.0, proj_type="std",
                                proj="random", scale_type="tensor"),
    }


def refresh_extra(make: Callable[[], torch.optim.Optimizer]) -> float:
    """Seconds a refresh adds to a step: ``3 G`` steps after the first hold three refreshes."""
    opt = make()
    opt.step()  # state creation and the first basis
    times = []
    for _ in range(3 * REFRESH_GAP):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return (sum(times) - len(times) * statistics.median(times)) / 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, layers=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def model() -> nn.Module:
        return params_with_gradients(args.dim, args.ffn, args.layers, args.vocab)

    refs = references()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (known: {', '.join(METHODS)})")
    rows = []
    for shown in names:
        name, hp = METHODS[shown]
        spec = llmvalley.get_spec(name)
        gap = spec.defaults.get("update_proj_gap")

        def ours(gap_now: int | None = None, name: str = name, hp: dict = hp) -> Any:
            extra = {"update_proj_gap": gap_now} if gap_now else {}
            return llmvalley.create_optimizer(name, model(), nonfinite="ignore", **hp, **extra)

        opts = [ours(), torch.optim.AdamW(model().parameters(), lr=1e-3, fused=True)]
        ref = refs.get(shown)
        if ref is not None:
            opts.insert(1, ref(model(), gap or 200))
        times = time_interleaved(opts, "cpu", 2, args.reps)
        t_ours, t_fused = times[0], times[-1]
        t_ref = times[1] if ref is not None else None
        extra_ours = refresh_extra(lambda: ours(REFRESH_GAP)) if gap else None
        extra_ref = (refresh_extra(lambda ref=ref: ref(model(), REFRESH_GAP))
                     if gap and ref is not None else None)
        rows.append((shown, t_ours, t_fused, t_ref, gap, extra_ours, extra_ref))
    n = sum(p.numel() for p in model().parameters())
    print(f"{machine('cpu')}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{n / 1e6:.1f}M LLaMA-shaped parameters (d={args.dim}, ffn={args.ffn}, "
          f"layers={args.layers}, vocab={args.vocab}); steady steps: minimum of {args.reps} "
          f"round-robin repetitions; refresh: gap {REFRESH_GAP}, three refreshes")

    def ms(x: float | None, digits: int = 1) -> str:
        if x is None:
            return "–"
        return "<1" if digits == 0 and x < 1e-3 else f"{x * 1e3:.{digits}f}"  # within noise

    header = ("| method | ms/step | vs fused AdamW | vs reference | refresh ms (ours / reference) "
              "| gap | refresh amortized, % of a step |")
    if args.markdown:
        print("\n" + header)
        print("|---|---:|---:|---:|---:|---:|---:|")
    for shown, t, t_fused, t_ref, gap, e_ours, e_ref in rows:
        vs_ref = "–" if t_ref is None else f"{t / t_ref:.2f}x"
        refresh = "–" if e_ours is None else f"{ms(e_ours, 0)} / {ms(e_ref, 0)}"
        share = "–" if e_ours is None else f"{max(0.0, 100 * e_ours / gap / t):.1f} %"
        cells = [shown, ms(t), f"{t / t_fused:.2f}x", vs_ref, refresh, str(gap or "–"), share]
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
