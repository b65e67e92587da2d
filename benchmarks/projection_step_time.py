"""AdamP's step time for each of its projection choices, against torch's fused AdamW.

AdamP projects a matrix's update per row when every row's gradient is nearly orthogonal to the
row's weights, else over the whole tensor when the whole gradient is, else not at all.
`step_time.py`'s random gradients take the third choice on every matrix. Here the gradients are
made to take each choice (orthogonal per row; rows along the weights with alternating signs,
whose whole-tensor cosine cancels; random), and AdamP's default step (its CPU kernel) is timed
round-robin with torch's fused AdamW on the same LLaMA-shaped parameters.

    OMP_NUM_THREADS=1 python benchmarks/projection_step_time.py --markdown
"""

from __future__ import annotations

import argparse

import torch
from step_time import add_shape_args, machine, params_with_gradients, time_interleaved

import llmvalley


def shape_gradients(params: list[torch.nn.Parameter], choice: str) -> None:
    """Make each matrix's gradient take AdamP's projection ``choice``."""
    for p in params:
        if p.dim() < 2 or choice == "none":
            continue
        g, x = p.grad.view(p.shape[0], -1), p.detach().view(p.shape[0], -1)
        if choice == "rows":  # orthogonal to each row of the weights
            g -= x * ((g * x).sum(1, keepdim=True) / (x * x).sum(1, keepdim=True))
        else:  # "whole": each row along its weights, signs alternating so that g.x cancels
            sign = torch.ones(x.shape[0], 1, dtype=torch.float64)
            sign[1::2] = -1.0
            if x.shape[0] % 2:
                sign[-1] = 0.0
            g.copy_(x * (sign / (x.double() * x.double()).sum(1, keepdim=True)).float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser, dim=512, ffn=1376, layers=4, vocab=32000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = []
    for choice in ("none", "rows", "whole"):
        model = params_with_gradients(args.dim, args.ffn, args.layers, args.vocab)
        shape_gradients(list(model.parameters()), choice)
        twin = params_with_gradients(args.dim, args.ffn, args.layers, args.vocab)
        ref = torch.optim.AdamW(twin.parameters(), lr=1e-4, fused=True)
        opt = llmvalley.create_optimizer("adamp", model, nonfinite="ignore", lr=1e-4)
        base, ours = time_interleaved([ref, opt], "cpu", args.warmup, args.reps)
        rows.append((choice, ours * 1e3, ours / base))
    n = sum(p.numel() for p in params_with_gradients(
        args.dim, args.ffn, args.layers, args.vocab).parameters())
    print(f"{n / 1e6:.1f}M parameters on cpu ({machine('cpu')}, {torch.get_num_threads()} "
          f"threads), torch {torch.__version__}")
    sep = "|" if args.markdown else " "
    print(f"{sep} projection {sep} adamp ms/step {sep} vs fused AdamW {sep}")
    if args.markdown:
        print("|---|---:|---:|")
    for choice, ms, ratio in rows:
        print(f"{sep} {choice} {sep} {ms:.1f} {sep} {ratio:.2f}x {sep}")


if __name__ == "__main__":
    main()
