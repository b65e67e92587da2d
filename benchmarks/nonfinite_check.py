"""Cost of the default non-finite gradient check (``nonfinite="raise"``), as a ratio.

Times ``adamw`` with the default check, ``adamw`` with ``nonfinite="ignore"`` and
``torch.optim.AdamW(fused=True)`` on the same LLaMA-shaped parameters, interleaved in one
process (minimum of the repetitions), and prints each as a ratio to fused AdamW; the check's
cost is the difference of the first two, as a share of the fused step. A fourth row hands
the step the global gradient norm a training loop already has from ``clip_grad_norm_``
(``step(grad_norm=...)``, as ``valley train`` does), which replaces the screening pass.

    python benchmarks/nonfinite_check.py                   # ~6M parameters, 1 thread
    python benchmarks/nonfinite_check.py --dim 512 --layers 4 --threads 2
    python benchmarks/nonfinite_check.py --dtype bfloat16   # bf16 parameters and gradients
"""

from __future__ import annotations

import argparse

import torch
from step_time import add_shape_args, machine, params_with_gradients, time_interleaved

import llmvalley


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameters and gradients (bfloat16: fused AdamW keeps bf16 "
                             "moments, adamw float32 ones and a float32 working copy)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def params() -> list[torch.nn.Parameter]:
        model = params_with_gradients(args.dim, args.ffn, args.layers, args.vocab)
        return list(model.to(device=args.device, dtype=dtype).parameters())  # grads too

    class WithNorm:
        """``step(grad_norm=...)`` with the norm the loop's clipping computed (not timed)."""

        def __init__(self, opt: torch.optim.Optimizer) -> None:
            self.opt = opt
            self.norm = torch.nn.utils.get_total_norm(
                [p.grad for g in opt.param_groups for p in g["params"]])

        def step(self) -> None:
            self.opt.step(grad_norm=self.norm)

    opts = {
        "torch AdamW(fused=True)": torch.optim.AdamW(params(), lr=1e-5, fused=True),
        "adamw (default check)": llmvalley.create_optimizer("adamw", params(), lr=1e-5),
        "adamw nonfinite='ignore'": llmvalley.create_optimizer("adamw", params(), lr=1e-5,
                                                               nonfinite="ignore"),
        "adamw step(grad_norm=...)": WithNorm(llmvalley.create_optimizer("adamw", params(),
                                                                         lr=1e-5)),
    }
    times = time_interleaved(list(opts.values()), args.device, warmup=3, reps=args.reps)
    n = sum(p.numel() for p in params())
    print(f"{machine(args.device)}, {args.threads} thread(s), {n / 1e6:.1f}M {args.dtype} "
          "parameters")
    for name, t in zip(opts, times):
        print(f"{name:26s} {t * 1e3:8.2f} ms  {t / times[0]:.2f}x fused")
    print(f"check cost: {(times[1] - times[2]) / times[0]:.1%} of a fused AdamW step; "
          f"with the clipping norm: {(times[3] - times[2]) / times[0]:.1%}")


if __name__ == "__main__":
    main()
