"""Effective memory bandwidth of the AdamW step (issue 11's GPU target: >= 80% of peak).

fp32 AdamW reads the parameter, gradient and both moments and writes the parameter and both
moments: 28 bytes per parameter per step. Bandwidth = 28 * parameters / step time; the
fraction is against the device's peak (a table of data-sheet figures by device name, or
``--peak-gbs``). Timed round-robin in one process (minimum of the repetitions): torch's
fused and foreach AdamW, and ours with the default (``auto``: the fused kernel), the foreach
and the compiled tier. It also says whether each compiled/fused step can be captured in a
CUDA graph (issue 11 asks for capturable compiled and fused tiers).

    python benchmarks/bandwidth.py --device cuda --markdown           # 45M LLaMA-shaped
    python benchmarks/bandwidth.py --device cuda --layers 24 --dim 1024 --ffn 2752
    python benchmarks/bandwidth.py                                    # CPU (no peak table)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from step_time import LlamaShapedParams, add_shape_args, machine

import llmvalley

BYTES_PER_PARAM = 28  # fp32 AdamW: read p, g, m, v; write p, m, v
#: data-sheet peak memory bandwidth, GB/s, by a substring of the device name
PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
            "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0,
            "L40S": 864.0, "L4": 300.0, "A10": 600.0, "RTX 4090": 1008.0, "V100": 900.0}


def peak_gbs(device: str, override: float | None) -> float | None:
    if override is not None:
        return override
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBS.items() if k in name), None)


def optimizers(model_fn: Callable[[], LlamaShapedParams]) -> dict[str, torch.optim.Optimizer]:
    """Each contender on its own copy of the parameters (with fixed gradients)."""
    def params() -> list[torch.nn.Parameter]:
        ps = list(model_fn().parameters())
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        return ps

    return {
        "torch AdamW fused": torch.optim.AdamW(params(), lr=1e-3, fused=True),
        "torch AdamW foreach": torch.optim.AdamW(params(), lr=1e-3, foreach=True),
        "adamw default (auto)": llmvalley.create_optimizer("adamw", params(),
                                                           nonfinite="ignore"),
        "adamw foreach": llmvalley.create_optimizer("adamw", params(), nonfinite="ignore",
                                                    implementation="foreach"),
        "adamw compiled": llmvalley.create_optimizer("adamw", params(), nonfinite="ignore",
                                                     implementation="compiled"),
    }


def step_seconds(opts: dict[str, torch.optim.Optimizer], device: str, warmup: int,
                 reps: int) -> dict[str, float]:
    """Minimum seconds per step of each optimizer, round-robin (CUDA events on a GPU)."""
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    best = {k: float("inf") for k in opts}
    for _ in range(reps):
        for k, opt in opts.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                opt.step()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                import time

                t0 = time.perf_counter()
                opt.step()
                seconds = time.perf_counter() - t0
            best[k] = min(best[k], seconds)
    return best


def capturable(opt: torch.optim.Optimizer) -> str:
    """Whether ``opt.step()`` can be captured in a CUDA graph (after its warm-up steps)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
        torch.cuda.current_stream().wait_stream(stream)
        return "yes"
    except Exception as e:  # noqa: BLE001 -- reported, not raised
        return f"no ({type(e).__name__}: {str(e).splitlines()[0][:80]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser, dim=512, ffn=1376, layers=4, vocab=32000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--peak-gbs", type=float, help="the device's peak bandwidth, GB/s")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    def model_fn() -> LlamaShapedParams:
        torch.manual_seed(0)
        return LlamaShapedParams(args.dim, args.ffn, args.layers, args.vocab).to(args.device)

    n = sum(p.numel() for p in model_fn().parameters())
    opts = optimizers(model_fn)
    times = step_seconds(opts, args.device, args.warmup, args.reps)
    peak = peak_gbs(args.device, args.peak_gbs)
    print(f"{machine(args.device)}, torch {torch.__version__}, {n / 1e6:.1f}M fp32 parameters, "
          f"{BYTES_PER_PARAM} bytes each per step; peak "
          f"{'unknown' if peak is None else f'{peak:.0f} GB/s'}; minimum of {args.reps} "
          "round-robin repetitions\n")
    heads = ["optimizer", "ms/step", "GB/s", "of peak", "vs torch fused"]
    if args.device == "cuda":
        heads.append("CUDA-graph capturable")
    if args.markdown:
        print("| " + " | ".join(heads) + " |")
        print("|---|" + "---:|" * (len(heads) - 1))
    fused = times["torch AdamW fused"]
    for name, seconds in times.items():
        gbs = BYTES_PER_PARAM * n / seconds / 1e9
        cells = [name, f"{seconds * 1e3:.3f}", f"{gbs:.0f}",
                 "–" if peak is None else f"{100 * gbs / peak:.0f} %", f"{seconds / fused:.2f}x"]
        if args.device == "cuda":
            cells.append(capturable(opts[name]))
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
