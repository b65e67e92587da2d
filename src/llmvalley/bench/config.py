"""The configuration of one training run, its validation, and config files (YAML or TOML).

:class:`TrainConfig` is what ``valley train`` builds from its options and what
:func:`llmvalley.bench.train` takes from Python. :func:`coerce_config` turns a dict of raw values
(strings from the command line, or values from a config file) into a validated config, raising a
one-line :class:`~llmvalley.cli.UsageError` that names the option and what it accepts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llmvalley.bench.schedules import SCHEDULES
from llmvalley.cli import UsageError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
#: default budget: 400 steps of 32 x 128 tokens of the nano preset, about 2 minutes on an idle
#: 2-core CPU (docs/train.md)
DEFAULT_STEPS = 400
DEFAULT_CHECKPOINT_EVERY = 100


@dataclass
class TrainConfig:
    """Everything that defines a training run (see ``docs/train.md`` for each option)."""

    # data
    data: str = "stdlib"
    text_field: str = "text"
    val_fraction: float = 0.02
    tokenizer: str = "auto"  # auto: byte for byte-vocabulary presets, else bpe at preset size
    vocab_size: int | None = None  # BPE vocabulary size (default: the preset's)
    # model
    model: str = "nano"
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    ffn_hidden: int | None = None
    seq_len: int | None = None  # default: the preset's context length
    # optimizer
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float | None = None  # None: the optimizer's own default
    opt_args: dict[str, Any] = field(default_factory=dict)
    fallback_args: dict[str, Any] = field(default_factory=dict)
    # schedule and step
    schedule: str = "cosine"
    warmup_steps: int | None = None  # default: 10% of the steps
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: share of the steps spent decaying
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    batch_size: int = 32
    grad_accum: int = 1
    # budget, evaluation, checkpoints
    steps: int | None = None  # default DEFAULT_STEPS unless tokens is given
    tokens: int | None = None
    eval_every: int = 100
    eval_batches: int = 16
    # the shifted held-out corpus (llmvalley.data.heldout): auto (prose for stdlib runs, Python
    # source otherwise), none, or a --data source; its batches (default: a quarter of
    # eval_batches)
    shifted_data: str = "auto"
    shifted_eval_batches: int | None = None
    log_every: int = 10
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # 0: none (not even on SIGINT/SIGTERM)
    seed: int = 0
    # hardware
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    threads: int | None = None
    # output
    out: str = "runs"
    name: str | None = None
    quiet: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(TrainConfig)}
POSITIVE_INTS = ("batch_size", "grad_accum", "eval_every", "eval_batches", "log_every",
                 "steps", "tokens", "d_model", "n_layers", "n_heads", "ffn_hidden", "seq_len",
                 "threads", "vocab_size", "shifted_eval_batches")


OPTION_NAMES = {"opt_args": "--opt-arg", "fallback_args": "--fallback-arg"}


def option_name(key: str) -> str:
    """The command-line spelling of a config key."""
    return OPTION_NAMES.get(key, "--" + key.replace("_", "-"))


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{option_name(key)}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).replace("_", ""))
    except ValueError:
        try:  # allow 1e6 and 2.5e6 for token budgets
            as_float = float(str(value))
        except ValueError:
            as_float = math.nan
        if math.isfinite(as_float) and as_float.is_integer():
            return int(as_float)
        raise UsageError(f"{option_name(key)}: expected an integer, got {value!r}") from None


def _to_float(key: str, value: Any) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option_name(key)}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(result):
        raise UsageError(f"{option_name(key)}: expected a finite number, got {value!r}")
    return result


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{option_name(key)}: expected true or false, got {value!r}")


def parse_value(text: str) -> Any:
    """A ``--opt-arg`` value: int, float, bool, None, a comma-separated tuple, or a string."""
    if "," in text:
        return tuple(parse_value(part.strip()) for part in text.split(",") if part.strip())
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_key_values(key: str, items: Any) -> dict[str, Any]:
    """``["betas=0.9,0.95", ...]`` (or a dict from a config file) as a dict of typed values."""
    if items is None:
        return {}
    if isinstance(items, dict):  # YAML reads 1e-8 (no dot) as a string: type it as the CLI does
        return {str(k): tuple(v) if isinstance(v, list)
                else parse_value(v.strip()) if isinstance(v, str) else v
                for k, v in items.items()}
    result: dict[str, Any] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip().isidentifier():
            raise UsageError(f"{option_name(key)}: expected key=value, got {item!r}")
        result[name.strip()] = parse_value(value.strip())
    return result


def coerce_config(raw: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from raw values (strings are converted)."""
    unknown = sorted(set(raw) - set(FIELD_TYPES))
    if unknown:
        raise UsageError(f"unknown config keys: {', '.join(unknown)}; accepted: "
                         f"{', '.join(FIELD_TYPES)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        kind = FIELD_TYPES[key]
        if value is None:
            values[key] = None if "None" in kind else TrainConfig.__dataclass_fields__[key].default
        elif kind.startswith("dict"):
            values[key] = parse_key_values(key, value)
        elif kind.startswith("int"):
            values[key] = _to_int(key, value)
        elif kind.startswith("float"):
            values[key] = _to_float(key, value)
        elif kind == "bool":
            values[key] = _to_bool(key, value)
        else:
            values[key] = str(value)
    config = TrainConfig(**values)
    validate(config)
    return config


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{option_name(key)}: unknown value {value!r}; accepted: "
                         f"{', '.join(choices)}")


def validate(config: TrainConfig) -> None:
    """Raise a UsageError for values out of range (types are assumed right)."""
    for key in POSITIVE_INTS:
        value = getattr(config, key)
        if value is not None and value < 1:
            raise UsageError(f"{option_name(key)}: expected a positive integer, got {value}")
    for key in ("warmup_steps", "checkpoint_every"):
        value = getattr(config, key)
        if value is not None and value < 0:
            raise UsageError(f"{option_name(key)}: expected 0 or more, got {value}")
    if config.lr <= 0:
        raise UsageError(f"--lr: expected a positive learning rate, got {config.lr}")
    if config.weight_decay is not None and config.weight_decay < 0:
        raise UsageError(f"--weight-decay: expected 0 or more, got {config.weight_decay}")
    if config.grad_clip < 0:
        raise UsageError(f"--grad-clip: expected 0 (off) or more, got {config.grad_clip}")
    if not 0 <= config.min_lr_ratio <= 1:
        raise UsageError(f"--min-lr-ratio: expected a value in [0, 1], got {config.min_lr_ratio}")
    if not 0 < config.decay_fraction <= 1:
        raise UsageError(f"--decay-fraction: expected a value in (0, 1], got "
                         f"{config.decay_fraction}")
    if not 0 < config.val_fraction < 1:
        raise UsageError(f"--val-fraction: expected a value in (0, 1), got {config.val_fraction}")
    if config.steps is not None and config.tokens is not None:
        raise UsageError("give the budget as --steps or --tokens, not both")
    _check_choice("schedule", config.schedule, SCHEDULES)
    _check_choice("device", config.device, DEVICES)
    _check_choice("precision", config.precision, PRECISIONS)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON config file into raw values.

    Keys may use dashes or underscores (``weight-decay`` or ``weight_decay``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise UsageError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    except UsageError:
        raise
    except Exception as exc:  # yaml, toml and json each raise their own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"config file {path} cannot be parsed: {first}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
