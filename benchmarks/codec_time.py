"""Time of the low-bit state codec: eager vs compiled encode + decode of LLaMA-shaped state.

For each size, the state of every quantized tensor (``numel >= MIN_QUANTIZED_NUMEL``) of a
LLaMA-shaped parameter set is encoded and decoded as one optimizer step does it: both AdamW
moments (signed first, unsigned second), decode then encode, 8-bit and 4-bit. The eager
functions (``quantize_blockwise`` ...) and the compiled ones (``quantize_blockwise_compiled``
...) are timed round-robin with, for reference, ``torch.optim.AdamW(fused=True)`` over the same
parameters, llmvalley's whole ``adamw8bit`` / ``adamw4bit`` step with the eager codec and with
the compiled one (``Codec(compiled=True)``, through the shell's codec factory), and, when
torchao is installed, torchao's ``AdamW8bit`` / ``AdamW4bit`` step (its own
``torch.compile``). Minimum of the repetitions; compile time (first calls) reported apart.
The compiled codes are checked equal to the eager ones before timing.

    OMP_NUM_THREADS=1 python benchmarks/codec_time.py --markdown
    OMP_NUM_THREADS=1 python benchmarks/codec_time.py --sizes 5.3M --no-torchao
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from step_time import LlamaShapedParams, machine

import llmvalley
from llmvalley.optim import quantize as q
from llmvalley.optim import shell
from llmvalley.optim.state import Codec

# name -> (dim, ffn, layers, vocab): the sizes of step_time.py's results
SIZES = {
    "5.3M": (256, 688, 4, 4096),
    "45M": (512, 1376, 4, 32000),
}

# kind -> (map, eager encode, eager decode, compiled encode, compiled decode, block)
KINDS = {
    "int8": (q.dynamic_map, q.quantize_blockwise, q.dequantize_blockwise,
             q.quantize_blockwise_compiled, q.dequantize_blockwise_compiled, q.BLOCK_SIZE_8BIT),
    "int4": (q.map_4bit, q.quantize_4bit, q.dequantize_4bit, q.quantize_4bit_compiled,
             q.dequantize_4bit_compiled, q.BLOCK_SIZE_4BIT),
}


def codec_pass(kind: str, compiled: bool, states: list[tuple[torch.Tensor, bool]],
               stored: list[list]) -> Callable[[], None]:
    """One step's codec work: decode then re-encode every quantized moment."""
    make_map, enc, dec, cenc, cdec, block = KINDS[kind]
    encode, decode = (cenc, cdec) if compiled else (enc, dec)
    maps = {s: make_map(s) for s in (True, False)}

    def run() -> None:
        for (x, signed), slot in zip(states, stored):
            qmap = maps[signed]
            value = decode(slot[0], slot[1], qmap, block, x.shape)
            slot[0], slot[1] = encode(value, qmap, block)
    return run


