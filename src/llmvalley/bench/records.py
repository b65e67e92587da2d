"""The run folder: resolved config, JSONL log, summary, command line and checkpoints.

A run folder holds:

- ``config.json``: the options as given (``config``) and everything resolved from them
  (``resolved``: model shape, tokenizer, steps, tokens per step, device, versions...);
- ``command.txt``: the exact command that produced the run (when started from the CLI);
- ``log.jsonl``: one JSON object per log/eval step;
- ``summary.json``: the final record, written when the run ends (diverged runs included);
- ``checkpoint.pt``: the latest checkpoint, and ``checkpoint-previous.pt`` the one before it,
  when checkpoints are enabled (the default); under ``--parallel ddp|fsdp`` these are the DCP
  folders ``checkpoint.dcp`` and ``checkpoint-previous.dcp`` (``torch.distributed.checkpoint``
  shards of model and optimizer, and ``loop.pt``: the loop state rank 0 writes).

torch is imported only to save and load checkpoints, so the other helpers stay cheap to import.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from llmvalley.atomic import replacing
from llmvalley.cli import UsageError

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
COMMAND_FILE = "command.txt"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint-previous.pt"
#: what every checkpoint written by the trainer holds
CHECKPOINT_KEYS = ("model", "optimizer", "progress", "spikes", "torch_rng")
#: the DCP checkpoint folders of ``--parallel ddp|fsdp`` runs, and the loop state inside them
DCP_CHECKPOINT = "checkpoint.dcp"
PREVIOUS_DCP_CHECKPOINT = "checkpoint-previous.dcp"
DCP_LOOP_FILE = "loop.pt"
DCP_METADATA = ".metadata"
#: what the loop file of a DCP checkpoint holds (model and optimizer are the DCP shards)
DCP_LOOP_KEYS = ("progress", "spikes", "torch_rng")


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
    """Write ``data`` as JSON atomically (:func:`llmvalley.atomic.replacing`: the temporary name
    is this process's and thread's own, so processes sharing a folder, a shared sweep or compare,
    never rename each other's half-written file)."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2) + "\n")


def new_run_dir(out: str | Path, name: str | None, default_name: str) -> Path:
    """Create the run folder ``out/name``; a default name gets a timestamp and is made unique."""
    out = Path(out)
    if name is not None:
        path = out / name
        if path.exists() and any(path.iterdir()):
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


def _first_existing(path: Path) -> Path:
    """``path`` or its deepest ancestor that exists."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(path: Path, what: str) -> None:
    """Raise a one-line UsageError unless files can be created in ``path`` (or, when it does not
    exist yet, in its deepest existing ancestor, where it would be made)."""
    existing = _first_existing(path)
    if not existing.is_dir():
        if existing == path:
            raise UsageError(f"{what}: {path} is a file, not a folder")
        raise UsageError(f"{what}: {existing} is a file, so no folder can be made in it")
    try:
        handle, probe = tempfile.mkstemp(prefix=".valley-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"{what}: cannot write in {existing} ({reason}); choose a writable "
                         "folder") from None


def check_output_folder(out: str | Path, name: str | None) -> None:
    """Fail now, before any data is read, when the run folder ``out/name`` cannot be made."""
    out_path = Path(out).expanduser()
    check_writable_folder(out_path, f"--out {out}")
    if name is not None:
        path = out_path / name
        if os.path.lexists(path) and not path.is_dir():
            raise UsageError(f"--name {name}: {path} is a file, not a folder")
        if path.is_dir() and any(path.iterdir()):
            raise UsageError(f"run folder {path} already exists; continue it with --resume "
                             f"{path} or choose another --name")


# ------------------------------------------------------------------------------ checkpoints
def first_sentence(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message (its type when it has none)."""
    lines = str(exc).strip().splitlines()
    text = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return (text[:limit] + "...") if len(text) > limit else text or type(exc).__name__


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, or not a checkpoint)."""


def save_checkpoint(run_dir: Path, state: dict, *, keep_previous: bool = True) -> None:
    """Write ``checkpoint.pt`` atomically; the one it replaces becomes ``checkpoint-previous.pt``
    (unless ``keep_previous`` is false: then the previous file is left as it is)."""
    import torch

    path = run_dir / CHECKPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    if keep_previous and path.is_file():
        os.replace(path, run_dir / PREVIOUS_CHECKPOINT_FILE)
    os.replace(tmp, path)


def is_dcp_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a DCP checkpoint folder (written under ``--parallel``)."""
    return path.is_dir() and (path / DCP_LOOP_FILE).is_file()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU; a :class:`CheckpointError` says why it cannot be.

    For a DCP folder this is its loop state, with ``dcp`` set to the folder (the model and
    optimizer are loaded from the shards into the live objects, see ``bench.distributed``)."""
    import torch

    path = Path(path)
    dcp = path.is_dir()
    if dcp and not (path / DCP_METADATA).is_file():
        raise CheckpointError(f"{path} is not a complete DCP checkpoint (no {DCP_METADATA})")
    target = path / DCP_LOOP_FILE if dcp else path
    try:
        state = torch.load(target, map_location="cpu", weights_only=False)
    except Exception as exc:  # zip, pickle and torch errors of a truncated or corrupt file
        raise CheckpointError(f"{target} is truncated or corrupt ({first_sentence(exc)})") \
            from None
    keys = DCP_LOOP_KEYS if dcp else CHECKPOINT_KEYS
    if not isinstance(state, dict) or not set(keys) <= set(state):
        raise CheckpointError(f"{target} is not a valley train checkpoint (it lacks "
                              f"{', '.join(keys)})")
    if dcp:
        state["dcp"] = path
    return state


def latest_checkpoint(run_dir: Path) -> Path:
    """The run's newest checkpoint: ``checkpoint.pt`` or ``checkpoint.dcp`` (a run resumed in
    another ``--parallel`` mode can hold both; the one written last wins)."""
    found = [p for p in (run_dir / CHECKPOINT_FILE, run_dir / DCP_CHECKPOINT) if p.exists()]
    if not found:
        return run_dir / CHECKPOINT_FILE

    def written(p: Path) -> float:
        return (p / DCP_LOOP_FILE if p.is_dir() and (p / DCP_LOOP_FILE).exists() else p) \
            .stat().st_mtime

    return max(found, key=written)


def rotate_dcp(run_dir: Path, written: Path, *, keep_previous: bool = True) -> None:
    """Make the just-written DCP folder ``written`` the run's ``checkpoint.dcp``; the one it
    replaces becomes ``checkpoint-previous.dcp`` (or is removed, unless ``keep_previous``)."""
    import shutil

    current, previous = run_dir / DCP_CHECKPOINT, run_dir / PREVIOUS_DCP_CHECKPOINT
    if current.exists():
        if keep_previous:
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(current, previous)
        else:
            shutil.rmtree(current)
    os.replace(written, current)


def checkpoint_step(state: dict[str, Any]) -> int:
    """The number of steps a checkpoint has taken."""
    return int(state["progress"].step)


def load_checkpoint(run_dir: Path) -> dict:
    """Read a run folder's ``checkpoint.pt`` onto the CPU."""
    return read_checkpoint(Path(run_dir) / CHECKPOINT_FILE)
