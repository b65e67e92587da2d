"""Every optimizer on FSDP2-sharded parameters (2 gloo processes on CPU).

The sharded run must equal the single-process run (float64, so one-ulp differences between
SIMD paths over shards of other lengths cannot grow into visible ones), the non-finite policy
must hold on every rank when one rank's shard is bad, and distributed checkpoints must resume
bit-exactly, also on another number of ranks. See ``llmvalley.optim.sharded``.
"""

from __future__ import annotations

import numpy
import pytest
import torch

from llmvalley.optim.registry import list_optimizers
from tests import sharded_workers as w
from tests.dist_helpers import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

#: methods documented as unable to run sharded, with the reason their error gives
UNSUPPORTED = {"adahessian": "Hessian-vector", "sophia_h": "Hessian-vector"}
STEPS = 20
#: Dion's P = M Q is rank-deficient on these layers (LayerNorm makes the gradients' rows sum
#: to zero), so its orthonormal completion follows rounding: one-ulp differences in the shard
#: products move it, and the method's eps keeps that small, not at the level of other methods
TOLERANCE = {"dion": 1e-8}


@pytest.fixture(scope="module")
def sharded_results() -> dict[str, str | float]:
    names = sorted(s.name for s in list_optimizers())
    return run_ranks(w.equivalence, 2, names, STEPS, init_group=True, timeout=600)[0]


@pytest.fixture(scope="module")
def ddp_results() -> dict[str, str | float]:
    names = sorted(s.name for s in list_optimizers())
    return run_ranks(w.equivalence, 2, names, 5, "ddp", init_group=True, timeout=600)[0]


@pytest.mark.parametrize("name", sorted(s.name for s in list_optimizers()))
def test_ddp_run_equals_one_process(name: str, ddp_results) -> None:
    """Under DDP every rank steps the whole (replicated) parameters with averaged gradients:
    every method, Hessian-vector ones included, equals one process."""
    got = ddp_results[name]
    assert not isinstance(got, str), got
    assert got <= TOLERANCE.get(name, 1e-10), f"{name}: DDP parameters differ by {got:.3g}"


def test_hsdp_two_dimensional_mesh_equals_one_process() -> None:
    """FSDP2 on a (replicate, shard) mesh: the owner plan and Dion use the shard dimension."""
    got = run_ranks(w.equivalence, 2, ["adamw", "muon", "dion", "adafactor"], 5, "hsdp",
                    init_group=True, timeout=300)[0]
    for name, diff in got.items():
        assert not isinstance(diff, str), (name, diff)
        assert diff <= TOLERANCE.get(name, 1e-10), (name, diff)


@pytest.mark.parametrize("name", sorted(s.name for s in list_optimizers()))
def test_sharded_run_equals_one_process(name: str, sharded_results) -> None:
    got = sharded_results[name]
    if name in UNSUPPORTED:
        assert isinstance(got, str) and UNSUPPORTED[name] in got, got
        return
    assert not isinstance(got, str), got
    limit = TOLERANCE.get(name, 1e-10)
    assert got <= limit, f"{name}: sharded parameters differ by {got:.3g} after {STEPS} steps"


@pytest.mark.parametrize("name", ["adamw", "muon"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_shard_raises_on_every_rank_and_changes_nothing(name: str, value: float) -> None:
    results = run_ranks(w.nonfinite, 2, name, "raise", value, init_group=True, timeout=120)
    for r in results:
        assert r["error"] is not None and "non-finite gradient in 1.weight" in r["error"], r
        assert r["unchanged"] and r["state_unchanged"], r


def test_bad_shard_skips_on_every_rank() -> None:
    results = run_ranks(w.nonfinite, 2, "muon", "skip", float("nan"), init_group=True,
                        timeout=120)
    for r in results:
        assert r["error"] is None and r["skipped"] == 1, r
        assert r["unchanged"] and r["state_unchanged"], r


RESUMABLE = sorted(s.name for s in list_optimizers() if s.name not in UNSUPPORTED)


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory) -> tuple[dict, dict]:
    folder = str(tmp_path_factory.mktemp("dcp"))
    whole = run_ranks(w.checkpoint_all, 2, RESUMABLE, folder, 3, 6, "save", init_group=True,
                      timeout=600)[0]
    resumed = run_ranks(w.checkpoint_all, 2, RESUMABLE, folder, 3, 6, "load",
                        init_group=True, timeout=600)[0]
    return whole, resumed


@pytest.mark.parametrize("name", RESUMABLE)
def test_distributed_checkpoint_resumes_bit_exactly(name: str, resumed_runs) -> None:
    whole, resumed = resumed_runs
    for a, b in zip(whole[name], resumed[name]):
        assert (a == b).all(), f"{name}: resumed run differs from the uninterrupted one"


@pytest.mark.parametrize("name", ["adamw", "muon", "dion"])
def test_checkpoints_reshard_between_one_and_two_processes(name: str, tmp_path) -> None:
    two = str(tmp_path / "two")
    whole = run_ranks(w.checkpoint_run, 2, name, two, 3, 6, "save", init_group=True,
                      timeout=120)[0]
    one = run_ranks(w.checkpoint_run, 1, name, two, 3, 6, "load", sharded=False,
                    timeout=120)[0]  # a 2-rank checkpoint into one plain process
    for a, b in zip(whole, one):
        numpy.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE.get(name, 1e-12))
    single = str(tmp_path / "one")
    run_ranks(w.checkpoint_run, 1, name, single, 3, 6, "save", sharded=False, timeout=120)
    spread = run_ranks(w.checkpoint_run, 2, name, single, 3, 6, "load", init_group=True,
                       timeout=120)[0]  # a one-process checkpoint into 2 ranks
    for a, b in zip(whole, spread):
        numpy.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE.get(name, 1e-12))
    plain = run_ranks(w.checkpoint_run, 2, name, single, 3, 6, "load_plain", init_group=True,
                      timeout=120)[0]  # a torch.save'd one-process state_dict into 2 ranks
    for a, b in zip(whole, plain):
        numpy.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE.get(name, 1e-12))


def test_state_bytes_local_and_global() -> None:
    reports = run_ranks(w.state_bytes_report, 2, "adamw", init_group=True, timeout=120)
    # adamw keeps two float64 moments per element: 8 * 2 * (60 + 30 + 5 + 5 + 5 + 35)
    assert sum(r["local"] for r in reports) == 16 * 140
    assert all(r["global"] == 16 * 140 for r in reports)
