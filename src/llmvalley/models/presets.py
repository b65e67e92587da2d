"""Named model sizes for ``valley train --model``.

- CPU tier, byte-level vocabulary (256): ``nano`` (~0.9M parameters), ``micro`` (~4.9M),
  ``tiny`` (~19M).
- The LLaMA configurations of the GaLore, APOLLO and SCALE papers (vocabulary 32000, sequence
  length 256), copied from the GaLore repository's ``configs/llama_*.json``.
- ``gpt2-124m``: GPT-2 small's width, depth, heads, vocabulary and context, built from the same
  LLaMA-style blocks (RMSNorm, rotary, SwiGLU with 2048 hidden units, which matches GPT-2's
  4*768 GELU MLP in parameters). With its untied head it has ~162M parameters; GPT-2 ties the
  head to the embedding, which is where the familiar 124M comes from.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from llmvalley.models.llama import Llama, LlamaConfig

PRESETS: dict[str, LlamaConfig] = {
    "nano": LlamaConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, ffn_hidden=384,
                        max_seq_len=128),
    "micro": LlamaConfig(vocab_size=256, d_model=256, n_layers=6, n_heads=4, ffn_hidden=688,
                         max_seq_len=256),
    "tiny": LlamaConfig(vocab_size=256, d_model=512, n_layers=6, n_heads=8, ffn_hidden=1376,
                        max_seq_len=256),
    "llama-60m": LlamaConfig(vocab_size=32000, d_model=512, n_layers=8, n_heads=8,
                             ffn_hidden=1376, max_seq_len=256),
    "llama-130m": LlamaConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                              ffn_hidden=2048, max_seq_len=256),
    "llama-350m": LlamaConfig(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16,
                              ffn_hidden=2736, max_seq_len=256),
    "llama-1b": LlamaConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=32,
                            ffn_hidden=5461, max_seq_len=256),
    "gpt2-124m": LlamaConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                             ffn_hidden=2048, max_seq_len=1024),
}

# Fields that ``--d-model`` etc. may override on any preset.
OVERRIDABLE = tuple(f.name for f in fields(LlamaConfig))


def model_config(preset: str, **overrides: int | float | None) -> LlamaConfig:
    """The preset's configuration with non-None ``overrides`` applied (KeyError if unknown)."""
    if preset not in PRESETS:
        raise KeyError(preset)
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise TypeError(f"unknown model fields: {', '.join(sorted(unknown))}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def build_model(cfg: LlamaConfig, device: str | torch.device = "cpu") -> Llama:
    """Instantiate a model (``device="meta"`` counts parameters without allocating them)."""
    with torch.device(device):
        return Llama(cfg)
