"""Step time of each llmvalley method against the same method from pytorch-optimizer and
HeavyBall (issue 11's peer column), on the same LLaMA-shaped parameters, in one process.

The peers are not project dependencies: they live in the benchmark's own virtual
environment, which reuses the installed torch (``--system-site-packages``; ``--no-deps`` so
pip never pulls another torch; their other requirements, numpy and opt-einsum, are already
installed). One-time setup, from the repository root::

    python -m venv --system-site-packages benchmarks/.peers-venv && \
        benchmarks/.peers-venv/bin/pip install --no-deps pytorch-optimizer==4.1.0 heavyball==3.2.1

Run (``python benchmarks/peer_step_time.py --setup`` prints the setup line)::

    benchmarks/.peers-venv/bin/python benchmarks/peer_step_time.py --markdown
    benchmarks/.peers-venv/bin/python benchmarks/peer_step_time.py --only soap,muon --layers 4

The default (3.7M parameters, 1 thread) takes about 15 minutes on a 2-core machine, most of
it in soap, psgd_kron and splus (eigendecompositions and triangular preconditioners of the
4096-row embedding and head, plus HeavyBall's max-autotune compiles); the element-wise
methods alone (``--only`` without those three) take about 4 minutes.

Each row times, round-robin in one process (minimum of the repetitions), our default
(``create_optimizer(name, model)`` with the library defaults, non-finite check included), the
peer, ``torch.optim.AdamW(fused=True)`` and, where the peer is HeavyBall, our
``implementation="compiled"``. Every optimizer gets its own copy of the parameters and the same
fixed gradients. HeavyBall runs as its users run it: its default ``torch.compile`` of every
update function, compiled during the warm-up steps; the warm-up wall time beyond the steady
step time is reported as its compile time (ours from ``compile_stats``). Hyperparameters are
ours on both sides (ours are the paper's / official code's), so the same work is timed;
matrix methods route embedding, head and norms to AdamW on both sides.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from importlib.util import find_spec

import torch
from step_time import add_shape_args, hidden_and_rest, machine, params_with_gradients
from torch import nn

import llmvalley
from llmvalley.optim.compiled import compile_stats

SETUP = ("python -m venv --system-site-packages benchmarks/.peers-venv && "
         "benchmarks/.peers-venv/bin/pip install --no-deps pytorch-optimizer==4.1.0 "
         "heavyball==3.2.1")
PO, HB = "pytorch-optimizer", "heavyball"
Factory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class Match:
    """One peer implementation of one of our methods: our name, our hyperparameters (beyond
    the defaults) and the peer's constructor set to the same method and settings."""

    ours: str
    library: str
    peer: str
    make: Factory
    hparams: dict = field(default_factory=dict)


class Pair(torch.optim.Optimizer):
    """Two optimizers stepped as one (a matrix method on the hidden matrices and AdamW on the
    rest, as our router does), for a peer that has no routing of its own."""

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer) -> None:
        self.first, self.second = first, second
        self.param_groups = first.param_groups + second.param_groups
        self.state = {}
        self.defaults = {}

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim signature
        self.first.step()
        self.second.step()


