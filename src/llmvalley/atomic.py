"""Files written whole and then renamed into place, under a temporary name no other writer uses."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``, private to this process and thread; rename it
    over ``path`` when the block succeeds and remove it when the block fails.

    A reader never sees a half-written file, and concurrent writers of the same file (two sweep
    workers building one cache entry, or sharing one results folder) each finish: the last
    rename wins.
    """
    tag = f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f"{path.name}.{tag}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
