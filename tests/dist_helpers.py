"""Running a test function in N CPU processes, as torchrun would, with a hard timeout.

>>> results = run_ranks(my_function, 2, arg, init_group=True)   # [rank 0's, rank 1's]

Each process gets torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), one CPU thread, and, with ``init_group=True``, a gloo process
group formed before ``fn`` runs (and destroyed after). ``fn`` must be importable (a module-level
function) and its arguments and result picklable. A rank that raises makes :func:`run_ranks`
raise :class:`RankFailed` with that rank's traceback; one that has not finished when
``timeout`` runs out (a hang) is killed and :class:`RankFailed` says so. With
``raise_errors=False`` the per-rank :class:`Outcome` objects are returned instead.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.multiprocessing as mp


class RankFailed(AssertionError):
    """A rank raised, died or hung; the message holds its traceback or what happened."""


@dataclass
class Outcome:
    """What one rank did: its result, or its traceback, and its exit code."""

    rank: int
    ok: bool = False
    value: Any = None
    error: str | None = None  # the traceback of what it raised, or why there is no result
    exitcode: int | None = None


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple,
           kwargs: dict, results: Any, env: dict[str, str], init_group: bool,
           group_timeout_s: float) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    dist = None
    try:
        if init_group:
            from datetime import timedelta

            import torch.distributed as dist

            dist.init_process_group("gloo", timeout=timedelta(seconds=group_timeout_s))
        results.put((rank, True, fn(*args, **kwargs)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist is not None and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer may be gone already
                pass


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 60.0,
              init_group: bool = False, group_timeout_s: float = 30.0,
              env: dict[str, str] | None = None, raise_errors: bool = True,
              **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in ``world_size`` spawned processes; the per-rank results
    (or, with ``raise_errors=False``, the per-rank :class:`Outcome`)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(rank, world_size, port, fn, args, kwargs, results, env or {},
                               init_group, group_timeout_s))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outcomes = [Outcome(rank) for rank in range(world_size)]
    pending = set(range(world_size))
    deadline = time.monotonic() + timeout
    exited_at: dict[int, float] = {}
    failures: list[int] = []  # ranks that raised, in the order they reported
    try:
        while pending and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                now = time.monotonic()
                for rank in list(pending):  # exited without a result (os._exit, a crash)
                    if procs[rank].exitcode is not None:
                        exited_at.setdefault(rank, now)
                        if now - exited_at[rank] > 2.0:  # its result may still be in flight
                            outcomes[rank].error = (f"rank {rank} exited with code "
                                                    f"{procs[rank].exitcode} without a result")
                            pending.discard(rank)
                            failures.append(rank)
                continue
            outcomes[rank].ok = ok
            outcomes[rank].value = value if ok else None
            outcomes[rank].error = None if ok else value
            pending.discard(rank)
            if not ok:
                failures.append(rank)
                if raise_errors:
                    break
    finally:
        for proc in procs:
            proc.join(timeout=5 if not pending else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        results.close()
    for outcome, proc in zip(outcomes, procs):
        outcome.exitcode = proc.exitcode
        if outcome.rank in pending and outcome.error is None:
            outcome.error = f"rank {outcome.rank} did not finish within {timeout:g} s (killed)"
    if not raise_errors:
        return outcomes
    failed = failures + [o.rank for o in outcomes if not o.ok and o.rank not in failures]
    if failed:  # the first rank that failed, with its traceback
        first = outcomes[failed[0]]
        raise RankFailed(f"rank {first.rank} of {world_size} failed:\n{first.error}")
    return [outcome.value for outcome in outcomes]
