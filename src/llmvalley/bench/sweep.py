"""Tuning one optimizer on one workload under a fixed trial budget, on an Optuna study.

The learning rate is searched on a log grid ``center * factor**k`` (factor 2 by default). The
first round evaluates ``grid_points`` consecutive exponents around the center; every later trial
widens the grid by one point: beyond the edge when the best value sits there, otherwise on the
side whose edge loss is lower. A sweep therefore always spends exactly its budget, the same for
every optimizer, and a best value left at an edge is flagged (``best_at_edge``; a grid of one
point is at both edges): it is not a tuned value.

With ``tune`` (other named hyperparameters) the grid gives way to Optuna's TPE sampler over the
learning-rate range of the initial grid and the given ranges, with the same budget.

With ``search="coordinate"`` the sweep tunes the learning rate and the method's most sensitive
hyperparameters (beta2 or momentum, weight decay, warmup) by coordinate descent, with the same
budget (:mod:`llmvalley.bench.coordinate`, which also says which hyperparameters a method tunes).

Trials live in an Optuna storage (a SQLite file by default, or a PostgreSQL/MySQL URL, so
several machines can share one study). Several sweeps may run one study at once: each trial and
seed run is claimed under a storage-wide lock (:mod:`llmvalley.bench.study_lock`) from a fresh
read of the study, so none runs twice and the budget is never overrun, and each sweep waits for
the trials running elsewhere before it picks the best. A restarted sweep continues: finished
trials are kept; trials left running by a dead process are marked failed and re-run (at once
when the owner ran on this machine, else once their heartbeat is older than the grace period),
and they do not count against the budget. Diverged trials are finished trials: they are
recorded with their learning rate and count.

Once the budget is spent, the best configuration is re-run with fresh seeds (``seeds``), each
recorded in a companion study (``STUDY#seeds``), so every worker lists all of them and a
restarted sweep re-runs only the seeds without a result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmvalley.bench.records import SUMMARY_FILE, json_safe, write_json
from llmvalley.cli import UsageError

#: A trial function: a full ``valley train`` config dict in, the run's summary dict out.
TrialFn = Callable[[dict[str, Any]], dict[str, Any]]

SWEEP_FILE = "sweep.json"
SEARCH_MODES = ("grid", "tpe", "coordinate")
SEEDS_FOR = "configuration.json"  # in seeds/: the configuration the seed runs belong to
LR_PARAM = "lr"
#: ``checkpoint_every`` of a run that writes its checkpoint only at the end (seed runs kept for
#: ``valley eval``)
FINAL_CHECKPOINT_ONLY = 10**9
# The learning-rate distribution every trial declares; grid values are fixed by enqueueing them.
LR_LOW, LR_HIGH = 1e-7, 10.0
# Summary fields kept with each trial (the rest stays in the run folder's summary.json).
KEPT_SUMMARY = (
    "status", "final_val_loss", "final_val_bpb", "best_val_loss", "tokens", "steps",
    "wall_clock_s", "train_time_s", "tokens_per_s", "optimizer_share", "optimizer_compile_s",
    "peak_memory_bytes",
    "state_bytes", "state_bytes_per_param", "n_params", "loss_spikes", "max_grad_norm",
    "diverged", "diverged_step", "diverged_reason",
    "shifted_corpus", "final_shifted_val_loss", "final_shifted_val_bpb",
)


def run_training(config: dict[str, Any]) -> dict[str, Any]:
    """The real trial function: :func:`llmvalley.bench.train` (picklable for worker processes)."""
    from llmvalley.bench import train

    return train(config)


@dataclass(frozen=True)
class TuneSpec:
    """One extra hyperparameter searched by TPE: a float range (``log`` scale optional) or a
    list of choices. ``name`` is ``weight_decay`` or any scalar optimizer argument."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> TuneSpec:
        """``name=low:high``, ``name=low:high:log`` or ``name=a,b,c``."""
        from llmvalley.bench.config import parse_value

        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or name == LR_PARAM:
            raise UsageError(f"--tune: expected name=low:high[:log] or name=a,b,c (not lr), "
                             f"got {text!r}")
        if "," in value:
            return cls(name, choices=tuple(parse_value(v.strip()) for v in value.split(",")))
        parts = value.split(":")
        try:
            low, high = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise UsageError(f"--tune {name}: expected low:high[:log], got {value!r}") from None
        log = len(parts) > 2 and parts[2] == "log"
        if not low < high or (log and low <= 0) or len(parts) > 3:
            raise UsageError(f"--tune {name}: need low < high (and low > 0 with log), "
                             f"got {value!r}")
        return cls(name, low, high, log)

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclass
class SweepSpec:
    """What to tune and how: the optimizer, the shared workload and the search budget."""

    optimizer: str
    workload: dict[str, Any]  # TrainConfig fields shared by every trial (model, data, steps...)
    out: str | Path  # the sweep folder: run folders and sweep.json go here
    lr_center: float | None = None  # default: the optimizer's registry default learning rate
    factor: float = 2.0
    grid_points: int = 4
    trials: int = 5
    tune: tuple[TuneSpec, ...] = ()
    seeds: int = 3
    seed: int = 0  # seed of the tuning trials; seed runs use seed + 1 ... seed + seeds
    # settings the caller adds to every run (TrainConfig fields; valley compare: the AdamW
    # baseline's settings, a matrix method's fallback); the workload's own values win, and the
    # dict fields (opt_args, fallback_args) merge key by key (see merged_config)
    fixed: dict[str, Any] = field(default_factory=dict)
    storage: str | None = None  # default: sqlite file optuna.db in ``out``
    study_name: str | None = None
    heartbeat_s: int = 30
    grace_s: int = 90
    poll_s: float = 5.0  # how often to look again while trials run elsewhere
    # seed runs write a final checkpoint (for valley eval); tuning trials never do
    keep_checkpoints: bool = False
    search: str | None = None  # grid, tpe or coordinate; default: tpe when ``tune`` is given
    # coordinate search: the tuned axes besides lr (default: coordinate.coordinate_axes)
    axes: tuple[Any, ...] | None = None
    # zero tuning budget: one trial at the method's default learning rate (parameter-free
    # methods, compared as their users run them); its best is never "at an edge"
    untuned: bool = False

    def __post_init__(self) -> None:
        if self.factor <= 1:
            raise UsageError(f"--factor: expected a number above 1, got {self.factor}")
        if self.grid_points < 1:
            raise UsageError(f"--grid-points: expected 1 or more, got {self.grid_points}")
        if self.trials < self.grid_points:
            raise UsageError(f"--trials ({self.trials}) must be at least --grid-points "
                             f"({self.grid_points})")
        if self.seeds < 0:
            raise UsageError(f"--seeds: expected 0 or more, got {self.seeds}")
        if self.lr_center is not None and not self.lr_center > 0:
            raise UsageError(f"--lr-center: expected a positive number, got {self.lr_center}")
        if self.search is None:
            self.search = "tpe" if self.tune else "grid"
        if self.search not in SEARCH_MODES or (self.tune and self.search != "tpe"):
            raise UsageError(f"--search: expected grid or coordinate (without --tune) or tpe, "
                             f"got {self.search!r}" + (" with --tune" if self.tune else ""))
        self.out = Path(self.out)
        if self.search == "coordinate" and self.axes is None:
            from llmvalley.bench.coordinate import coordinate_axes

            self.axes = coordinate_axes(self.optimizer, self.workload, self.fixed)

    def center(self) -> float:
        """The grid's center learning rate."""
        if self.lr_center is not None:
            return self.lr_center
        return default_lr(self.optimizer)

    def lr_at(self, k: int) -> float:
        return self.center() * self.factor**k

    def initial_exponents(self) -> list[int]:
        """Exponents of the first round, e.g. -2, -1, 0, 1 for four points."""
        start = -(self.grid_points // 2)
        return list(range(start, start + self.grid_points))


#: TrainConfig fields holding key=value dicts: merged key by key rather than replaced
DICT_FIELDS = ("opt_args", "fallback_args")
#: searched parameters that are TrainConfig fields (the others are optimizer arguments)
CONFIG_PARAMS = (LR_PARAM, "weight_decay", "warmup_steps")


def merged_config(workload: dict[str, Any], fixed: dict[str, Any],
                  params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TrainConfig fields of a run: ``fixed`` (the caller's settings), then the
    ``workload`` (the user's: its values win; a value of None leaves ``fixed``'s), then the
    trial's searched ``params`` (``lr``, ``weight_decay``, ``warmup_steps``; others go to
    ``opt_args``).

    ``opt_args`` and ``fallback_args`` merge key by key, so a user's ``--fallback-arg`` or
    ``--opt-arg`` is never overwritten by the caller's settings (only by a searched value).
    """
    config = {k: dict(v) if k in DICT_FIELDS and v else v for k, v in fixed.items()}
    for key, value in workload.items():
        if key in DICT_FIELDS:
            config[key] = {**(fixed.get(key) or {}), **(value or {})}
        elif value is not None or key not in fixed:
            config[key] = value
    opt_args = dict(config.get("opt_args") or {})
    for key, value in (params or {}).items():
        if key in CONFIG_PARAMS:
            config[key] = value
        elif isinstance(value, list):  # a tuple (betas) read back from JSON
            opt_args[key] = tuple(value)
        else:
            opt_args[key] = value
    config["opt_args"] = opt_args
    return config


def at_edge(k: float | None, ks: list[float]) -> bool:
    """Whether grid exponent ``k`` is the lowest or the highest of ``ks`` (a single point is
    at both edges: nothing brackets it)."""
    return k is not None and bool(ks) and k in (min(ks), max(ks))


def default_lr(optimizer: str) -> float:
    """The registry's default learning rate of ``optimizer`` (1e-3 for torch-adamw)."""
    import llmvalley

    if optimizer == "torch-adamw":
        return 1e-3
    try:
        return float(llmvalley.get_spec(optimizer).defaults["lr"])
    except (KeyError, ValueError) as exc:
        raise UsageError(f"unknown optimizer {optimizer!r}; see valley list ({exc})") from None


def storage_url(spec: SweepSpec) -> str:
    """A database URL: the given one, a path made into ``sqlite:///``, or ``out/optuna.db``."""
    target = spec.storage or str(Path(spec.out) / "optuna.db")
    if "://" in target:
        return with_installed_driver(target)
    path = Path(target).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


#: PostgreSQL drivers SQLAlchemy knows, by module: the one in a plain ``postgresql://`` URL
#: depends on the SQLAlchemy version (psycopg2 before 2.1, psycopg 3 since)
POSTGRES_DRIVERS = {"psycopg": "postgresql+psycopg", "psycopg2": "postgresql+psycopg2"}


def with_installed_driver(url: str) -> str:
    """A plain ``postgresql://`` URL names the PostgreSQL driver that is installed (psycopg 3
    or psycopg2), so that either works whatever SQLAlchemy's default; other URLs as given."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    for module, prefix in POSTGRES_DRIVERS.items():
        if importlib.util.find_spec(module) is not None:
            return f"{prefix}{sep}{rest}"
    return f"postgresql{sep}{rest}"


_OPEN_LOCK = threading.Lock()  # sweeps in threads of one process must not create tables at once
#: suffix of the companion study that records a sweep's seed runs
SEEDS_STUDY_SUFFIX = "#seeds"


def open_study(spec: SweepSpec, storage: Any | None = None,
               suffix: str = "") -> Any:
    """Create or load the sweep's Optuna study (heartbeats on, so stale trials are detected);
    ``suffix`` names a companion study (the seed runs') on the same storage."""
    storage = storage or open_storage(spec)
    with _OPEN_LOCK:
        return _open_study(spec, storage, suffix)


def open_storage(spec: SweepSpec) -> Any:
    """The sweep's Optuna RDB storage, with heartbeats."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(logging.WARNING)
    # heartbeats and fail_stale_trials are flagged experimental; ask/tell use is deliberate
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
    url = storage_url(spec)
    # SQLite: wait for the lock instead of failing when several sweeps write at once
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    try:
        for attempt in range(3):
            try:
                with _OPEN_LOCK:
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                      heartbeat_interval=spec.heartbeat_s,
                                                      grace_period=spec.grace_s)
            except (optuna.exceptions.StorageInternalError, SQLAlchemyError):
                # two processes creating the tables of a new database at once: the loser's
                # CREATE fails; the tables exist on the next try
                if attempt == 2:
                    raise
                time.sleep(0.5 + attempt)
        raise AssertionError("unreachable")
    except ImportError as exc:  # e.g. postgresql:// without a driver
        missing = getattr(exc.__cause__, "name", None) or getattr(exc, "name", None)
        raise UsageError(f"--storage {url.split('://')[0]}://...: the database driver "
                         f"{missing or ''} is not installed (PostgreSQL: pip install "
                         "psycopg2-binary)") from None
    except Exception as exc:  # sqlalchemy/optuna errors: a bad URL, server unreachable
        if isinstance(exc, UsageError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--storage: cannot open {safe_url(url)}: {first}") from None


def safe_url(url: str) -> str:
    """A database URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
    return url


def study_name(spec: SweepSpec) -> str:
    """The study's name: ``--study``, or ``MODEL/OPTIMIZER``."""
    return spec.study_name or f"{spec.workload.get('model', 'model')}/{spec.optimizer}"


def _open_study(spec: SweepSpec, storage: Any, suffix: str) -> Any:
    import optuna

    sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.grid_points)
    return optuna.create_study(study_name=study_name(spec) + suffix, storage=storage,
                               sampler=sampler, direction="minimize", load_if_exists=True)


@dataclass
class TrialRecord:
    """One finished or running trial as the sweep sees it."""

    number: int
    state: str  # optuna state: RUNNING, COMPLETE, FAIL, WAITING
    status: str | None  # completed, diverged, error; None for running/interrupted
    lr: float | None
    k: float | None  # learning-rate exponent (grid and coordinate modes)
    params: dict[str, Any]
    summary: dict[str, Any]
    point: dict[str, float] | None = None  # coordinate mode: lr exponent and axis values

    @property
    def counts(self) -> bool:
        """Whether the trial counts against the budget (finished with a result or an error)."""
        return self.status in ("completed", "diverged", "error")

    @property
    def loss(self) -> float:
        value = self.summary.get("final_val_loss")
        return value if self.status == "completed" and value is not None else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {**{k: self.summary.get(k) for k in KEPT_SUMMARY}, "number": self.number,
                "status": self.status, "lr": self.lr, "k": self.k, "params": self.params,
                "run_dir": self.summary.get("run_dir"), "error": self.summary.get("error"),
                **({"point": self.point} if self.point is not None else {})}


def trial_records(study: Any) -> list[TrialRecord]:
    """Every trial of the study as a :class:`TrialRecord`, in creation order."""
    records = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        lr = t.params.get(LR_PARAM, attrs.get("lr"))
        records.append(TrialRecord(
            number=t.number, state=t.state.name, status=attrs.get("status"),
            lr=lr, k=attrs.get("grid_k"),
            params=dict(attrs["params"]) if "params" in attrs else dict(t.params),
            summary=attrs.get("summary", {}), point=attrs.get("point")))
    return records


def next_exponent(spec: SweepSpec, records: list[TrialRecord]) -> int | None:
    """The grid exponent to try next, or None when nothing can start now.

    Initial points first (in order); once every grid point has finished, one more point:
    beyond the best value's edge, or, with an interior best, beyond the edge whose loss is
    lower (ties: the upper edge). While a round is still running nothing new is planned, so
    the extension is decided on complete information.
    """
    taken = {r.k for r in records if r.k is not None and (r.counts or r.state == "RUNNING")}
    for k in spec.initial_exponents():
        if k not in taken:
            return k
    if any(r.state == "RUNNING" for r in records):
        return None
    done = {r.k: r.loss for r in records if r.k is not None and r.counts}
    low, high = min(done), max(done)
    best = min(done, key=lambda k: (done[k], k))
    if best == low and best != high:
        return low - 1
    if best == high and best != low:
        return high + 1
    if math.isinf(done[best]):  # everything diverged: widen downwards, where lr is safer
        return low - 1
    return high + 1 if done[high] <= done[low] else low - 1


class _Heartbeat:
    """Records heartbeats of the sweep's running trials so a killed sweep's trials go stale."""

    def __init__(self, storage: Any, interval_s: float) -> None:
        self.storage = storage
        self.interval_s = interval_s
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def add(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                self.storage.record_heartbeat(trial_id)

    def stop(self) -> None:
        self._stop.set()


class Sweep:
    """Runs a :class:`SweepSpec`: tuning trials, then the seed runs; writes ``sweep.json``.

    Several sweeps of one study (processes on one machine, or machines sharing a database) can
    run at once: each trial and each seed run is claimed under a storage-wide lock
    (:mod:`llmvalley.bench.study_lock`), so none runs twice and the budget is never overrun;
    every sweep waits for the trials running elsewhere before it chooses the best, so they all
    choose the same one.
    """

    def __init__(self, spec: SweepSpec, trial_fn: TrialFn = run_training) -> None:
        from llmvalley.bench.study_lock import StorageLock, new_run_id

        self.spec = spec
        self.trial_fn = trial_fn
        Path(spec.out).mkdir(parents=True, exist_ok=True)
        self.storage = open_storage(spec)
        self.study = open_study(spec, self.storage)
        self.seed_study = open_study(spec, self.storage, SEEDS_STUDY_SUFFIX)
        self.lock = StorageLock(self.storage, storage_url(spec))
        self.run_id = new_run_id()  # this sweep's runs in this process (trial owners)
        self.log: Callable[[str], None] = lambda message: None
        # queue order when sharing a PriorityPool with other sweeps (lower runs first)
        self.trial_priority, self.seed_priority = 1, 2

    # ------------------------------------------------------------------ configs
    def trial_config(self, params: dict[str, Any], *, seed: int, out: Path,
                     name: str, keep_checkpoint: bool = False) -> dict[str, Any]:
        """The full train config of one run: :func:`merged_config` of the workload, the
        fixed settings and ``params``, with the run's seed, folder and name."""
        config = merged_config(self.spec.workload, self.spec.fixed, params)
        # a sweep resumes by trial: its runs write no checkpoints (and take signals as before),
        # except a final one where asked (seed runs, for valley eval)
        config.update(optimizer=self.spec.optimizer, seed=seed, out=str(out), name=name,
                      quiet=True, progress=False,
                      checkpoint_every=FINAL_CHECKPOINT_ONLY if keep_checkpoint else 0)
        return config

    # ------------------------------------------------------------------ claims
    @contextlib.contextmanager
    def _live(self) -> Iterator[None]:
        """While this sweep runs here, the trials it owns are not taken for abandoned."""
        from llmvalley.bench.study_lock import mark_live

        mark_live(self.run_id, True)
        try:
            yield
        finally:
            mark_live(self.run_id, False)

    def _release_abandoned(self, study: Any) -> None:
        """Fail the trials nobody runs any more (call under the lock): a stale heartbeat
        (Optuna's rule, wherever the trial ran), an owner on this machine whose process or sweep
        has ended (at once), and trials still waiting (a process killed while claiming)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        from llmvalley.bench.study_lock import OWNER_ATTR, owner_is_dead

        fail_stale_trials(study)
        for t in study.get_trials(deepcopy=False,
                                  states=(TrialState.RUNNING, TrialState.WAITING)):
            if t.state == TrialState.WAITING or owner_is_dead(t.user_attrs.get(OWNER_ATTR)):
                with contextlib.suppress(UpdateFinishedTrialError):
                    self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)

    def _create_trial(self, study: Any, attrs: dict[str, Any],
                      fixed: dict[str, tuple[float, Any]] | None = None) -> Any:
        """A new running trial of ``study`` owned by this sweep, with ``attrs`` and ``fixed``
        parameters (name: (value, distribution)) from the moment it exists (call under the
        lock). It is created waiting, gets its first heartbeat, then Optuna's ask starts it:
        a process killed at any point leaves a trial that the next claim fails."""
        from optuna.trial import TrialState, create_trial

        from llmvalley.bench.study_lock import OWNER_ATTR, owner_token

        fixed = fixed or {}
        template = create_trial(
            state=TrialState.WAITING,
            user_attrs={**attrs, OWNER_ATTR: owner_token(self.run_id)},
            system_attrs={"fixed_params": {k: v for k, (v, _) in fixed.items()}} if fixed
            else {})
        trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
        self.storage.record_heartbeat(trial_id)
        trial = study.ask({k: dist for k, (_, dist) in fixed.items()})
        if trial._trial_id != trial_id:  # another waiting trial: not under the lock?
            raise RuntimeError(f"study {study.study_name}: trial {trial.number} was waiting "
                               "while the sweep lock was held")
        return trial

    def _claim_trial(self) -> tuple[tuple[Any, dict[str, Any]] | None, bool]:
        """Under the lock: fail abandoned trials, then start the next trial if the budget and
        the search allow one. Returns (the trial and its parameters, or None; whether trials
        are still running, here or elsewhere)."""
        with self.lock.hold():
            self._release_abandoned(self.study)
            records = self.records()
            return self._ask(records), any(r.state == "RUNNING" for r in records)

    # ------------------------------------------------------------------ trials
    def records(self) -> list[TrialRecord]:
        return trial_records(self.study)

    def budget_left(self, records: list[TrialRecord]) -> int:
        """Trials that may still start: the budget less counted and running trials."""
        used = sum(1 for r in records if r.counts or r.state == "RUNNING")
        return self.spec.trials - used

    def _ask(self, records: list[TrialRecord]) -> tuple[Any, dict[str, Any]] | None:
        """Start the next trial and return it with its parameters, or None (under the lock)."""
        import optuna

        if self.budget_left(records) <= 0:
            return None
        lr_dist = optuna.distributions.FloatDistribution(LR_LOW, LR_HIGH, log=True)
        if self.spec.search == "tpe":
            # seeded by the number of trials so far: reproducible alone, and two workers
            # asking one after the other do not draw the same start-up point
            self.study.sampler = optuna.samplers.TPESampler(
                seed=self.spec.seed + len(records), n_startup_trials=self.spec.grid_points)
            trial = self._create_trial(self.study, {})
            lo = self.spec.lr_at(self.spec.initial_exponents()[0])
            hi = self.spec.lr_at(self.spec.initial_exponents()[-1])
            params = {LR_PARAM: trial.suggest_float(LR_PARAM, lo, hi, log=True)}
            params.update({t.name: t.suggest(trial) for t in self.spec.tune})
            return trial, params
        if self.spec.search == "coordinate":
            return self._ask_coordinate(records, lr_dist)
        k = next_exponent(self.spec, records)
        if k is None:
            return None
        lr = self.spec.lr_at(k)
        trial = self._create_trial(self.study, {"grid_k": k}, {LR_PARAM: (lr, lr_dist)})
        return trial, {LR_PARAM: trial.params[LR_PARAM]}

    def _ask_coordinate(self, records: list[TrialRecord], lr_dist: Any
                        ) -> tuple[Any, dict[str, Any]] | None:
        """The next coordinate-descent point (:func:`coordinate.next_point`) as a fixed trial."""
        from llmvalley.bench.coordinate import next_point, point_key

        finished = {point_key(r.point): r.loss for r in records if r.counts and r.point}
        running = {point_key(r.point) for r in records if r.state == "RUNNING" and r.point}
        plan = next_point(self.spec.axes, self.spec.initial_exponents(), finished, running)
        if not plan.points:
            return None
        point = plan.points[0]
        params = self.coordinate_params(point)
        trial = self._create_trial(
            self.study, {"grid_k": point[LR_PARAM], "point": point, "params": json_safe(params)},
            {LR_PARAM: (params[LR_PARAM], lr_dist)})
        return trial, params

    def coordinate_params(self, point: dict[str, float]) -> dict[str, Any]:
        """The trial parameters of a coordinate-descent point."""
        from llmvalley.bench.coordinate import point_params, start_settings

        settings = start_settings(self.spec.optimizer, self.spec.workload, self.spec.fixed)
        return point_params(point, self.spec.axes, self.spec.center(), self.spec.factor,
                            settings)

    def _finish(self, trial: Any, summary: dict[str, Any] | None, error: str | None) -> None:
        """Optuna tell: completed and diverged trials COMPLETE (diverged as +inf), errors FAIL."""
        import optuna

        what = f"{self.spec.optimizer}: trial {trial.number}"
        with self._unless_failed_elsewhere(self.study, trial, what):
            if error is not None:
                trial.set_user_attr("status", "error")
                trial.set_user_attr("summary", {"error": error})
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                self.log(f"{what} failed: {error}")
                return
            assert summary is not None
            status = "diverged" if summary.get("status") == "diverged" else "completed"
            kept = {k: summary.get(k) for k in KEPT_SUMMARY}
            kept["run_dir"] = relative_path(summary.get("run_dir"), self.spec.out)
            trial.set_user_attr("status", status)
            trial.set_user_attr("summary", json_safe(kept))
            value = summary.get("final_val_loss") if status == "completed" else None
            self.study.tell(trial, math.inf if value is None else float(value))
            self.log(f"{what} "
                     + (f"final val loss {value:.4f}" if value is not None else
                        f"diverged at step {summary.get('diverged_step')}"
                        if status == "diverged" else "finished without a validation loss"))

    @contextlib.contextmanager
    def _unless_failed_elsewhere(self, study: Any, trial: Any, what: str) -> Iterator[None]:
        """Recording a result of a trial that another worker failed meanwhile (its heartbeat
        came too late, e.g. a suspended process) drops the result with a message: the point has
        been, or will be, run again."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            yield
        except (UpdateFinishedTrialError, ValueError):
            if self.storage.get_trial(trial._trial_id).state != TrialState.FAIL:
                raise
            self.log(f"{what} was taken for abandoned by another worker (its heartbeat was "
                     "late); its result is not recorded")

    def run_trials(self, executor: Executor | None = None, parallel: int = 1) -> None:
        """Spend the trial budget; ``executor`` runs trials in worker processes (else inline).
        Returns once no trial of the study is running anywhere and none can start."""
        heartbeat = _Heartbeat(self.storage, self.spec.heartbeat_s)
        running: dict[Future, Any] = {}
        trials_dir = Path(self.spec.out) / "trials"
        try:
            with self._live():
                while True:
                    elsewhere = False
                    while len(running) < (parallel if executor else 1):
                        started, elsewhere = self._claim_trial()
                        if started is None:
                            break
                        trial, params = started
                        heartbeat.add(trial._trial_id)
                        lr = params[LR_PARAM]
                        trial.set_user_attr("lr", lr)
                        config = self.trial_config(params, seed=self.spec.seed, out=trials_dir,
                                                   name=f"trial-{trial.number:03d}-lr{lr:.3g}")
                        self.log(f"{self.spec.optimizer}: trial {trial.number} lr={lr:.3g} "
                                 f"{ {k: v for k, v in params.items() if k != LR_PARAM} or ''}")
                        if executor is None:
                            summary, error = _call(self.trial_fn, config)
                            self._finish(trial, summary, error)
                            heartbeat.remove(trial._trial_id)
                            continue
                        running[self._submit(executor, config, seeds=False)] = trial
                    if not running:
                        if not elsewhere:
                            break
                        # trials running elsewhere (another worker, or a dead one whose
                        # heartbeat has not gone stale yet): wait for them to finish or go stale
                        time.sleep(self.spec.poll_s)
                        continue
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        trial = running.pop(future)
                        try:
                            summary, error = future.result()
                        except Exception as exc:  # the worker process died (e.g. OOM kill)
                            summary, error = None, f"worker failed: {type(exc).__name__}: {exc}"
                        self._finish(trial, summary, error)
                        heartbeat.remove(trial._trial_id)
        finally:
            heartbeat.stop()
        self.write()

    # ------------------------------------------------------------------ best and seeds
    def best(self) -> TrialRecord | None:
        """The completed trial with the lowest final validation loss (None if none completed)."""
        completed = [r for r in self.records() if r.status == "completed"]
        return min(completed, key=lambda r: r.loss) if completed else None

    def seed_values(self) -> list[int]:
        return [self.spec.seed + i for i in range(1, self.spec.seeds + 1)]

    def _seed_key(self, best: TrialRecord) -> tuple[dict[str, Any], str]:
        """The configuration the seed runs belong to, and its key in the seed study."""
        chosen = json_safe({"params": best.params, "fixed": self.spec.fixed})
        return chosen, json.dumps(chosen, sort_keys=True)

    def seed_trials(self, key: str) -> dict[int, Any]:
        """The seed study's trials of configuration ``key`` that count (finished with a result
        or an error, or running), by seed; an interrupted one gives way to a later one."""
        from optuna.trial import TrialState

        result: dict[int, Any] = {}
        for t in self.seed_study.get_trials(deepcopy=False):
            if t.user_attrs.get("config") != key:
                continue
            if t.state == TrialState.FAIL and not t.user_attrs.get("status"):
                continue  # interrupted
            result.setdefault(t.user_attrs["seed"], t)
        return result

    def _claim_seed(self, best: TrialRecord) -> tuple[tuple[Any, int] | None, bool]:
        """Under the lock: the next seed run nobody has done or is doing, claimed as a trial
        of the seed study; and whether seed runs are still running anywhere."""
        from optuna.trial import TrialState

        chosen, key = self._seed_key(best)
        seeds_dir = Path(self.spec.out) / "seeds"
        with self.lock.hold():
            self._release_abandoned(self.seed_study)
            marker = seeds_dir / SEEDS_FOR
            if marker.is_file() and json.loads(marker.read_text()) != chosen:
                # the best configuration changed (a resumed sweep with a larger budget)
                self.log(f"{self.spec.optimizer}: best configuration changed, seed runs redone")
                shutil.rmtree(seeds_dir)
            seeds_dir.mkdir(parents=True, exist_ok=True)
            write_json(marker, chosen)
            taken = self.seed_trials(key)
            running = any(t.state == TrialState.RUNNING for t in taken.values())
            for seed in self.seed_values():
                if seed in taken or self._adopt_seed(seed, key):
                    continue
                run_dir = seeds_dir / f"seed-{seed}"
                if run_dir.exists():  # a seed run cut short by a kill: start it again
                    shutil.rmtree(run_dir)
                return (self._create_trial(self.seed_study, {"seed": seed, "config": key}),
                        seed), running
            return None, running

    def _adopt_seed(self, seed: int, key: str) -> bool:
        """Record a seed run finished before seed runs were claimed (its ``summary.json`` is
        in the folder of the current configuration) in the seed study; whether there was one."""
        from optuna.trial import TrialState, create_trial

        path = Path(self.spec.out) / "seeds" / f"seed-{seed}" / SUMMARY_FILE
        if not path.is_file():
            return False
        summary = json.loads(path.read_text())
        value = summary.get("final_val_loss")
        self.seed_study.add_trial(create_trial(
            state=TrialState.COMPLETE, value=math.inf if value is None else float(value),
            user_attrs={"seed": seed, "config": key, "status": summary.get("status"),
                        "summary": self._kept(summary, seed)}))
        return True

    def _kept(self, summary: dict[str, Any], seed: int) -> dict[str, Any]:
        kept = {k: summary.get(k) for k in KEPT_SUMMARY}
        kept.update(seed=seed, run_dir=relative_path(summary.get("run_dir"), self.spec.out))
        return json_safe(kept)

    def _finish_seed(self, trial: Any, seed: int, summary: dict[str, Any] | None,
                     error: str | None) -> None:
        import optuna

        what = f"{self.spec.optimizer}: seed {seed}"
        with self._unless_failed_elsewhere(self.seed_study, trial, what):
            if summary is None:
                trial.set_user_attr("status", "error")
                trial.set_user_attr("summary", {"seed": seed, "status": "error",
                                                "error": error})
                self.seed_study.tell(trial, state=optuna.trial.TrialState.FAIL)
                self.log(f"{what} failed: {error}")
                return
            trial.set_user_attr("status", summary.get("status"))
            trial.set_user_attr("summary", self._kept(summary, seed))
            loss = summary.get("final_val_loss")
            self.seed_study.tell(trial, math.inf if loss is None else float(loss))
            self.log(f"{what} " + (f"final val loss {loss:.4f}" if loss is not None
                                   else str(summary.get("status"))))

    def run_seeds(self, executor: Executor | None = None,
                  parallel: int = 1) -> list[dict[str, Any]]:
        """Re-run the best configuration with each seed; seeds done (here or by another worker)
        are not re-run. Returns once every seed has a result; the seed records, by seed."""
        best = self.best()
        if best is None:
            self.write()
            return []
        heartbeat = _Heartbeat(self.storage, self.spec.heartbeat_s)
        running: dict[Future, tuple[Any, int]] = {}
        seeds_dir = Path(self.spec.out) / "seeds"
        announced = False
        try:
            with self._live():
                while True:
                    elsewhere = False
                    while len(running) < (max(1, parallel) if executor else 1):
                        claimed, elsewhere = self._claim_seed(best)
                        if claimed is None:
                            break
                        trial, seed = claimed
                        heartbeat.add(trial._trial_id)
                        if not announced:
                            self.log(f"{self.spec.optimizer}: seed runs at lr={best.lr:.3g}")
                            announced = True
                        config = self.trial_config(best.params, seed=seed, out=seeds_dir,
                                                   name=f"seed-{seed}",
                                                   keep_checkpoint=self.spec.keep_checkpoints)
                        if executor is None:
                            self._finish_seed(trial, seed, *_call(self.trial_fn, config))
                            heartbeat.remove(trial._trial_id)
                            continue
                        running[self._submit(executor, config, seeds=True)] = (trial, seed)
                    if not running:
                        if not elsewhere:
                            break
                        time.sleep(self.spec.poll_s)  # seeds running elsewhere
                        continue
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        trial, seed = running.pop(future)
                        try:
                            summary, error = future.result()
                        except Exception as exc:  # the worker process itself died
                            summary, error = None, f"worker failed: {type(exc).__name__}: {exc}"
                        self._finish_seed(trial, seed, summary, error)
                        heartbeat.remove(trial._trial_id)
        finally:
            heartbeat.stop()
        self.write()
        trials = self.seed_trials(self._seed_key(best)[1])
        return [dict(trials[s].user_attrs.get("summary") or {}) for s in self.seed_values()
                if s in trials]

    def _submit(self, executor: Executor, config: dict[str, Any], *, seeds: bool) -> Future:
        """Queue one run; a :class:`~llmvalley.bench.pool.PriorityPool` gets its priority."""
        from llmvalley.bench.pool import PriorityPool

        if isinstance(executor, PriorityPool):
            priority = self.seed_priority if seeds else self.trial_priority
            return executor.submit(_call, self.trial_fn, config, priority=priority)
        return executor.submit(_call, self.trial_fn, config)

    def run(self, executor: Executor | None = None, parallel: int = 1) -> dict[str, Any]:
        """Trials, then seeds; returns the contents of ``sweep.json``."""
        self.run_trials(executor, parallel)
        self.run_seeds(executor, parallel)
        return self.write()

    # ------------------------------------------------------------------ output
    def seed_summaries(self) -> list[dict[str, Any]]:
        """The finished seed runs (completed or diverged) of the best configuration, by seed,
        as the seed study records them (so every worker of a shared study lists them all)."""
        from optuna.trial import TrialState

        best = self.best()
        if best is None:
            return []
        trials = self.seed_trials(self._seed_key(best)[1])
        return [dict(trials[s].user_attrs["summary"]) for s in self.seed_values()
                if s in trials and trials[s].state == TrialState.COMPLETE]

    def write(self) -> dict[str, Any]:
        """Write ``sweep.json`` (spec, every trial, best, seeds) and return its contents."""
        records = self.records()
        best = self.best()
        counted = [r for r in records if r.counts]
        if best is not None and best.point is not None:  # lr values at the best's settings
            others = {k: v for k, v in best.point.items() if k != LR_PARAM}
            counted_slice = [r for r in counted if r.point and all(
                r.point.get(k) == v for k, v in others.items())]
            ks = [r.k for r in counted_slice if r.k is not None]
        else:
            ks = [r.k for r in counted if r.k is not None]
        data = {
            "optimizer": self.spec.optimizer,
            "workload": self.spec.workload,
            "fixed": self.spec.fixed,
            "search": {
                "mode": self.spec.search,
                "lr_center": self.spec.center(), "factor": self.spec.factor,
                "grid_points": self.spec.grid_points, "trials": self.spec.trials,
                "tune": [vars(t) for t in self.spec.tune], "seed": self.spec.seed,
                "axes": [vars(a) for a in self.spec.axes or ()],
                "study": self.study.study_name,
            },
            "trials": [r.to_dict() for r in records if r.counts],
            "interrupted": sum(1 for r in records if r.state == "FAIL" and not r.counts),
            "trials_counted": len(counted),
            "best": best.to_dict() if best else None,
            "best_at_edge": bool(best and at_edge(best.k, ks)) and not self.spec.untuned,
            "untuned": self.spec.untuned,
            "seeds": self.seed_summaries(),
        }
        write_json(Path(self.spec.out) / SWEEP_FILE, data)
        return json_safe(data)


def _call(trial_fn: TrialFn, config: dict[str, Any]) -> tuple[dict | None, str | None]:
    """Run ``trial_fn``; return (summary, None) or (None, one-line error)."""
    try:
        return trial_fn(config), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a trial's failure is a result of the sweep, not its end
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def relative_path(path: str | None, root: str | Path) -> str | None:
    """``path`` relative to ``root`` when it lies inside it (result folders stay movable)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def load_sweep(folder: str | Path) -> dict[str, Any]:
    """Read a sweep folder's ``sweep.json``."""
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        raise UsageError(f"{folder}: no {SWEEP_FILE} (not a sweep folder)")
    return json.loads(path.read_text())
