"""A process pool that starts queued runs by priority rather than in submission order.

A comparison runs several sweeps at once on a few worker processes. Matrix methods wait for the
AdamW baseline's trials, so those should start first; seed runs can go last. Tasks wait in a
priority queue and ``workers`` dispatcher threads hand the most urgent one to a process pool
(a fresh spawned process per run, so each run's peak memory is its own).
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

#: Priorities (lower runs first).
BASELINE_TRIALS, TRIALS, SEEDS = 0, 1, 2


class PriorityPool(Executor):
    """``submit(fn, *args, priority=TRIALS)``: runs ``fn(*args)`` in a worker process."""

    def __init__(self, workers: int) -> None:
        self._pool = ProcessPoolExecutor(max_workers=workers,
                                         mp_context=multiprocessing.get_context("spawn"),
                                         max_tasks_per_child=1)
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO among equal priorities
        self._threads = [threading.Thread(target=self._dispatch, daemon=True)
                         for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, priority: int = TRIALS,
               **kwargs: Any) -> Future:
        future: Future = Future()
        self._queue.put((priority, next(self._order), future, fn, args, kwargs))
        return future

    def _dispatch(self) -> None:
        while True:
            _, _, future, fn, args, kwargs = self._queue.get()
            if fn is None:  # shutdown
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._pool.submit(fn, *args, **kwargs).result())
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item[2] is not None:
                    item[2].cancel()
        for _ in self._threads:
            self._queue.put((-1, next(self._order), None, None, (), {}))
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
