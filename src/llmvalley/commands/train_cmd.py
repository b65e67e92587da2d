"""``valley train``: train a language model with any registered optimizer and record the run.

Options override a ``--config`` file (YAML, TOML or JSON), which overrides the defaults of
:class:`llmvalley.bench.TrainConfig`. Numbers are parsed here rather than by argparse so a bad
value is reported as one line (exit status 2) like every other user error. torch is imported
only once the options and the output folder are known to be good.

``--parallel ddp|fsdp`` and ``--dist-timeout`` say how the run is executed (under ``torchrun``,
see ``docs/distributed.md``), not what it is: they stay out of the saved config and may be
given with ``--resume``. Under torchrun only rank 0 prints; a user error is printed once (by
rank 0) and every rank exits with status 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from llmvalley.cli import UsageError

# (flags, config key, metavar, help); every option defaults to "not given" (argparse.SUPPRESS).
VALUE_OPTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("--data", "data", "SOURCE",
     "stdlib (default), a .txt file or folder of .txt files, .jsonl, .parquet, hf:NAME[:CONFIG]"),
    ("--text-field", "text_field", "NAME", "text field of .jsonl/.parquet/hf records (text)"),
    ("--val-fraction", "val_fraction", "F", "share of files/records held out (0.02)"),
    ("--tokenizer", "tokenizer", "KIND",
     "auto (default: byte for byte presets, else BPE), byte, bpe, bpe:N, or a tokenizer.json"),
    ("--vocab-size", "vocab_size", "N", "BPE vocabulary size (default: the preset's)"),
    ("--model", "model", "PRESET",
     "nano (default), micro, tiny, llama-60m/130m/350m/1b, gpt2-124m"),
    ("--d-model", "d_model", "N", "override the model width"),
    ("--n-layers", "n_layers", "N", "override the number of layers"),
    ("--n-heads", "n_heads", "N", "override the number of attention heads"),
    ("--ffn-hidden", "ffn_hidden", "N", "override the SwiGLU hidden size"),
    ("--seq-len", "seq_len", "N", "sequence length (default: the preset's)"),
    ("--optimizer", "optimizer", "NAME", "a registry name (default adamw) or torch-adamw"),
    ("--lr", "lr", "LR", "peak learning rate (3e-3)"),
    ("--weight-decay", "weight_decay", "WD", "weight decay (default: the optimizer's own)"),
    ("--schedule", "schedule", "KIND", "cosine (default), wsd, linear, constant"),
    ("--warmup-steps", "warmup_steps", "N", "linear warmup steps (default: 10%% of steps)"),
    ("--min-lr-ratio", "min_lr_ratio", "F", "final learning rate / peak (0.1)"),
    ("--decay-fraction", "decay_fraction", "F", "WSD: share of steps spent decaying (0.2)"),
    ("--grad-clip", "grad_clip", "NORM", "clip the gradient norm (1.0; 0 disables)"),
    ("--batch-size", "batch_size", "N", "sequences per micro-batch (32)"),
    ("--grad-accum", "grad_accum", "N", "micro-batches per optimizer step (1)"),
    ("--steps", "steps", "N", "optimizer steps (default 400)"),
    ("--tokens", "tokens", "N", "token budget instead of --steps (e.g. 2e6)"),
    ("--eval-every", "eval_every", "N", "evaluate every N steps and at the end (100)"),
    ("--eval-batches", "eval_batches", "N", "batches in the fixed held-out set (16)"),
    ("--shifted-data", "shifted_data", "SOURCE",
     "second held-out corpus of another kind of text (auto, none, or any --data source)"),
    ("--shifted-eval-batches", "shifted_eval_batches", "N",
     "batches of the shifted corpus (default: a quarter of --eval-batches)"),
    ("--log-every", "log_every", "N", "log every N steps (10)"),
    ("--checkpoint-every", "checkpoint_every", "N",
     "save a checkpoint every N steps, at the end and on Ctrl-C (100; 0: never)"),
    ("--seed", "seed", "N", "seed of the initialisation and the data order (0)"),
    ("--device", "device", "DEV", "auto (default), cpu, cuda"),
    ("--precision", "precision", "P", "auto (default: bf16 autocast on CUDA, else fp32), fp32, "
     "bf16"),
    ("--threads", "threads", "N", "torch CPU threads (default: torch's)"),
    ("--out", "out", "DIR", "parent folder of run folders (runs)"),
    ("--name", "name", "NAME", "run folder name (default: model-optimizer-lr-seed-time)"),
)
FLAG_OPTIONS: tuple[tuple[str, str, bool, str], ...] = (
    ("--compile", "compile", True, "torch.compile the model"),
    ("--quiet", "quiet", True, "no progress bar or report; print only the run folder"),
    ("--no-progress", "progress", False, "no progress bar"),
)
LIST_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--opt-arg", "opt_args", "optimizer hyperparameter, e.g. betas=0.9,0.95 (repeatable)"),
    ("--fallback-arg", "fallback_args",
     "hyperparameter of the AdamW fallback of matrix-only methods (repeatable); replaces "
     "that key of the method's documented fallback settings"),
)
RESUME_COMPATIBLE = {"quiet", "progress", "threads"}
#: how the run is executed, not part of its config: (flag, key, metavar, help)
LAUNCH_OPTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("--parallel", "parallel", "MODE",
     "none (default: one process), ddp or fsdp (FSDP2); ddp and fsdp run under torchrun: "
     "torchrun --nproc_per_node=N -m llmvalley train ... --parallel ddp"),
    ("--dist-timeout", "dist_timeout", "SECONDS",
     "under --parallel: how long a collective waits for the other ranks before the run stops "
     "with an error (600)"),
)
LAUNCH_KEYS = {key for _, key, *_ in LAUNCH_OPTIONS}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train", help="train a language model with any optimizer and record the run",
        description="Train a LLaMA-style model with any registered optimizer and write a run "
                    "folder (config.json, log.jsonl, summary.json). With no options: the nano "
                    "preset, AdamW, on the Python standard library's sources.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file of options")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run from its latest checkpoint (or from a "
                             "checkpoint file given instead of the folder)")
    for flag, key, metavar, text in (*VALUE_OPTIONS, *LAUNCH_OPTIONS):
        parser.add_argument(flag, dest=key, metavar=metavar, help=text)
    for flag, key, value, text in FLAG_OPTIONS:
        parser.add_argument(flag, dest=key, action="store_const", const=value, help=text)
    for flag, key, text in LIST_OPTIONS:
        parser.add_argument(flag, dest=key, metavar="KEY=VALUE", action="append", help=text)
    parser.set_defaults(func=run)


def raw_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (config keys to raw values)."""
    return {k: v for k, v in vars(args).items()
            if k not in ("func", "command", "config", "resume", *LAUNCH_KEYS)}


