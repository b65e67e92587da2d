"""Bytes each rank sends per optimizer step under FSDP2, measured and extrapolated.

Measured: 2 gloo processes train a LLaMA preset (default ``nano``) under ``fully_shard`` and
count the bytes each rank puts on the wire in the collectives that ``optimizer.step()`` calls
(the owner plan's two all-to-alls, the non-finite flag, shared statistics): a wrapped
``torch.distributed`` records every send to another rank. FSDP2's own traffic (parameter
all-gathers in forward and backward, gradient reduce-scatter) is the same for every optimizer
and is given from its formula beside it.

Extrapolated on paper, for the ``llama-1b`` preset at 8, 64 and 512 ranks, from the formulas
the measurement checks at 2 ranks (``P`` parameters, ``M`` of them in matrices that a method
steps whole, ``b`` bytes per element, ``W`` ranks, owners balanced):

- FSDP2 (every method): two all-gathers and one reduce-scatter, ``3 (W - 1) / W * P * b``;
- element-wise methods (adamw): one 8-byte all-reduce (the non-finite flag);
- owner plan (muon, adafactor, soap, ...): gradients and parameters to the owners and new
  parameters back, ``3 (W - 1) / W * M / W * b``: a 1/W share of FSDP2's own traffic.

- Dion on row shards: ``P`` (``m x r``) all-gathered and ``R`` (``n x r``) all-reduced per
  matrix, ``(W - 1) / W * (m r + 2 n r) * b``: low-rank, and independent of ``W`` for large
  ``W`` (at the default ``rank_fraction=1`` that is more than the owner plan's share).

Usage::

    python benchmarks/comm_volume.py [--model nano] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ["adamw", "lion", "muon", "adamuon", "adafactor", "soap", "shampoo", "dion",
           "prodigy"]
RANKS = (8, 64, 512)
STEPS = 2


def _count_sends() -> dict[str, int]:
    """Wrap the torch.distributed collectives the optimizer uses; returns the byte counter."""
    import torch.distributed as dist

    counter = {"bytes": 0}
    world, me = dist.get_world_size(), dist.get_rank()
    a2a, reduce, gather_obj = dist.all_to_all_single, dist.all_reduce, dist.all_gather_object

    def all_to_all_single(out, inp, out_splits=None, in_splits=None, group=None, **kw):
        splits = in_splits or [inp.numel() // world] * world
        counter["bytes"] += sum(n for r, n in enumerate(splits) if r != me) * inp.element_size()
        return a2a(out, inp, out_splits, in_splits, group=group, **kw)

    def all_reduce(t, *args, **kw):  # ring all-reduce: each rank sends 2 (W - 1) / W of it
        counter["bytes"] += 2 * (world - 1) * t.numel() * t.element_size() // world
        return reduce(t, *args, **kw)

    def all_gather_object(out, obj, group=None):
        import pickle

        counter["bytes"] += (world - 1) * len(pickle.dumps(obj))
        return gather_obj(out, obj, group=group)

    gather = dist.all_gather_into_tensor

    def all_gather_into_tensor(out, inp, group=None, **kw):  # its piece to every other rank
        counter["bytes"] += (world - 1) * inp.numel() * inp.element_size()
        return gather(out, inp, group=group, **kw)

    dist.all_to_all_single, dist.all_reduce = all_to_all_single, all_reduce
    dist.all_gather_into_tensor = all_gather_into_tensor
    dist.all_gather_object = all_gather_object
    return counter


def measure_rank(model_name: str, methods: list[str]) -> dict[str, float]:
    """One rank's measured optimizer bytes per step, per method."""
    from torch.distributed.fsdp import fully_shard

    import llmvalley
    from llmvalley.models import build_model, model_config

    counter = _count_sends()
    out = {}
    for name in methods:
        torch.manual_seed(0)
        model = build_model(model_config(model_name))
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        opt = llmvalley.create_optimizer(name, model)
        x = torch.randint(0, model.config.vocab_size, (2, 32))
        sent = []
        for _ in range(STEPS):
            opt.zero_grad()
            model(x, x).backward()
            before = counter["bytes"]
            opt.step()
            sent.append(counter["bytes"] - before)
        out[name] = sum(sent[1:]) / max(1, len(sent) - 1)  # after the first step
    return out


