"""The run folder: resolved config, JSONL log, summary, command line and checkpoint.

A run folder holds:

- ``config.json``: the options as given (``config``) and everything resolved from them
  (``resolved``: model shape, tokenizer, steps, tokens per step, device, versions...);
- ``command.txt``: the exact command that produced the run (when started from the CLI);
- ``log.jsonl``: one JSON object per log/eval step;
- ``summary.json``: the final record, written when the run ends (diverged runs included);
- ``checkpoint.pt``: the latest checkpoint, when checkpoints are enabled.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
COMMAND_FILE = "command.txt"
CHECKPOINT_FILE = "checkpoint.pt"


def json_safe(value: Any) -> Any:
    """Replace NaN/inf floats by None (JSON has no such numbers) and tuples by lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2) + "\n")
    os.replace(tmp, path)


def new_run_dir(out: str | Path, name: str | None, default_name: str) -> Path:
    """Create the run folder ``out/name``; a default name gets a timestamp and is made unique."""
    out = Path(out)
    if name is not None:
        path = out / name
        if path.exists() and any(path.iterdir()):
            from llmvalley.cli import UsageError

            raise UsageError(f"run folder {path} already exists; continue it with --resume "
                             f"{path} or choose another --name")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = out / f"{default_name}-{stamp}"
        suffix = 1
        while path.exists():
            path = out / f"{default_name}-{stamp}-{suffix}"
            suffix += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunLog:
    """Append-only JSONL log of a run, flushed at every record."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None) -> None:
        self.path = run_dir / LOG_FILE
        if resume_step is not None:
            self._truncate(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate(self, step: int) -> None:
        """Drop records written after the checkpoint at ``step`` (the run repeats them)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(json_safe(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of a run's ``log.jsonl``."""
    path = Path(run_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write ``checkpoint.pt`` atomically."""
    path = run_dir / CHECKPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: Path) -> dict:
    """Read ``checkpoint.pt`` onto the CPU."""
    return torch.load(run_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