def compiled_codec_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """``opt.step`` with the shell's codec factory returning ``Codec(..., compiled=True)``."""
    def codec(group):
        return Codec(group.get("state_precision"), group.get("state_dtype"), compiled=True)

    def step() -> None:
        saved, shell._codec = shell._codec, codec
        try:
            opt.step()
        finally:
            shell._codec = saved
    return step


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: 5.3M,45M")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-torchao", action="store_true", help="skip torchao's steps")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()

    print(f"{machine('cpu')}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for size in args.sizes.split(","):
        dim, ffn, layers, vocab = SIZES[size]
        torch.manual_seed(0)
        model = LlamaShapedParams(dim, ffn, layers, vocab)
        params = list(model.parameters())
        n_params = sum(p.numel() for p in params)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        big = [p for p in params if p.numel() >= q.MIN_QUANTIZED_NUMEL]
        n_quantized = sum(p.numel() for p in big)

        # AdamW-like moments: m ~ grad (signed), v ~ grad^2 (unsigned)
        states = [(p.grad.clone(), True) for p in big] + \
                 [(p.grad.square(), False) for p in big]
        fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
        tasks: list[tuple[str, Callable[[], None]]] = [("torch AdamW fused step", fused.step)]
        compile_s = {}
        for kind in KINDS:
            make_map, enc, dec, cenc, cdec, block = KINDS[kind]
            for compiled in (False, True):
                stored = [list(enc(x, make_map(s), block)) for x, s in states]
                if compiled:  # compile (first calls), and check the codes equal eager's
                    t0 = time.perf_counter()
                    for (x, s), slot in zip(states, stored):
                        codes, absmax = cenc(x, make_map(s), block)
                        assert torch.equal(codes, slot[0]) and torch.equal(absmax, slot[1])
                        out = cdec(codes, absmax, make_map(s), block, x.shape)
                        assert torch.equal(out, dec(codes, absmax, make_map(s), block,
                                                    x.shape))
                    compile_s[kind] = time.perf_counter() - t0
                label = f"{kind} {'compiled' if compiled else 'eager'} decode+encode"
                tasks.append((label, codec_pass(kind, compiled, states, stored)))
        # the whole llmvalley step, with the eager codec and with the compiled one (the shell's
        # codec factory patched as the compiled tier will wire it)
        for recipe in ("adamw8bit", "adamw4bit"):
            for compiled in (False, True):
                opt = llmvalley.create_optimizer(recipe, model, lr=1e-4, nonfinite="ignore")
                label = f"llmvalley {recipe} step, {'compiled' if compiled else 'eager'} codec"
                tasks.append((label, compiled_codec_step(opt) if compiled else opt.step))
        if not args.no_torchao:
            try:
                from torchao.optim import AdamW4bit, AdamW8bit
            except ImportError:
                pass
            else:
                for name, cls in (("torchao AdamW8bit step", AdamW8bit),
                                  ("torchao AdamW4bit step", AdamW4bit)):
                    opt = cls(params, lr=1e-4)
                    t0 = time.perf_counter()
                    opt.step()  # creates the state, compiles
                    opt.step()
                    compile_s[name] = time.perf_counter() - t0
                    tasks.append((name, opt.step))

        for _, fn in tasks:  # warm-up
            fn()
        times: list[list[float]] = [[] for _ in tasks]
        for _ in range(args.reps):
            for i, (_, fn) in enumerate(tasks):
                times[i].append(timed(fn))
        best = [min(t) for t in times]
        base = best[0]
        eager = {kind: best[[label for label, _ in tasks].index(f"{kind} eager decode+encode")]
                 for kind in KINDS}

        print(f"\n{size}: {n_params / 1e6:.1f}M parameters (d={dim}, ffn={ffn}, layers={layers}, "
              f"vocab={vocab}), {n_quantized / 1e6:.1f}M in quantized tensors, 2 moments each; "
              f"minimum of {args.reps} round-robin repetitions")
        rows = []
        for (label, _), t in zip(tasks, best):
            kind = label.split()[0]
            vs_eager = f"{eager[kind] / t:.2f}x" if kind in KINDS else ""
            first = compile_s.get(kind) if "compiled" in label else compile_s.get(label)
            rows.append((label, t * 1e3, t / base, vs_eager,
                         "" if first is None else f"{first:.1f}"))
        if args.markdown:
            print("\n| what | ms | vs fused AdamW step | speed-up vs eager codec | first call s |")
            print("|---|---:|---:|---:|---:|")
            for label, ms, r, s, c in rows:
                print(f"| {label} | {ms:.1f} | {r:.2f}x | {s} | {c} |")
        else:
            print(f"{'what':34} {'ms':>9} {'vs fused':>9} {'speed-up':>9} {'first s':>8}")
            for label, ms, r, s, c in rows:
                print(f"{label:34} {ms:9.1f} {r:8.2f}x {s:>9} {c:>8}")


if __name__ == "__main__":
    main()
