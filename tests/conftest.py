"""Fixtures shared by the training tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Newton-Schulz runs in float32 on CPU in every test, whatever this machine's bf16 speed
# (llmvalley.optim.transforms.orthogonalize.cpu_has_native_bf16); subprocesses inherit it
os.environ["LLMVALLEY_CPU_BF16"] = "0"


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private token cache, and torch's thread count restored after the test."""
    monkeypatch.setenv("LLMVALLEY_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
