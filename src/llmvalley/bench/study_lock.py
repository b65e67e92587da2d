"""Coordination of several sweep processes (on one machine or many) sharing one Optuna storage.

Two sweeps of the same study must never run one grid point or seed twice, nor start more trials
than the budget. Every decision that creates a trial (is budget left, which point comes next,
which seed is free) is therefore taken under :class:`StorageLock`, a lock on the whole storage,
from a fresh read of the study; the trial it creates carries its owner (:func:`owner_token`)
from the moment it exists, and is running before the lock is released. The lock is:

- SQLite: an exclusive ``flock`` on ``DATABASE.lock`` beside the database file (processes on
  one machine: SQLite itself is not meant for sharing over a network file system);
- PostgreSQL: a session-level advisory lock (``pg_advisory_lock``) on a connection of its own,
  released by the server if the process dies;
- MySQL/MariaDB: a named lock (``GET_LOCK``), released by the server likewise;
- other databases: threads of one process only (with a warning).

A trial left running by a process that died is recognised two ways: its heartbeat stops (Optuna
fails it after the grace period, wherever it ran), and, when its owner ran on this machine, at
once: the owner's process is gone (or, in this very process, its sweep has ended).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: user attribute holding a trial's owner (see :func:`owner_token`)
OWNER_ATTR = "owner"

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
#: the sweep runs of this process that are still going (their ``run`` ids)
_LIVE_RUNS: set[str] = set()


def _thread_lock(key: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(key, threading.Lock())


class StorageLock:
    """A lock on one Optuna RDB storage, held only while a trial is chosen and created."""

    def __init__(self, storage: Any, url: str) -> None:
        self.engine = storage.engine
        self.dialect = self.engine.dialect.name
        self.url = url
        self.key = hashlib.sha1(url.encode()).hexdigest()
        self._warned = False

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock (threads of this process first, then the processes sharing it)."""
        with _thread_lock(self.key):
            if self.dialect == "sqlite":
                with self._file_lock():
                    yield
            elif self.dialect == "postgresql":
                with self._server_lock("SELECT pg_advisory_lock(:k)",
                                       "SELECT pg_advisory_unlock(:k)", self._int_key()):
                    yield
            elif self.dialect in ("mysql", "mariadb"):
                with self._server_lock("SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)",
                                       f"llmvalley-{self.key[:40]}"):
                    yield
            else:
                if not self._warned:
                    warnings.warn(f"sweeps on a {self.dialect} storage are coordinated only "
                                  "between threads of one process", stacklevel=3)
                    self._warned = True
                yield

    def _int_key(self) -> int:
        return int.from_bytes(bytes.fromhex(self.key[:16]), "big", signed=True)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        database = self.engine.url.database
        if not database or database == ":memory:":  # one process only: the thread lock holds
            yield
            return
        try:
            import fcntl
        except ImportError:  # Windows: no flock; SQLite sweeps are then not shared safely
            yield
            return
        with open(Path(database).with_name(Path(database).name + ".lock"), "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _server_lock(self, acquire: str, release: str, key: Any) -> Iterator[None]:
        from sqlalchemy import text

        conn = self.engine.connect()
        try:
            conn.execute(text(acquire), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.execute(text(release), {"k": key})
                    conn.commit()
                except Exception:  # a broken connection: drop it (the server frees the lock)
                    conn.invalidate()
                    raise
        finally:
            conn.close()


# ------------------------------------------------------------------------------ owners
def machine_id() -> str:
    """This machine as owners record it: host name and kernel boot id (a pid means something
    only on the machine, and since the boot, where it was taken)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    boot_id = boot.read_text().strip() if boot.is_file() else ""
    return f"{socket.gethostname()}/{boot_id}"


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), which
    tells a reused pid from the original; None when unknown or the process is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if not fields or fields[0] in ("Z", "X"):  # a zombie has finished
        return None
    return fields[19] if len(fields) > 19 else None


def new_run_id() -> str:
    """A fresh id for one sweep run of this process; :func:`owner_token` records it."""
    return uuid.uuid4().hex


def owner_token(run_id: str) -> dict[str, Any]:
    """Who runs a trial: machine, process (pid and start time) and the sweep run in it."""
    pid = os.getpid()
    return {"machine": machine_id(), "pid": pid, "start": process_start(pid), "run": run_id}


def mark_live(run_id: str, live: bool) -> None:
    """Record that the sweep run ``run_id`` of this process started (True) or ended."""
    if live:
        _LIVE_RUNS.add(run_id)
    else:
        _LIVE_RUNS.discard(run_id)


def owner_is_dead(owner: dict[str, Any] | None) -> bool:
    """Whether a trial's owner is known to be gone: it ran on this machine and its process has
    exited (or its pid now belongs to another process), or it ran in this process and its sweep
    has ended. An owner on another machine is never known dead here (its heartbeat tells)."""
    if not isinstance(owner, dict) or owner.get("machine") != machine_id():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return owner.get("run") not in _LIVE_RUNS
    if Path("/proc").is_dir():
        start = process_start(pid)
        return start is None or (owner.get("start") is not None and start != owner["start"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False
