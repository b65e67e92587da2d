"""Fixtures shared by the training tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Newton-Schulz runs in float32 on CPU in every test, whatever this machine's bf16 speed
# (llmvalley.optim.transforms.orthogonalize.cpu_has_native_bf16); subprocesses inherit it
os.environ["LLMVALLEY_CPU_BF16"] = "0"

# Under pytest-xdist each worker is one process of two on CI's two cores: one torch thread
# each (subprocesses too), since OpenMP threads outnumbering the cores wait on each other
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private token cache, and torch's thread count restored after the test."""
    monkeypatch.setenv("LLMVALLEY_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box and jog".split()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small plain-text corpus (12 files of 60 lines) for seconds-long training runs."""
    from tests.helpers import write_corpus

    return write_corpus(tmp_path / "corpus", WORDS, seed=0, files=12, lines=60,
                        words_per_line=9)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The calls of ``llmvalley.optim.kernels``' CPU kernels during the test, by name (the
    real kernels run)."""
    from llmvalley.optim import kernels

    calls: list[str] = []
    real = kernels.load

    def load(name, defines=()):
        kernel = real(name, defines)
        if kernel is None:
            return None

        def counted(*args):
            calls.append(name)
            return kernel(*args)
        return counted

    monkeypatch.setattr(kernels, "load", load)
    return calls
