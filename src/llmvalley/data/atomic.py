"""Temporary names for files that are written whole and then renamed into place."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path


def private_tmp(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process or thread writes to.

    Concurrent first uses of a cache entry (two sweep workers starting together) each write
    their own file and rename it over ``path``; the last rename wins, with the same contents.
    """
    tag = f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"
    return path.parent / f"{path.name}.{tag}.tmp"