def launch_options(args: argparse.Namespace, from_file: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """``parallel`` and ``dist_timeout`` from the command line (or else the config file)."""
    from llmvalley.bench.distributed import DEFAULT_DIST_TIMEOUT_S

    given = {**(from_file or {}), **{k: v for k, v in vars(args).items() if k in LAUNCH_KEYS}}
    timeout = given.get("dist_timeout", DEFAULT_DIST_TIMEOUT_S)
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        raise UsageError(f"--dist-timeout: expected a number of seconds, got {timeout!r}") \
            from None
    return {"parallel": str(given.get("parallel", "none")), "dist_timeout": timeout}


def command_line(args: argparse.Namespace) -> str:
    """The command, re-spelled from the parsed options (recorded in the run folder)."""
    words = ["valley", "train"]
    for key in ("config", "resume"):
        if key in vars(args):
            words += [f"--{key}", getattr(args, key)]
    flags = {key: flag for flag, key, *_ in (*VALUE_OPTIONS, *FLAG_OPTIONS, *LIST_OPTIONS,
                                             *LAUNCH_OPTIONS)}
    launch = {k: v for k, v in vars(args).items() if k in LAUNCH_KEYS}
    for key, value in {**raw_options(args), **launch}.items():
        if isinstance(value, list):
            for item in value:
                words += [flags[key], item]
        elif isinstance(value, bool):
            words.append(flags[key])
        else:
            words += [flags[key], value]
    return shlex.join(words)


def merged_config(args: argparse.Namespace) -> dict[str, Any]:
    """Config-file values overridden by command-line values (key=value lists are merged)."""
    from llmvalley.bench.config import load_config_file, parse_key_values

    merged = load_config_file(args.config) if "config" in vars(args) else {}
    for key in LAUNCH_KEYS:  # read by launch_options
        merged.pop(key, None)
    for key, value in raw_options(args).items():
        if key in ("opt_args", "fallback_args"):
            merged[key] = {**parse_key_values(key, merged.get(key)),
                           **parse_key_values(key, value)}
        else:
            merged[key] = value
    return merged


def _size(n: float, unit: str = "B") -> str:
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g} {prefix}{unit}"
        n /= 1000
    return f"{n:.3g} P{unit}"


