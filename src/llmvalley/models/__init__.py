"""Models for the benchmark: a LLaMA-style decoder and its named presets."""

from llmvalley.models.llama import Llama, LlamaConfig
from llmvalley.models.presets import PRESETS, build_model, model_config

__all__ = ["PRESETS", "Llama", "LlamaConfig", "build_model", "model_config"]
