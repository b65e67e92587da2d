"""The benchmark's training half: ``train(config) -> summary`` and what it is made of.

>>> from llmvalley.bench import train
>>> summary = train({"model": "nano", "optimizer": "torch-adamw", "steps": 200, "quiet": True})
>>> summary["final_val_loss"], summary["run_dir"]

The training loop (and torch) is imported on first use of :func:`train` or :class:`Trainer`, so
that the command line's option parsing and config checks stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmvalley.bench.config import TrainConfig, coerce_config, load_config_file
from llmvalley.bench.schedules import SCHEDULES, lr_multiplier

if TYPE_CHECKING:
    from llmvalley.bench.trainer import RunInterrupted, Trainer, train

_TRAINER_EXPORTS = ("RunInterrupted", "Trainer", "train")

__all__ = [
    "SCHEDULES",
    "RunInterrupted",
    "TrainConfig",
    "Trainer",
    "coerce_config",
    "load_config_file",
    "lr_multiplier",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _TRAINER_EXPORTS:
        value = getattr(importlib.import_module("llmvalley.bench.trainer"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llmvalley.bench' has no attribute {name!r}")