def report(summary: dict[str, Any]) -> str:
    """A short human-readable account of a finished run."""
    lines = [f"run folder: {summary['run_dir']}"]
    entropy = summary["unigram_entropy"]
    unit = "byte" if summary["tokenizer"] == "byte" else "token"
    if summary["diverged"]:
        lines.append(f"diverged at step {summary['diverged_step']}: {summary['diverged_reason']} "
                     "(the record is saved; a diverged run is a result)")
    if summary["final_val_loss"] is not None:
        lines.append(
            f"final validation loss {summary['final_val_loss']:.4f} nats/token "
            f"(perplexity {summary['final_val_ppl']:.3f}, {summary['final_val_bpb']:.4f} "
            f"bits/byte); best {summary['best_val_loss']:.4f} at step {summary['best_val_step']}")
    lines.append(f"{unit}-unigram entropy of the training split: {entropy:.4f} nats/token")
    speed = summary["tokens_per_s"] or 0.0
    share = summary["optimizer_share"] or 0.0
    lines.append(
        f"{summary['steps']} steps, {_size(summary['tokens'], 'tokens')} in "
        f"{summary['wall_clock_s']:.0f} s ({speed:,.0f} tokens/s, optimizer {share:.1%} of step "
        f"time); peak memory {_size(summary['peak_memory_bytes'])}; optimizer state "
        f"{_size(summary['state_bytes'])}; loss spikes {summary['loss_spikes']}")
    return "\n".join(lines)


def announce(quiet: bool):
    """The ``on_start`` callback: the run folder, printed as training starts."""
    def started(trainer) -> None:
        if quiet:
            print(trainer.run_dir, flush=True)
            return
        step, steps = trainer.progress.step, trainer.budget.steps
        resuming = f" (resuming at step {step} of {steps})" if step else ""
        print(f"run folder: {trainer.run_dir}{resuming}", flush=True)

    return started


def run(args: argparse.Namespace) -> int:
    """Entry point of ``valley train``."""
    from llmvalley.bench.distributed import launch_rank

    rank = launch_rank()
    try:
        return _run(args, rank)
    except UsageError:
        if rank != 0:  # rank 0 prints the one line; every rank exits with status 2
            return 2
        raise


def _run(args: argparse.Namespace, rank: int) -> int:
    from llmvalley.bench.config import coerce_config, load_config_file
    from llmvalley.bench.records import check_output_folder

    from_file = load_config_file(args.config) if "config" in vars(args) else {}
    launch = launch_options(args, {k: v for k, v in from_file.items() if k in LAUNCH_KEYS})
    if "resume" in vars(args):
        extra = sorted(set(raw_options(args)) - RESUME_COMPATIBLE)
        if extra or "config" in vars(args):
            given = ", ".join(f"--{k.replace('_', '-')}" for k in extra) or "--config"
            raise UsageError(f"--resume continues a run with its saved config; drop {given} "
                             "(accepted with --resume: --quiet, --no-progress, --threads, "
                             "--parallel, --dist-timeout)")
        config = coerce_config(raw_options(args))
        options: dict[str, Any] = {"resume": args.resume}
    else:
        config = coerce_config(merged_config(args))
        check_output_folder(config.out, config.name)  # before torch and the corpus
        options = {"command": command_line(args)}
    from llmvalley.bench.distributed import PeerLost
    from llmvalley.bench.trainer import RunInterrupted, train

    try:
        summary = train(config, on_start=announce(config.quiet), **launch, **options)
    except RunInterrupted as exc:
        if rank == 0:
            print(f"valley train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except PeerLost as exc:  # each surviving rank says why it stopped
        print(f"valley train: error: {exc}", file=sys.stderr)
        return 1
    if not config.quiet and rank == 0:
        print(report(summary))
    return 0
