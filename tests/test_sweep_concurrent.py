"""Sweeps shared by several processes: on one SQLite file, and on a real PostgreSQL server.

Each test starts real worker processes (this module run as a script: ``python -m
tests.test_sweep_concurrent WORKER_JSON``) whose trial function is the fake of
``tests/fake_runs.py`` slowed to a fraction of a second, and which append every run they start
to one shared file. Nothing may run twice, the budget is spent exactly, and every worker reports
the same best configuration as a sweep run alone.

PostgreSQL: the URL comes from ``LLMVALLEY_TEST_POSTGRES_URL`` (``.ci/run`` starts a throwaway
server and sets it); without it the test starts its own throwaway cluster when PostgreSQL's
``initdb`` and ``pg_ctl`` are installed, and is skipped, saying why, only when none can be started.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_runs import SyntheticTraining

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ENV = "LLMVALLEY_TEST_POSTGRES_URL"
# the grid's optimum lies inside the first round, so the extensions depend on complete rounds
SHAPE = {"best_lr": 3.5e-3, "floor": 2.0, "curvature": 0.05, "power": 2.0,
         "diverge_above": 100.0}
SWEEP = {"optimizer": "adamw", "workload": {"model": "nano", "steps": 100}, "lr_center": 4e-3,
         "grid_points": 4, "trials": 6, "seeds": 2, "poll_s": 0.2}
# alone, this sweep tries k = -2, -1, 0, 1 then 2 then -3 and keeps 4e-3 (k = 0)
EXPECTED_EXPONENTS = [-3, -2, -1, 0, 1, 2]


# ------------------------------------------------------------------------------ the workers
class SlowFake(SyntheticTraining):
    """The synthetic run, slowed down; every start is appended to ``calls`` (one JSON line).
    ``hang_at``: the call number (1-based) that never returns (a process to be killed)."""

    def __init__(self, calls: str, delay: float, hang_at: int | None = None) -> None:
        super().__init__(default=dict(SHAPE))
        self.calls_file, self.delay, self.hang_at, self.count = calls, delay, hang_at, 0

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        line = json.dumps({"name": config["name"], "optimizer": config["optimizer"],
                           "lr": config["lr"], "seed": config["seed"], "pid": os.getpid()})
        with open(self.calls_file, "a") as handle:  # one short O_APPEND write per line
            handle.write(line + "\n")
        if self.count == self.hang_at:
            time.sleep(600)
        time.sleep(self.delay)
        return super().__call__(config)


def worker(job: dict[str, Any]) -> None:
    """One worker process: waits for the ``go`` file, then runs a sweep or a comparison and
    prints its result as JSON."""
    from llmvalley.bench.sweep import Sweep, SweepSpec

    fake = SlowFake(job["calls"], job["delay"], job.get("hang_at"))
    if "compare" in job:
        from llmvalley.bench.compare import CompareSpec, Comparison

        comparison = Comparison(CompareSpec(**job["compare"]), fake)
        release(job)
        manifest = comparison.run()
        print(json.dumps({"errors": manifest["errors"]}))
        return
    sweep = Sweep(SweepSpec(**job["sweep"]), fake)  # opens (or creates) the storage
    release(job)
    result = sweep.run()
    print(json.dumps({"best": result["best"], "seeds": result["seeds"],
                      "trials_counted": result["trials_counted"]}))


def release(job: dict[str, Any]) -> None:
    """Say this worker is ready, and wait until all are."""
    Path(job["ready"]).touch()
    while not Path(job["go"]).exists():
        time.sleep(0.02)


def start_workers(tmp_path: Path, jobs: list[dict[str, Any]]) -> list[subprocess.Popen]:
    """Start one process per job; release them together once all have imported."""
    procs, readies = [], []
    go = tmp_path / f"go-{uuid.uuid4().hex[:6]}"
    for i, job in enumerate(jobs):
        ready = tmp_path / f"ready-{uuid.uuid4().hex[:6]}-{i}"
        readies.append(ready)
        job = {"go": str(go), "ready": str(ready), **job}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.test_sweep_concurrent", json.dumps(job)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}))
    deadline = time.time() + 60
    while not all(r.exists() for r in readies):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("workers did not start: "
                        + "; ".join(p.communicate()[1][-2000:] for p in procs))
        time.sleep(0.05)
    go.touch()
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[dict[str, Any]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def read_calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def check_shared_sweep(tmp_path: Path, storage: str | None, study: str,
                       folders: tuple[str, str] = ("shared", "shared")) -> None:
    """Two workers on one study: no point or seed twice, the budget exactly, one best."""
    from llmvalley.bench.sweep import Sweep, SweepSpec

    calls = tmp_path / "calls.jsonl"
    specs = [{**SWEEP, "out": str(tmp_path / folder), "storage": storage, "study_name": study}
             for folder in folders]
    results = finish(start_workers(tmp_path, [{"calls": str(calls), "delay": 0.4,
                                               "sweep": spec} for spec in specs]))

    runs = read_calls(calls)
    trials = [c for c in runs if c["name"].startswith("trial-")]
    seeds = [c for c in runs if c["name"].startswith("seed-")]
    assert len(trials) == SWEEP["trials"], runs  # the budget, not more
    lrs = sorted(round(c["lr"], 12) for c in trials)
    assert lrs == sorted(round(4e-3 * 2.0**k, 12) for k in EXPECTED_EXPONENTS), runs  # once
    assert sorted(c["seed"] for c in seeds) == [1, 2]  # each seed once
    assert len({c["pid"] for c in runs}) == 2, runs  # both workers took part
    # both report what a sweep alone finds: the same best trial and both seed runs
    for result in results:
        assert result["trials_counted"] == SWEEP["trials"]
        assert result["best"]["lr"] == pytest.approx(4e-3)
        assert result["best"]["number"] == results[0]["best"]["number"]
        assert [s["seed"] for s in result["seeds"]] == [1, 2]
    final = Sweep(SweepSpec(**specs[0]), SyntheticTraining()).write()
    assert sorted(t["k"] for t in final["trials"]) == EXPECTED_EXPONENTS
    assert final["interrupted"] == 0


# ------------------------------------------------------------------------------ SQLite
def test_two_processes_share_one_sqlite_sweep(tmp_path: Path) -> None:
    check_shared_sweep(tmp_path, None, "nano/adamw")


def test_two_processes_share_one_comparison(tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    compare = {"optimizers": ["adamw", "lion"], "models": ["nano"],
               "workload": {"steps": 50, "batch_size": 8}, "out": str(tmp_path / "results"),
               "trials": 4, "grid_points": 3, "seeds": 2,
               "lr_centers": {"adamw": 4e-3, "lion": 5e-4}, "command": "valley compare"}
    job = {"calls": str(calls), "delay": 0.3, "compare": compare}
    for result in finish(start_workers(tmp_path, [job, dict(job)])):
        assert result["errors"] == []
    runs = read_calls(calls)
    for optimizer in ("adamw", "lion"):
        mine = [c for c in runs if c["optimizer"] == optimizer]
        trials = [round(c["lr"], 12) for c in mine if c["name"].startswith("trial-")]
        assert len(trials) == 4 == len(set(trials))
        assert sorted(c["seed"] for c in mine if c["name"].startswith("seed-")) == [1, 2]
        sweep = json.loads((tmp_path / "results" / "nano" / optimizer / "sweep.json")
                           .read_text())
        assert sweep["trials_counted"] == 4 and len(sweep["seeds"]) == 2
    assert len({c["pid"] for c in runs}) == 2


def test_restart_fails_the_trial_of_its_own_dead_process_at_once(tmp_path: Path) -> None:
    """A worker killed in its second trial: a restarted sweep on this machine sees the owner's
    process is gone and runs the point again at once, without waiting the 90 s grace."""
    from llmvalley.bench.sweep import Sweep, SweepSpec

    calls = tmp_path / "calls.jsonl"
    spec = {**SWEEP, "out": str(tmp_path / "s"), "seeds": 0, "trials": 4}
    (proc,) = start_workers(tmp_path, [{"calls": str(calls), "delay": 0.0, "hang_at": 2,
                                        "sweep": spec}])
    deadline = time.time() + 30
    while len(read_calls(calls) if calls.exists() else []) < 2:
        assert time.time() < deadline and proc.poll() is None, "the worker never hung"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert spec["poll_s"] < 1 and SweepSpec(**spec).grace_s == 90
    started = time.time()
    result = Sweep(SweepSpec(**spec), SyntheticTraining(default=dict(SHAPE))).run()
    assert time.time() - started < 30  # not the heartbeat grace (90 s)
    assert result["trials_counted"] == 4 and result["interrupted"] == 1
    assert sorted(t["k"] for t in result["trials"]) == [-2, -1, 0, 1]


def test_a_live_owner_on_this_machine_is_waited_for() -> None:
    from llmvalley.bench.study_lock import owner_is_dead, owner_token

    alive = owner_token("some-run")  # this process, but no live sweep run of that id
    assert owner_is_dead(alive)
    parent = {**alive, "pid": os.getppid(), "start": None}
    assert not owner_is_dead(parent)  # another live process on this machine
    assert not owner_is_dead({**alive, "machine": "elsewhere/boot"})  # heartbeat decides


# ------------------------------------------------------------------------------ PostgreSQL
def postgres_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: PATH, or Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(tmp: Path) -> Iterator[str]:
    """A PostgreSQL cluster in ``tmp`` on a free localhost port, trust authentication; as
    root it runs as the ``postgres`` user (the server refuses root)."""
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found and {POSTGRES_ENV} "
                    "not set")
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            import pwd

            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' user: cannot start PostgreSQL")
        prefix = ["runuser", "-u", "postgres", "--"]
        os.chown(tmp, user.pw_uid, user.pw_gid)
        tmp.chmod(0o700)
    data, port = tmp / "data", free_port()
    log = tmp / "server.log"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)

    init = run(str(binaries / "initdb"), "-D", str(data), "-U", "valley", "--auth=trust",
               "--no-sync", "-E", "UTF8")
    if init.returncode != 0:
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    start = run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                "-o", f"-p {port} -k {tmp} -c listen_addresses=localhost -c fsync=off",
                "start")
    if start.returncode != 0:
        detail = log.read_text()[-300:] if log.exists() else start.stderr[-300:]
        pytest.skip(f"the PostgreSQL server did not start: {detail.strip()}")
    try:
        yield f"postgresql://valley@localhost:{port}/postgres"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    pytest.importorskip("psycopg2", reason="no PostgreSQL driver: pip install psycopg2-binary")
    url = os.environ.get(POSTGRES_ENV)
    if url:
        yield url
        return
    # not under pytest's tmp folder: the postgres user must be able to reach it
    folder = Path(tempfile.mkdtemp(prefix="valley-pg-"))
    try:
        with throwaway_postgres(folder) as started:
            yield started
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_one_study_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    # each worker has its own sweep folder, as on two machines: the database is all they share
    check_shared_sweep(tmp_path, postgres_url, f"nano/adamw-{uuid.uuid4().hex[:8]}",
                       folders=("machine-a", "machine-b"))


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
