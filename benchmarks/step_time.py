"""Time of one optimizer ``step()`` on a LLaMA-shaped parameter set, for every optimizer.

Each time is reported as a ratio to ``torch.optim.AdamW(fused=True)`` and to
``torch.optim.AdamW(foreach=True)`` measured in the same run on the same parameters, with
the optimizer-state bytes per parameter. Matrix-only methods are created through the model
router (hidden matrices to the method, the rest to AdamW), as users would.

    python benchmarks/step_time.py                      # CPU, LLaMA d=512 x 4 layers
    python benchmarks/step_time.py --device cuda --layers 8 --markdown
    python benchmarks/step_time.py --compiled --only adamw,lion   # + implementation="compiled"

With ``--compiled`` each method is also timed with ``implementation="compiled"`` (its
compile time, spent in the warm-up steps, is excluded from the step time and reported apart).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import llmvalley
from llmvalley.optim.compiled import compile_stats


class LlamaShapedParams(nn.Module):
    """The parameters of a LLaMA decoder (no forward): embedding, per-layer attention and
    SwiGLU matrices and RMSNorm weights, final norm and an untied head."""

    def __init__(self, dim: int, ffn: int, layers: int, vocab: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.self_attn = nn.Module()
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(block.self_attn, proj, nn.Linear(dim, dim, bias=False))
            block.mlp = nn.Module()
            block.mlp.gate_proj = nn.Linear(dim, ffn, bias=False)
            block.mlp.up_proj = nn.Linear(dim, ffn, bias=False)
            block.mlp.down_proj = nn.Linear(ffn, dim, bias=False)
            block.input_layernorm = nn.RMSNorm(dim)
            block.post_attention_layernorm = nn.RMSNorm(dim)
            self.layers.append(block)
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)


def add_shape_args(parser: argparse.ArgumentParser, dim: int = 256, ffn: int = 688,
                   layers: int = 2, vocab: int = 4096) -> None:
    """The ``--dim --ffn --layers --vocab`` options of a :class:`LlamaShapedParams` set."""
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--ffn", type=int, default=ffn)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--vocab", type=int, default=vocab)


def add_run_args(parser: argparse.ArgumentParser, layers: int = 2, reps: int = 5) -> None:
    """The options every reference-comparison script takes: the shape of the parameter set
    (:func:`add_shape_args`), ``--threads`` (default 1: steadier), ``--reps``, ``--only``
    (comma-separated names) and ``--markdown``."""
    add_shape_args(parser, layers=layers)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--only", help="comma-separated names (as shown in the table)")
    parser.add_argument("--markdown", action="store_true")


def hidden_and_rest(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The hidden 2-D matrices (what the router gives a matrix method) and the rest."""
    hidden, rest = [], []
    for name, p in model.named_parameters():
        matrix = p.ndim == 2 and "embed" not in name and "lm_head" not in name
        (hidden if matrix else rest).append(p)
    return hidden, rest


def params_with_gradients(dim: int, ffn: int, layers: int, vocab: int,
                          scale: float = 1e-3) -> LlamaShapedParams:
    """A seeded :class:`LlamaShapedParams` whose parameters hold fixed random gradients (the
    reference and peer comparisons time ``step()`` on them)."""
    torch.manual_seed(0)
    m = LlamaShapedParams(dim, ffn, layers, vocab)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * scale
    return m