# NOTE (pytorch-optimizer 4.1.0): its adam, adamw, nadam, sgd and rmsprop are torch.optim's
# classes re-exported, so they are not separate peers (torch is the ratio column already).
# Skipped because the method or its state differs (see the results file):
#   shampoo (theirs: original Shampoo; ours: distributed-Shampoo eigendecomposition with
#   Adam grafting), sophia / sophia_h / adahessian (need Hessian-vector products from a
#   backward graph, not a step() on fixed gradients), spam (theirs is the sparse-mask variant
#   with different resets), adamuon, conda, galore, fira, apollo
#   (not matched in the time of issue 11's first pass), HeavyBall's RMSprop (bias-corrected
#   EMA, not torch's RMSprop), HeavyBall's ADOPT (no llmvalley adopt).
# stable_spam and adagc are the same methods with small differences of convention (their
# StableSPAM restarts its Adam count at 1 after a reset and rescales .grad in place; their
# AdaGC clamps the norms at eps and switches phase at step == warmup_steps): the times
# compare, the bits do not.
def matches(total_steps: int) -> list[Match]:
    import heavyball as hb
    import pytorch_optimizer as po

    def plain(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Factory:
        return lambda model: make(list(model.parameters()))

    def train_mode(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        opt.train()
        return opt

    def po_muon(model: nn.Module) -> torch.optim.Optimizer:
        hidden, rest = hidden_and_rest(model)
        return po.Muon([dict(params=hidden, use_muon=True, lr=0.02, momentum=0.95,
                             nesterov=True, weight_decay=0.0),
                        dict(params=rest, use_muon=False)],
                       adamw_lr=1e-3, adamw_betas=(0.9, 0.999), adamw_wd=0.01, adamw_eps=1e-8)

    def hb_muon(model: nn.Module) -> torch.optim.Optimizer:
        hidden, rest = hidden_and_rest(model)
        return Pair(hb.Muon(hidden, lr=0.02, betas=(0.95, 0.99), nesterov=True),
                    hb.AdamW(rest, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01))

    soap = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01,
                precondition_frequency=10, precondition_1d=False, merge_dims=False)
    return [
        # element-wise Adam family
        Match("adamw", HB, "AdamW", plain(lambda ps: hb.AdamW(
            ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01))),
        Match("nadam", HB, "NAdam", plain(lambda ps: hb.NAdam(
            ps, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, momentum_decay=0.004))),
        Match("adabelief", PO, "AdaBelief", plain(lambda ps: po.AdaBelief(
            ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decouple=True, rectify=True,
            degenerated_to_sgd=True))),
        Match("adan", PO, "Adan", plain(lambda ps: po.Adan(
            ps, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8))),
        Match("ademamix", PO, "AdEMAMix", plain(lambda ps: po.AdEMAMix(
            ps, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=8.0, eps=1e-8))),
        Match("ademamix", HB, "AdEMAMix", plain(lambda ps: hb.AdEMAMix(
            ps, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=8.0, eps=1e-8))),
        Match("laprop", PO, "LaProp", plain(lambda ps: po.LaProp(
            ps, lr=4e-4, betas=(0.9, 0.999), eps=1e-15))),
        Match("laprop", HB, "LaProp", plain(lambda ps: hb.LaProp(
            ps, lr=4e-4, betas=(0.9, 0.999), eps=1e-15))),
        Match("grams", PO, "Grams", plain(lambda ps: po.Grams(
            ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-6))),
        Match("mars", PO, "MARS", plain(lambda ps: po.MARS(
            ps, lr=3e-3, betas=(0.95, 0.99), gamma=0.025, mars_type="adamw"))),
        Match("diffgrad", PO, "DiffGrad", plain(lambda ps: po.DiffGrad(ps, lr=1e-3))),
        Match("adamp", PO, "AdamP", plain(lambda ps: po.AdamP(ps, lr=1e-3))),
        Match("sgdp", PO, "SGDP", plain(lambda ps: po.SGDP(ps, lr=1e-3, momentum=0.9)),
              {"momentum": 0.9}),
        Match("tam", PO, "TAM", plain(lambda ps: po.TAM(ps, lr=1e-3))),
        Match("exadam", PO, "EXAdam", plain(lambda ps: po.EXAdam(ps, lr=1e-3))),
        Match("fadam", PO, "FAdam", plain(lambda ps: po.FAdam(ps, lr=1e-3))),
        Match("ano", PO, "Ano", plain(lambda ps: po.Ano(ps, lr=1e-4))),
        Match("stable_spam", PO, "StableSPAM", plain(lambda ps: po.StableSPAM(
            ps, lr=1e-3, betas=(0.9, 0.999), gamma1=0.7, gamma2=0.9, theta=0.999,
            update_proj_gap=1000, eps=1e-8))),
        Match("adagc", PO, "AdaGC", plain(lambda ps: po.AdaGC(
            ps, lr=1e-3, betas=(0.9, 0.999), beta=0.99, lambda_abs=1.0, lambda_rel=1.04,
            warmup_steps=100, weight_decay=1e-2, eps=1e-8))),
        Match("ranger21", PO, "Ranger21", plain(lambda ps: po.Ranger21(
            ps, num_iterations=total_steps, lr=1e-3)), {"total_steps": total_steps}),
        # sign and momentum
        Match("lion", PO, "Lion", plain(lambda ps: po.Lion(ps, lr=1e-4, betas=(0.9, 0.99)))),
        Match("sgd", HB, "SGD", plain(lambda ps: hb.SGD(ps, lr=1e-3, beta=0.9)),
              {"momentum": 0.9}),
        Match("sgd_sai", PO, "SGDSaI", plain(lambda ps: po.SGDSaI(ps, lr=1e-2))),
        # factored
        Match("adafactor", PO, "AdaFactor", plain(lambda ps: po.AdaFactor(
            ps, lr=1e-2, betas=(None, 0.999), decay_rate=-0.8, clip_threshold=1.0))),
        Match("came", PO, "CAME", plain(lambda ps: po.CAME(ps, lr=2e-4))),
        # parameter-free and schedule-free
        Match("prodigy", PO, "Prodigy", plain(lambda ps: po.Prodigy(ps, lr=1.0))),
        Match("dadapt_adam", PO, "DAdaptAdam", plain(lambda ps: po.DAdaptAdam(ps, lr=1.0))),
        Match("schedulefree_adamw", PO, "ScheduleFreeAdamW", plain(lambda ps: train_mode(
            po.ScheduleFreeAdamW(ps, lr=2.5e-3, betas=(0.9, 0.999))))),
        Match("schedulefree_adamw", HB, "SFAdamW", plain(lambda ps: train_mode(hb.SFAdamW(
            ps, lr=2.5e-3, betas=(0.9, 0.999), eps=1e-8)))),
        Match("schedulefree_sgd", PO, "ScheduleFreeSGD", plain(lambda ps: train_mode(
            po.ScheduleFreeSGD(ps, lr=1.0, momentum=0.9)))),
        # matrix and preconditioned
        Match("muon", PO, "Muon (+ its AdamW groups)", po_muon),
        Match("muon", HB, "Muon + AdamW", hb_muon),
        Match("soap", PO, "SOAP", plain(lambda ps: po.SOAP(
            ps, max_precondition_dim=10000, **soap))),
        Match("soap", HB, "SOAP", plain(lambda ps: hb.SOAP(
            ps, shampoo_beta=0.95, max_precond_dim=10000, use_precond_schedule=False, **soap))),
        Match("psgd_kron", PO, "Kron", plain(lambda ps: po.Kron(
            ps, lr=3e-4, momentum=0.9, max_size_triangular=8192, min_ndim_triangular=2,
            momentum_into_precondition_update=True))),
        Match("psgd_kron", HB, "PSGDKron", plain(lambda ps: hb.PSGDKron(
            ps, lr=3e-4, beta=0.9, max_size_triangular=8192, min_ndim_triangular=2,
            merge_dims=True, momentum_into_precond_update=True))),
        Match("splus", PO, "SPlus", plain(lambda ps: po.SPlus(ps, lr=0.1))),
    ]


class Timed:
    """An optimizer with its parameters' fixed gradients. HeavyBall consumes ``p.grad`` (sets
    it to None) in ``step()``, so a consumed gradient is put back, outside the timed region,
    before every step (for every optimizer alike; ours and pytorch-optimizer keep theirs)."""

    def __init__(self, opt: torch.optim.Optimizer, model: nn.Module) -> None:
        self.opt = opt
        self.grads = [(p, p.grad.clone()) for p in model.parameters()]

    def step(self) -> float:
        for p, g in self.grads:
            if p.grad is None:
                p.grad = g.clone()
        t0 = time.perf_counter()
        self.opt.step()
        return time.perf_counter() - t0


def build(make: Callable[[nn.Module], torch.optim.Optimizer], model: nn.Module) -> Timed:
    return Timed(make(model), model)


def measure(opts: list[Timed], warmup: int, reps: int) -> tuple[list[float], list[float]]:
    """(warm-up wall seconds, minimum steady seconds per step) of each optimizer: warm-ups
    one optimizer after another, then the timed steps round-robin so that background load
    hits every optimizer alike."""
    warm = [sum(opt.step() for _ in range(warmup)) for opt in opts]
    times: list[list[float]] = [[] for _ in opts]
    for _ in range(reps):
        for i, opt in enumerate(opts):
            times[i].append(opt.step())
    return warm, [min(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier "
                        "when other jobs share the machine; 0: torch's default)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="warm-up steps (HeavyBall and our compiled tier compile in them)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", help="comma-separated llmvalley names")
    parser.add_argument("--library", choices=(PO, HB), help="one peer library only")
    parser.add_argument("--nonfinite", choices=("raise", "ignore"), default="raise",
                        help="our non-finite gradient policy (default: the library's; "
                        "'ignore' times our step without the check, which no peer makes)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--setup", action="store_true", help="print the venv setup line")
    args = parser.parse_args()
    if args.setup:
        print(SETUP)
        return
    if find_spec("heavyball") is None or find_spec("pytorch_optimizer") is None:
        raise SystemExit("the peers are not installed in this interpreter; set up the "
                         f"benchmark's venv and run it with its python:\n  {SETUP}")
    if args.threads:
        torch.set_num_threads(args.threads)

    def model() -> nn.Module:
        return params_with_gradients(args.dim, args.ffn, args.layers, args.vocab)

    total_steps = 10_000
    rows = []
    only = set(args.only.split(",")) if args.only else None
    for match in matches(total_steps):
        if (only and match.ours not in only) or (args.library and match.library != args.library):
            continue
        opts = [build(lambda m, x=match: llmvalley.create_optimizer(
                    x.ours, m, **x.hparams, nonfinite=args.nonfinite), model()),
                build(match.make, model()),
                build(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True), model())]
        compiled = match.library == HB
        if compiled:
            opts.append(build(lambda m, x=match: llmvalley.create_optimizer(
                x.ours, m, implementation="compiled", **x.hparams), model()))
        warm, t = measure(opts, args.warmup, args.reps)
        peer_compile = warm[1] - args.warmup * t[1] if compiled else None
        ours_compiled = (t[3], compile_stats(opts[3].opt).seconds) if compiled else None
        rows.append((match, t[0], t[1], t[2], peer_compile, ours_compiled))
        print(f"  {match.ours:20} {match.library:18} ours {t[0] * 1e3:8.1f} ms  peer "
              f"{t[1] * 1e3:8.1f} ms  ours/peer {t[0] / t[1]:5.2f}x", flush=True)
        del opts

    n = sum(p.numel() for p in model().parameters())
    print(f"\n{machine('cpu')}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"pytorch-optimizer {version('pytorch-optimizer')}, heavyball {version('heavyball')}, "
          f"llmvalley {llmvalley.__version__}; "
          f"{n / 1e6:.1f}M LLaMA-shaped parameters (d={args.dim}, ffn={args.ffn}, "
          f"layers={args.layers}, vocab={args.vocab}); ours with nonfinite={args.nonfinite!r}; "
          f"{args.warmup} warm-up steps, then the "
          f"minimum of {args.reps} round-robin repetitions; 1-minute load average at the "
          f"end {os.getloadavg()[0]:.2f}")

    def cells(row: tuple) -> list[str]:
        match, ours, peer, fused, peer_c, comp = row
        out = [match.ours, match.library, match.peer, f"{ours * 1e3:.1f}", f"{peer * 1e3:.1f}",
               f"{ours / peer:.2f}x", f"{ours / fused:.2f}x"]
        if comp is None:
            out += ["", "", ""]
        else:
            out += [f"{comp[0] * 1e3:.1f} ({comp[0] / peer:.2f}x)", f"{comp[1]:.1f}",
                    f"{peer_c:.1f}"]
        return out

    heads = ["ours", "library", "peer", "ours ms", "peer ms", "ours / peer",
             "ours / fused AdamW", "ours compiled ms (/ peer)", "our compile s",
             "peer compile s"]
    if args.markdown:
        print("\n| " + " | ".join(heads) + " |")
        print("|---|---|---|" + "---:|" * (len(heads) - 3))
        for row in rows:
            print("| " + " | ".join(cells(row)) + " |")
    else:
        for row in rows:
            print("  ".join(f"{c:>12}" for c in cells(row)))


if __name__ == "__main__":
    main()
