"""Step time of the methods that have an official PyPI package, against that package and
``torch.optim.AdamW(fused=True)``, on the same LLaMA-shaped parameters, in one process.

Each row times three optimizers round-robin (ours, the reference, fused AdamW; minimum of
the repetitions) and prints ours / fused AdamW and ours / reference. Low-rank methods run on
the hidden matrices with AdamW for the rest on both sides (the reference with one group per
kind, as its training scripts build them). "first step" is the first ``step()`` of a fresh
optimizer, which creates the state and, for GaLore-type methods, computes the first basis
(the refresh that recurs every ``update_proj_gap`` steps), shown apart from the steady step.

    python benchmarks/reference_step_time.py                    # ~6M parameters, CPU
    python benchmarks/reference_step_time.py --only galore,prodigy --markdown
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from step_time import (
    add_run_args,
    hidden_and_rest,
    machine,
    params_with_gradients,
    time_interleaved,
)
from torch import nn

import llmvalley

Factory = Callable[[nn.Module], torch.optim.Optimizer]


def low_rank(cls: Callable, **group: object) -> Callable[..., torch.optim.Optimizer]:
    """A GaLore-style package optimizer on the hidden matrices (``group`` settings; ``gap``
    overrides ``update_proj_gap``), the rest in a plain group."""
    def make(model: nn.Module, gap: int | None = None) -> torch.optim.Optimizer:
        hidden, rest = hidden_and_rest(model)
        extra = {"no_deprecation_warning": True} if "galore" in cls.__module__ or \
            "fira" in cls.__module__ else {}
        settings = {**group, **({"update_proj_gap": gap} if gap else {})}
        return cls([{"params": hidden, **settings}, {"params": rest}], lr=1e-3, **extra)
    return make


def references() -> dict[str, tuple[dict, Factory]]:
    """Our name -> (our hyperparameters, the reference's constructor), same settings."""
    import adamp
    import dadaptation
    import dog
    import kron_torch
    import prodigyopt
    import schedulefree
    import sophia_opt
    from apollo_torch import APOLLOAdamW
    from fira import FiraAdamW
    from galore_torch import GaLoreAdamW

    def plain(make: Callable) -> Factory:
        return lambda model: make(list(model.parameters()))

    def schedule_free(model: nn.Module) -> torch.optim.Optimizer:
        opt = schedulefree.AdamWScheduleFree(list(model.parameters()), lr=1e-3)
        opt.train()
        return opt

    class SophiaG(sophia_opt.SophiaG):
        """sophia-opt's SophiaG with its batch-size argument fixed (ours: the ``bs`` key)."""

        def step(self, closure=None):
            return super().step(closure, bs=5120)

    rank = dict(rank=128, update_proj_gap=200)
    return {
        # torch's fused kernels (ours runs the same ones by default: llmvalley.optim.fused)
        "sgd": ({"momentum": 0.9},
                plain(lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True))),
        "adagrad": ({}, plain(lambda ps: torch.optim.Adagrad(ps, lr=1e-3, fused=True))),
        "rmsprop": ({}, plain(lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=True))),
        "adamp": ({}, plain(lambda ps: adamp.AdamP(ps, lr=1e-3))),
        "sgdp": ({"momentum": 0.9}, plain(lambda ps: adamp.SGDP(ps, lr=1e-3, momentum=0.9))),
        "schedulefree_adamw": ({}, schedule_free),
        "prodigy": ({}, plain(lambda ps: prodigyopt.Prodigy(ps, lr=1.0))),
        "dadapt_adam": ({}, plain(lambda ps: dadaptation.DAdaptAdam(ps, lr=1.0))),
        "dog": ({}, plain(lambda ps: dog.DoG(ps, lr=1.0))),
        # kron-torch compiles its kernels with torch.compile (the first steps pay for it)
        "psgd_kron": ({}, plain(lambda ps: kron_torch.Kron(ps, lr=1e-3))),
        "sophia": ({}, plain(lambda ps: SophiaG(ps, lr=1e-4))),
        "galore": ({**rank, "scale": 0.25},
                   low_rank(GaLoreAdamW, **rank, scale=0.25, proj_type="std")),
        "fira": ({**rank, "scale": 0.25},
                 low_rank(FiraAdamW, **rank, alpha=0.25, proj_type="std")),
        "apollo": ({**rank, "scale": 1.0},
                   low_rank(APOLLOAdamW, **rank, scale=1.0, proj_type="std", proj="random",
                            scale_type="channel")),
        "apollo_mini": ({}, low_rank(APOLLOAdamW, rank=1, update_proj_gap=200, scale=128.0,
                                     proj_type="std", proj="random", scale_type="tensor")),
    }


def first_step(make: Callable[[], torch.optim.Optimizer]) -> float:
    opt = make()
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, layers=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def model() -> nn.Module:
        return params_with_gradients(args.dim, args.ffn, args.layers, args.vocab)

    table = references()
    names = args.only.split(",") if args.only else list(table)
    rows = []
    for name in names:
        hp, reference = table[name]
        ours_model, ref_model, base_model = model(), model(), model()
        ours = llmvalley.create_optimizer(name, ours_model, nonfinite="ignore", **hp)
        theirs = reference(ref_model)
        fused = torch.optim.AdamW(base_model.parameters(), lr=1e-3, fused=True)
        t_ours, t_ref, t_fused = time_interleaved([ours, theirs, fused], "cpu", 2, args.reps)
        first_ours = first_step(lambda hp=hp, name=name: llmvalley.create_optimizer(
            name, model(), nonfinite="ignore", **hp))
        first_ref = first_step(lambda reference=reference: reference(model()))
        rows.append((name, t_ours, t_ours / t_fused, t_ours / t_ref, first_ours, first_ref))
    n = sum(p.numel() for p in model().parameters())
    print(f"{machine('cpu')}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{n / 1e6:.1f}M LLaMA-shaped parameters (d={args.dim}, ffn={args.ffn}, "
          f"layers={args.layers}, vocab={args.vocab}); steady steps: minimum of {args.reps} "
          "round-robin repetitions")
    if args.markdown:
        print("\n| optimizer | ms/step | vs fused AdamW | vs reference | first step ms "
              "(ours / reference) |")
        print("|---|---:|---:|---:|---:|")
        for name, t, r_fused, r_ref, f_ours, f_ref in rows:
            print(f"| {name} | {t * 1e3:.1f} | {r_fused:.2f}x | {r_ref:.2f}x | "
                  f"{f_ours * 1e3:.0f} / {f_ref * 1e3:.0f} |")
    else:
        for name, t, r_fused, r_ref, f_ours, f_ref in rows:
            print(f"{name:20} {t * 1e3:8.1f} ms {r_fused:6.2f}x fused {r_ref:6.2f}x ref "
                  f"first {f_ours * 1e3:.0f}/{f_ref * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