def timed_step(opt: torch.optim.Optimizer, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_interleaved(opts: list[torch.optim.Optimizer], device: str, warmup: int,
                     reps: int) -> list[float]:
    """Minimum seconds per ``step()`` of each optimizer, measured round-robin so that
    background load hits every optimizer alike (the minimum is the least disturbed run)."""
    for _ in range(warmup):
        for opt in opts:
            opt.step()
    times: list[list[float]] = [[] for _ in opts]
    for _ in range(reps):
        for i, opt in enumerate(opts):
            times[i].append(timed_step(opt, device))
    return [min(t) for t in times]


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PRECISIONS = (None, "bf16", "int8", "int4")
BYTES_METHODS = ("adamw", "lion", "adafactor", "muon", "ademamix")


def precision_table(model: nn.Module, n_params: int, markdown: bool) -> None:
    """State bytes per parameter of a few methods at each ``state_precision`` (declared
    state, counted before the first step: no timing needed)."""
    rows = []
    for name in BYTES_METHODS:
        cells = []
        for precision in PRECISIONS:
            opt = llmvalley.create_optimizer(name, model, state_precision=precision)
            cells.append(llmvalley.state_bytes(opt) / n_params)
        rows.append((name, cells))
    heads = ["default (fp32)" if p is None else p for p in PRECISIONS]
    print("\nstate bytes per parameter by state_precision")
    if markdown:
        print("\n| optimizer | " + " | ".join(heads) + " |")
        print("|---|" + "---:|" * len(heads))
        for name, cells in rows:
            print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    else:
        print(f"{'optimizer':12}" + "".join(f"{h:>16}" for h in heads))
        for name, cells in rows:
            print(f"{name:12}" + "".join(f"{c:16.3f}" for c in cells))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser, dim=512, ffn=1376, layers=4, vocab=32000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", help="comma-separated optimizer names")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--bytes-only", action="store_true",
                        help="print only the state bytes per parameter by precision")
    parser.add_argument("--compiled", action="store_true",
                        help='also time implementation="compiled" (compile time apart)')
    parser.add_argument("--state-dtype", choices=("bfloat16",),
                        help="also time each optimizer with this state_dtype")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = LlamaShapedParams(args.dim, args.ffn, args.layers, args.vocab).to(args.device)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3

    precision_table(model, n_params, args.markdown)
    if args.bytes_only:
        return
    fused_opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    foreach_opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    fused_all, foreach_all = [], []
    names = args.only.split(",") if args.only else [s.name for s in llmvalley.list_optimizers()]
    rows = []
    for name in names:
        variants = [(name, {})]
        if name in ("adam", "adamw"):
            variants.append((f"{name} (fused=False)", {"fused": False}))
        if args.compiled:
            variants.append((f"{name} (compiled)", {"implementation": "compiled"}))
        if args.state_dtype:
            low = {"state_dtype": getattr(torch, args.state_dtype)}
            variants.append((f"{name} ({args.state_dtype} state)", low))
            if args.compiled:
                variants.append((f"{name} ({args.state_dtype} state, compiled)",
                                 {**low, "implementation": "compiled"}))
        for label, kw in variants:
            opt = llmvalley.create_optimizer(name, model, nonfinite="ignore", lr=1e-4, **kw)
            # the compiled tier compiles at its second step: two warm-up steps at least
            warmup = max(args.warmup, 2) if "implementation" in kw else args.warmup
            fused, foreach, t = time_interleaved([fused_opt, foreach_opt, opt], args.device,
                                                 warmup, args.reps)
            fused_all.append(fused)
            foreach_all.append(foreach)
            compile_s = compile_stats(opt).seconds if "implementation" in kw else None
            rows.append((label, t, t / fused, t / foreach, llmvalley.state_bytes(opt) / n_params,
                         compile_s))
            del opt
    fused, foreach = statistics.median(fused_all), statistics.median(foreach_all)

    device = machine(args.device)
    header = (f"{n_params / 1e6:.1f}M parameters (d={args.dim}, ffn={args.ffn}, "
              f"layers={args.layers}, vocab={args.vocab}) on {args.device} ({device}, "
              f"{torch.get_num_threads()} threads), torch {torch.__version__}; "
              f"torch AdamW fused {fused * 1e3:.1f} ms, foreach {foreach * 1e3:.1f} ms "
              "(medians over the paired runs; each ratio is against the peers timed "
              "round-robin with that optimizer, minimum of the repetitions)")
    print(header)
    def compile_cell(c: float | None) -> str:
        return "" if c is None else f"{c:.1f}"

    if args.markdown:
        print("\n| optimizer | ms/step | vs fused AdamW | vs foreach AdamW | state bytes/param "
              "| compile s |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, t, r1, r2, b, c in rows:
            print(f"| {label} | {t * 1e3:.1f} | {r1:.2f}x | {r2:.2f}x | {b:.2f} "
                  f"| {compile_cell(c)} |")
    else:
        print(f"{'optimizer':28} {'ms/step':>9} {'vs fused':>9} {'vs foreach':>10} "
              f"{'B/param':>8} {'compile s':>9}")
        for label, t, r1, r2, b, c in rows:
            print(f"{label:28} {t * 1e3:9.1f} {r1:8.2f}x {r2:9.2f}x {b:8.2f} "
                  f"{compile_cell(c):>9}")


if __name__ == "__main__":
    main()