def optimizer_bytes(model_name: str, method: str, world: int, elem: int = 4,
                    **hparams: float) -> float:
    """Bytes one rank sends per step for ``method``'s own collectives at ``world`` ranks, from
    the formulas in the module docstring (owners balanced)."""
    import llmvalley
    from llmvalley.models import build_model, model_config
    from llmvalley.optim.sharded import chain_is_elementwise, chain_runs_on_rows
    from llmvalley.optim.transforms.orthogonalize import dion_rank, matrix_dims

    model = build_model(model_config(model_name), device="meta")
    opt = llmvalley.create_optimizer(method, model, **hparams)
    share = (world - 1) / world
    total = 0.0
    for g in opt.param_groups:
        chain = opt._chain(g)
        for p in g["params"]:
            if chain_is_elementwise(chain):
                continue
            if chain_runs_on_rows(chain):
                m, n = matrix_dims(tuple(p.shape))
                r = dion_rank(tuple(p.shape), float(g["rank_fraction"]))
                total += share * (m * r + 2 * n * r) * elem
            else:
                total += 3 * share * p.numel() / world * elem
    return total


def fsdp_bytes(model_name: str, world: int, elem: int = 4) -> float:
    """FSDP2's own traffic per rank per step (two all-gathers, one reduce-scatter)."""
    from llmvalley.models import build_model, model_config

    p = sum(t.numel() for t in build_model(model_config(model_name), device="meta").parameters())
    return 3 * (world - 1) / world * p * elem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    methods = args.methods.split(",")
    os.environ.setdefault("LLMVALLEY_CPU_BF16", "0")
    from tests.dist_helpers import run_ranks

    measured = run_ranks(measure_rank, 2, args.model, methods, init_group=True, timeout=1200)
    lines = [f"# Optimizer communication per step under FSDP2 ({datetime.date.today()}, "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__})", "",
             f"Measured: 2 gloo ranks, `{args.model}`, fp32, after the first step. "
             "Formula: see `benchmarks/comm_volume.py`; FSDP2's own traffic "
             "(`3 (W-1)/W * P * 4`) is the same for every method.", "",
             "| method | rank 0 sent (B) | rank 1 sent (B) | formula, W=2 (B) "
             "| FSDP2 own, W=2 (B) |",
             "|---|---:|---:|---:|---:|"]
    for name in methods:
        lines.append(f"| {name} | {measured[0][name]:,.0f} | {measured[1][name]:,.0f} | "
                     f"{optimizer_bytes(args.model, name, 2):,.0f} | "
                     f"{fsdp_bytes(args.model, 2):,.0f} |")
    lines += ["", "Extrapolated to `llama-1b` (MB per rank per step, fp32; optimizer / FSDP2's "
              "own):", "", "| method | " + " | ".join(f"W={w}" for w in RANKS) + " |",
              "|---|" + "---:|" * len(RANKS)]
    rows = [(name, name, {}) for name in methods]
    if "dion" in methods:
        rows.append(("dion (rank_fraction=0.25)", "dion", {"rank_fraction": 0.25}))
    for label, name, hp in rows:
        cells = [f"{optimizer_bytes('llama-1b', name, w, **hp) / 1e6:,.1f} / "
                 f"{fsdp_bytes('llama-1b', w) / 1e6:,.0f}" for w in RANKS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Element-wise methods (adamw, lion) add one 8-byte all-reduce per step (the "
              "non-finite flag, one index for all groups); Prodigy adds its shared sums "
              "(an object all-gather)."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
