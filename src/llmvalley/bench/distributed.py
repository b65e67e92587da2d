"""``valley train`` under torchrun: the process group, rank 0's duties, batch slicing and
distributed checkpoints (``torch.distributed.checkpoint``, DCP).

``--parallel none`` (the default) is one process and none of this is used. With ``--parallel
ddp`` or ``fsdp`` the command runs under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``); the process group uses gloo on CPU and NCCL
on CUDA, with a timeout on every collective, so a rank that dies ends the others with
:class:`PeerLost` instead of a hang.

The global batch is the single-process one: every rank draws the same ``batch_size`` sequences
of a micro-batch (batches are a pure function of seed, step and micro-batch) and keeps its
contiguous ``batch_size / world_size`` rows. DDP averages the gradients, FSDP2 reduce-scatters
them, so the update is the single-process update; the logged loss and gradient norm are global.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmvalley.cli import UsageError
from llmvalley.optim.sharded import is_dtensor

PARALLEL_MODES = ("none", "ddp", "fsdp")
#: seconds a collective may wait for the other ranks before the run is ended (--dist-timeout)
DEFAULT_DIST_TIMEOUT_S = 600.0
#: the variables torchrun sets for every process it starts
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: words in the errors of gloo and NCCL when another rank has gone or a collective timed out
_LOST_PEER_WORDS = ("connection closed", "connection reset", "timed out", "timeout",
                    "broken pipe", "socket", "gloo", "nccl", "peer", "watchdog")


class PeerLost(RuntimeError):
    """Another rank stopped (it died, or exited early) or did not answer within the timeout."""


def launch_hint(mode: str) -> str:
    return f"torchrun --nproc_per_node=N -m llmvalley train ... --parallel {mode}"


def torchrun_env() -> dict[str, str] | None:
    """The launcher's variables, when this process was started by torchrun (or alike)."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    return {name: os.environ[name] for name in TORCHRUN_VARIABLES}


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 outside torchrun)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass
class Parallel:
    """How this process takes part in a run: mode, rank, world size, collectives."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S
    comm_device: torch.device = torch.device("cpu")

    # ------------------------------------------------------------- launch
    @classmethod
    def from_launch(cls, mode: str = "none",
                    timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> Parallel:
        """Check ``--parallel`` against how the process was launched (one-line UsageErrors)."""
        if mode not in PARALLEL_MODES:
            raise UsageError(f"--parallel: unknown value {mode!r}; accepted: "
                             f"{', '.join(PARALLEL_MODES)}")
        if not timeout_s > 0:
            raise UsageError(f"--dist-timeout: expected a positive number of seconds, got "
                             f"{timeout_s}")
        env = torchrun_env()
        world = int(env["WORLD_SIZE"]) if env else 1
        if mode == "none":
            if world > 1:
                raise UsageError(f"started by torchrun as {world} processes, but --parallel is "
                                 "none (each would train alone); add --parallel ddp or fsdp")
            return cls(timeout_s=timeout_s)
        if env is None:
            raise UsageError(f"--parallel {mode} runs under torchrun, which starts one process "
                             f"per device: {launch_hint(mode)}")
        return cls(mode=mode, rank=int(env["RANK"]), world_size=world,
                   local_rank=int(env["LOCAL_RANK"]), timeout_s=timeout_s)

    @property
    def active(self) -> bool:
        """Whether a process group is used (``--parallel ddp`` or ``fsdp``)."""
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes logs, summaries, progress and prints."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        """The global batch must split evenly over the ranks."""
        if batch_size % self.world_size:
            raise UsageError(
                f"--batch-size {batch_size} is the global batch and must be divisible by the "
                f"world size {self.world_size} (each rank takes batch-size / world-size "
                f"sequences); use a multiple of {self.world_size}")

    def place(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` on GPUs."""
        if self.active and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    @contextlib.contextmanager
    def session(self, device_type: str) -> Iterator[Parallel]:
        """The process group for the run's duration (gloo on CPU, NCCL on CUDA); collective
        failures inside become :class:`PeerLost`."""
        if not self.active:
            yield self
            return
        import torch.distributed as dist

        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            self.comm_device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.comm_device)
        owned = not dist.is_initialized()
        try:
            if owned:
                dist.init_process_group(backend, timeout=timedelta(seconds=self.timeout_s))
        except Exception as exc:
            raise PeerLost(f"rank {self.rank}: the process group did not form within "
                           f"{self.timeout_s:g} s ({_first_line(exc)})") from None
        try:
            with self.guard():
                yield self
        finally:
            if owned and dist.is_initialized():
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn the errors of a collective whose peers have gone into one clear PeerLost."""
        try:
            yield
        except (UsageError, KeyboardInterrupt, PeerLost):
            raise
        except RuntimeError as exc:
            import torch.distributed as dist

            text = str(exc).lower()
            if isinstance(exc, dist.DistError) or any(w in text for w in _LOST_PEER_WORDS):
                raise PeerLost(
                    f"rank {self.rank} of {self.world_size}: another rank stopped or did not "
                    f"answer within --dist-timeout {self.timeout_s:g} s, so this one stops too "
                    f"({_first_line(exc)}); the other ranks' output says why") from None
            raise

    # ------------------------------------------------------------- collectives
    def all_sum(self, values: list[float]) -> list[float]:
        """Sum numbers over the ranks (float64; unchanged in one process)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def on_main(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on rank 0 and return its result on every rank; a UsageError it raises is
        raised on every rank."""
        if not self.active:
            return fn(*args)
        outcome: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                outcome = (True, fn(*args))
            except UsageError as exc:
                outcome = (False, str(exc))
        ok, value = self.broadcast(outcome)
        if not ok:
            raise UsageError(value)
        return value

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------- model and data
    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to call for forward/backward: DDP around ``model``, or ``model`` itself
        after ``fully_shard`` of each block and the root (FSDP2; parameters become DTensors).
        Build the optimizer after this."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in getattr(model, "layers", []):
                fully_shard(block)
            fully_shard(model)
        return model

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (whose rows W divides)."""
        if not self.active:
            return x
        n = x.shape[0] // self.world_size
        return x[self.rank * n:(self.rank + 1) * n]

    def eval_rows(self, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's part of an evaluation batch and its weight in the global sum: a near-
        even split; a batch with fewer rows than ranks is run whole by every rank (FSDP needs
        every rank in every forward) and counted on rank 0 only."""
        if not self.active:
            return x, y, 1.0
        if x.shape[0] < self.world_size:
            return x, y, 1.0 if self.is_main else 0.0
        return x.tensor_split(self.world_size)[self.rank], \
            y.tensor_split(self.world_size)[self.rank], 1.0

    def grad_norm(self, norm: torch.Tensor) -> float:
        """The global gradient norm from ``clip_grad_norm_`` (a DTensor under FSDP2)."""
        full = getattr(norm, "full_tensor", None)
        return float(full() if full is not None else norm)

    @contextlib.contextmanager
    def loading_lock(self, root: Path) -> Iterator[None]:
        """One rank at a time reads, tokenizes and caches the corpus (the first fills the
        token cache, the others memory-map it)."""
        if not self.active:
            yield
            return
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".valley-train.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:200] + ("..." if len(text) > 200 else "")


# ------------------------------------------------------------------------------ DCP
def _prepare(optimizer: torch.optim.Optimizer) -> None:
    """Create an empty optimizer's state so DCP has tensors to load into (llmvalley
    optimizers declare theirs; torch's are made by ``get_state_dict``'s zero-gradient step)."""
    init_state = getattr(optimizer, "init_state", None)
    if init_state is not None and not optimizer.state:
        init_state()


def save_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             par: Parallel) -> None:
    """Write model and optimizer to the DCP folder ``path`` (every rank writes its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    if par.is_main and path.exists():
        shutil.rmtree(path)
    par.barrier()
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))
    par.barrier()


