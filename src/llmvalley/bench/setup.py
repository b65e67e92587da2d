"""Resolving a :class:`TrainConfig` into a workload: device, data, tokenizer, model and budget.

Everything here turns user mistakes (unknown preset, missing CUDA, a corpus too small for the
sequence length...) into one-line :class:`~llmvalley.cli.UsageError` messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmvalley.bench.config import DEFAULT_STEPS, TrainConfig
from llmvalley.cli import UsageError
from llmvalley.data import (
    ByteTokenizer,
    HFTokenizer,
    TokenSplit,
    build_tokenizer,
    cache_root,
    eval_batches,
    load_corpus,
    load_tokens,
)
from llmvalley.data.tokenizers import parse_tokenizer_spec
from llmvalley.models import PRESETS, LlamaConfig, model_config

WARMUP_FRACTION = 0.1  # default warmup: 10% of the steps


@dataclass
class Workload:
    """The resolved data and model of a run."""

    corpus_name: str
    tokenizer: ByteTokenizer | HFTokenizer
    train: TokenSplit
    val: TokenSplit
    eval_set: list[tuple[torch.Tensor, torch.Tensor]]
    model_config: LlamaConfig

    @property
    def seq_len(self) -> int:
        return self.model_config.max_seq_len


@dataclass(frozen=True)
class Budget:
    """Steps, warmup and tokens of a run."""

    steps: int
    warmup_steps: int
    tokens_per_step: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def resolve_device(config: TrainConfig) -> tuple[torch.device, str]:
    """The device and precision (``fp32`` or ``bf16``) of a run."""
    has_cuda = torch.cuda.is_available()
    if config.device == "cuda" and not has_cuda:
        raise UsageError("--device cuda: no CUDA GPU is available on this machine; "
                         "accepted here: --device cpu or auto")
    device = torch.device("cuda" if config.device == "auto" and has_cuda else
                          config.device if config.device != "auto" else "cpu")
    if config.precision == "bf16" and device.type != "cuda":
        raise UsageError("--precision bf16 needs a CUDA GPU (bf16 autocast is used on CUDA "
                         "only); accepted on this machine: --precision fp32 or auto")
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return device, precision


def preset_config(config: TrainConfig) -> LlamaConfig:
    """The model preset with the command line's shape overrides (vocabulary not yet set)."""
    if config.model not in PRESETS:
        raise UsageError(f"unknown model {config.model!r}; accepted: {', '.join(PRESETS)} "
                         "(sizes can be changed with --d-model, --n-layers, --n-heads, "
                         "--ffn-hidden, --seq-len)")
    try:
        return model_config(config.model, d_model=config.d_model, n_layers=config.n_layers,
                            n_heads=config.n_heads, ffn_hidden=config.ffn_hidden,
                            max_seq_len=config.seq_len)
    except ValueError as exc:
        raise UsageError(f"bad model shape: {exc}") from None


def tokenizer_spec(config: TrainConfig, preset: LlamaConfig) -> tuple[str, int | None]:
    """``--tokenizer auto``: byte-level for 256-entry presets, else BPE at the preset's size."""
    if config.tokenizer != "auto":
        preset_bpe_size = preset.vocab_size if preset.vocab_size > 256 else None
        return config.tokenizer, config.vocab_size or preset_bpe_size
    if config.vocab_size is not None and config.vocab_size != 256:
        return "bpe", config.vocab_size
    return ("byte", None) if preset.vocab_size == 256 else ("bpe", preset.vocab_size)


def load_workload(config: TrainConfig) -> Workload:
    """Load (or build and cache) the corpus, tokenizer, token splits and the evaluation set."""
    preset = preset_config(config)
    spec, vocab = tokenizer_spec(config, preset)
    parse_tokenizer_spec(spec, vocab)  # fail on a bad --tokenizer before reading any data
    corpus = load_corpus(config.data, text_field=config.text_field,
                         val_fraction=config.val_fraction)
    root = cache_root()
    tokenizer = build_tokenizer(spec, corpus, root, vocab_size=vocab)
    train = load_tokens(corpus, tokenizer, "train", root)
    val = load_tokens(corpus, tokenizer, "val", root)
    seq_len = preset.max_seq_len
    for split_name, split in (("training", train), ("validation", val)):
        if split.n_tokens < seq_len + 2:
            raise UsageError(f"the {split_name} split of {corpus.name} has {split.n_tokens} "
                             f"tokens, too few for sequences of {seq_len}; use more data or a "
                             "smaller --seq-len")
    eval_set = eval_batches(val.tokens, batch_size=config.batch_size, seq_len=seq_len,
                            n_batches=config.eval_batches)
    model_cfg = LlamaConfig(**{**preset.to_dict(), "vocab_size": tokenizer.vocab_size})
    return Workload(corpus_name=corpus.name, tokenizer=tokenizer, train=train, val=val,
                    eval_set=eval_set, model_config=model_cfg)


def plan_budget(config: TrainConfig, seq_len: int) -> Budget:
    """Steps from ``--steps`` or ``--tokens`` (rounded up), and the warmup length."""
    tokens_per_step = config.batch_size * config.grad_accum * seq_len
    if config.steps is not None:
        steps = config.steps
    elif config.tokens is not None:
        steps = math.ceil(config.tokens / tokens_per_step)
    else:
        steps = DEFAULT_STEPS
    warmup = (round(WARMUP_FRACTION * steps) if config.warmup_steps is None
              else config.warmup_steps)
    return Budget(steps=steps, warmup_steps=min(warmup, steps), tokens_per_step=tokens_per_step)
