"""The benchmark's training half: ``train(config) -> summary`` and what it is made of.

>>> from llmvalley.bench import train
>>> summary = train({"model": "nano", "optimizer": "torch-adamw", "steps": 200, "quiet": True})
>>> summary["final_val_loss"], summary["run_dir"]
"""

from llmvalley.bench.config import TrainConfig, coerce_config, load_config_file
from llmvalley.bench.schedules import SCHEDULES, lr_multiplier
from llmvalley.bench.trainer import Trainer, train

__all__ = [
    "SCHEDULES",
    "TrainConfig",
    "Trainer",
    "coerce_config",
    "load_config_file",
    "lr_multiplier",
    "train",
]