def load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP folder into ``model`` and ``optimizer`` whatever the world size that wrote
    it (resharded by DCP); works in one process without a process group too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _prepare(optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _hold_what_was_saved(path, optim_sd)
    state = {"model": model_sd, "optimizer": optim_sd}
    with warnings.catch_warnings():  # one process: DCP says it loads without a group
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def _hold_what_was_saved(path: Path, optim_sd: dict[str, Any]) -> None:
    """Make each parameter's optimizer state hold exactly the entries the checkpoint holds.

    DCP loads into the tensors it is given and refuses entries the checkpoint lacks. A fresh
    optimizer's state (``init_state``) is its first step's, which is not the saved one where
    state comes and goes during training: FRUGAL's blockwise projector keeps Adam moments for
    the tensors active at the time only. So entries the checkpoint lacks are dropped, and
    entries it has are created: empty tensors of the saved size and dtype (DTensors laid out
    like another entry of the same global shape, under FSDP2), or placeholders for Python
    values. Parameters the checkpoint holds nothing for are left alone.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for fqn, entries in optim_sd.get("state", {}).items():
        prefix = f"optimizer.state.{fqn}."
        held = {k[len(prefix):]: m for k, m in saved.items() if k.startswith(prefix)}
        if not held or set(held) == set(entries):
            continue
        tensors = [v for v in entries.values() if isinstance(v, torch.Tensor)]
        for key in [k for k in entries if k not in held]:
            del entries[key]
        for key, meta in held.items():
            if key in entries:
                continue
            if not isinstance(meta, TensorStorageMetadata):
                entries[key] = None  # DCP puts the saved object here
                continue
            like = next((t for t in tensors if tuple(t.shape) == tuple(meta.size)), None)
            if like is not None and is_dtensor(like):
                from torch.distributed.tensor import empty as dtensor_empty

                entries[key] = dtensor_empty(meta.size, dtype=meta.properties.dtype,
                                             device_mesh=like.device_mesh,
                                             placements=like.placements)
            else:
                device = like.device if like is not None else (
                    tensors[0].device if tensors else torch.device("cpu"))
                entries[key] = torch.empty(meta.size, dtype=meta.properties.dtype,
                                           device=device)


def load_full(model: nn.Module, optimizer: torch.optim.Optimizer,
              model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
    """Load a single-process checkpoint (``state_dict()`` of the plain model and optimizer)
    into a DDP or FSDP2 run: parameter ids are mapped to names, and full tensors are sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {p: name for name, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in optim_sd["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(order):
        raise ValueError(f"the checkpoint's optimizer has {len(saved_ids)} parameters, this "
                         f"run's {len(order)}")
    fqn = dict(zip(saved_ids, order))
    by_name = {
        **{k: v for k, v in optim_sd.items() if k not in ("state", "param_groups")},
        "state": {fqn[i]: s for i, s in optim_sd["state"].items()},
        "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]}
                         for g in optim_sd["param_groups"]],
    }
    _prepare(optimizer)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))
