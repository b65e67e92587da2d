"""The CPU allocator setting: freed memory is kept, so steps stop page-faulting."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import llmvalley
from llmvalley.optim import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

FAULTS = """
import resource, statistics, torch, llmvalley
torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(*shape)) for shape in SHAPES]
opt = llmvalley.create_optimizer("nadam", ps, **KW)
for p in ps:
    p.grad = torch.randn_like(p)
for _ in range(5):  # the heap grows to its peak
    opt.step()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the median step: now and then the heap still grows by a block, as a caching allocator's does
print(statistics.median(faults))
"""


def faults_per_step(shapes: tuple[tuple[int, ...], ...] = ((512, 512),) * 4,
                    kw: dict | None = None, **env: str) -> float:
    # glibc's static mmap threshold (128 KiB, as before its dynamic adjustment kicks in):
    # every 1 MiB temporary is mapped and unmapped, so the baseline faults deterministically
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", **env}
    code = f"SHAPES = {shapes!r}\nKW = {kw or {}!r}\n{FAULTS}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_steps_stop_page_faulting_on_their_temporaries():
    # NAdam's foreach chain allocates parameter-sized temporaries (1 MiB each here) every step
    released = faults_per_step(**{allocator.OPT_OUT: "0"})
    kept = faults_per_step()
    assert released > 1000, released  # every page of every temporary, every step
    assert kept < 50, kept


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_temporaries_above_glibcs_mmap_ceiling_are_kept_too():
    # a 36 MiB matrix: its temporaries are above the largest mmap threshold glibc accepts
    # (32 MiB), so only M_MMAP_MAX=0 keeps them out of fresh mappings (the foreach tier: the
    # default runs element-wise chains in blocks, whose temporaries are small)
    big, kw = ((9 << 10, 1 << 10),), {"implementation": "foreach"}
    released = faults_per_step(big, kw, **{allocator.OPT_OUT: "0"})
    kept = faults_per_step(big, kw)
    assert released > 9000, released  # 9216 pages per temporary
    assert kept < 50, kept


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_applied_once_and_reported(monkeypatch):
    monkeypatch.setattr(allocator, "_result", None)
    assert allocator.retain_freed_cpu_memory() is True
    monkeypatch.setattr(allocator, "_apply", lambda: pytest.fail("applied twice"))
    assert allocator.retain_freed_cpu_memory() is True


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_opt_out(monkeypatch, value):
    monkeypatch.setattr(allocator, "_result", None)
    monkeypatch.setenv(allocator.OPT_OUT, value)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: pytest.fail("mallopt called"))
    assert allocator.retain_freed_cpu_memory() is False


def test_the_first_cpu_step_applies_it(monkeypatch):
    import llmvalley.optim.shell as shell

    calls = []
    monkeypatch.setattr(shell, "retain_freed_cpu_memory", lambda: calls.append(1) or True)
    w = torch.nn.Parameter(torch.ones(3))
    opt = llmvalley.create_optimizer("sgd", [w], lr=0.1)
    opt.step()  # no gradient: nothing to step, nothing applied
    assert calls == []
    w.grad = torch.ones(3)
    opt.step()
    assert calls == [1]
