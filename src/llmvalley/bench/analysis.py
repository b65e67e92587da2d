"""The comparison's metrics, computed from a results folder (see ``docs/benchmark.md``).

Everything here is a pure function of the numbers written by ``valley compare``: the sweeps'
``sweep.json`` files and the seed runs' ``log.jsonl``/``summary.json``. The definitions:

- **final validation loss**: mean, sample standard deviation and standard error over the seed
  runs of the best configuration (diverged seeds are counted apart, not averaged).
- **tokens-to-target**: the target is AdamW's mean final loss at the same scale; on an
  optimizer's seed-mean validation curve, the first point where the loss reaches the target,
  interpolated linearly between evaluation points (``None``: did not reach). Speedup = AdamW's
  tokens / this optimizer's tokens (1 for AdamW by construction).
- **wall-clock-to-target**: the same on the seed-mean curve of wall-clock seconds (as
  measured: it moves with the machine's load). The **wall-clock speedup** is the protocol's
  token speedup x (AdamW step time / this optimizer's step time), the step times taken from the
  optimizer share measured inside each run (see :func:`wall_clock_speedup`), which load on a
  shared machine does not distort.
- **learning-rate sensitivity**: the log2 width of the learning-rate interval around the best
  trial whose final loss stays within ``margin`` nats of the best, with linear interpolation in
  log2(lr) between grid points (a diverged neighbour ends the interval at the last point inside);
  flagged as a lower bound when the interval reaches the edge of the grid.
- **significance**: a difference to AdamW is called real when it exceeds 3 standard errors of
  the difference of the two seed means.
- **bounds**: a best learning rate at the edge of its grid is not a tuned value, so a speedup
  that involves one is a bound (``speedup_bound``): a lower bound when this optimizer's best is
  at an edge (tuned, it could only do better), an upper bound when AdamW's is (a tuned
  baseline sets a lower target), neither when both are.
- **tuning cost** (Sivaprasad et al. 2020): the expected best final loss after ``k`` trials
  drawn from the sweep's finished trials (with replacement, as a bootstrap does; computed
  exactly, see :func:`expected_best`), with a bootstrap 10-90% band. A diverged or failed trial
  counts as the worst finite final loss of any trial at that scale. The trials of a grid or a
  coordinate descent are not independent draws, so this measures how forgiving the trials
  were, not what random search would cost.
- **performance profile** (AlgoPerf), across workloads (the compared model sizes): for each
  workload, an optimizer's tokens-to-target over the fastest optimizer's; rho(tau) = the
  fraction of workloads where that ratio is at most tau ("did not reach": never). The summary
  score is the normalized area under rho for tau in [1, 4] (1: fastest everywhere), beside the
  geometric-mean token speedup over AdamW.
- **step-time ratio**: this optimizer's training-step time over AdamW's, from the optimizer
  share ``s`` measured inside each run: ``(1 - s_AdamW) / (1 - s)`` (load-independent).
- **scales and budgets**: with several token budgets (``valley compare --budgets``) each
  (model, budget) pair is a scale of its own (``nano``, ``nano@2x``...): the metrics above are
  per scale. Across the budgets of one model, AdamW's loss is fitted against data and every
  cell gets its **effective-data speedup** ``D_eff / D`` with a paired-bootstrap interval over
  seeds (Wen et al. 2025; :mod:`llmvalley.bench.scaling`).
- **shifted held-out corpus**: the mean over seeds of the final validation loss on the shifted
  corpus (:mod:`llmvalley.data.heldout`), read from each seed run's ``summary.json``, and its
  gap to AdamW's, beside the in-domain gap (older runs have none: left empty).
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmvalley.bench.compare import BASELINE, load_compare, scale_key
from llmvalley.bench.records import LOG_FILE, SUMMARY_FILE
from llmvalley.bench.scaling import DataSpeedup, ScalingFit, data_speedups
from llmvalley.bench.sweep import SWEEP_FILE, at_edge, merged_config

SENSITIVITY_MARGIN = 0.02  # nats
SIGNIFICANCE_SE = 3.0
PROFILE_TAU_MAX = 4.0  # AlgoPerf's largest ratio to the fastest
BOOTSTRAP_SAMPLES = 400
BOOTSTRAP_SEED = 0


@dataclass
class Curve:
    """A validation curve: evaluation points in tokens and wall-clock seconds."""

    tokens: list[float]
    seconds: list[float]
    loss: list[float]


def read_curve(run_dir: Path) -> Curve | None:
    """The validation points of one run's ``log.jsonl`` (None when it has none)."""
    path = run_dir / LOG_FILE
    if not path.is_file():
        return None
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("val_loss") is not None:
            points.append((record["tokens"], record.get("elapsed_s") or 0.0, record["val_loss"]))
    if not points:
        return None
    tokens, seconds, loss = (list(v) for v in zip(*points))
    return Curve(tokens, seconds, loss)


def mean_curve(curves: list[Curve]) -> Curve | None:
    """Point-wise mean over runs, on the evaluation points all of them share."""
    if not curves:
        return None
    n = min(len(c.tokens) for c in curves)
    return Curve(tokens=[statistics.fmean(c.tokens[i] for c in curves) for i in range(n)],
                 seconds=[statistics.fmean(c.seconds[i] for c in curves) for i in range(n)],
                 loss=[statistics.fmean(c.loss[i] for c in curves) for i in range(n)])


def first_crossing(x: list[float], loss: list[float], target: float) -> float | None:
    """The first ``x`` where ``loss`` reaches ``target`` (``<=``), linearly interpolated
    between consecutive points; None when it never does."""
    for i, value in enumerate(loss):
        if value <= target:
            if i == 0:
                return x[0]
            prev = loss[i - 1]
            fraction = (prev - target) / (prev - value)
            return x[i - 1] + fraction * (x[i] - x[i - 1])
    return None


def speedup(baseline: float | None, other: float | None) -> float | None:
    """baseline / other: how many times less the other needs (None if either did not reach)."""
    if baseline is None or other is None or other <= 0:
        return None
    return baseline / other


def wall_clock_speedup(token_speedup: float | None, base_share: float | None,
                       share: float | None, measured: float | None) -> float | None:
    """Token speedup x (AdamW step time / this optimizer's step time).

    Step times come from each run's optimizer share ``s`` (optimizer step / training step,
    measured inside the same run, so machine load cancels): with the same model, forward and
    backward cost the same for every optimizer, and the step time is proportional to
    ``1 / (1 - s)``. Without shares, the measured wall-clock ratio (``measured``) is used.
    """
    if token_speedup is None:
        return None
    if base_share is None or share is None or share >= 1 or base_share >= 1:
        return measured
    return token_speedup * (1 - share) / (1 - base_share)


@dataclass
class Sensitivity:
    """Learning-rate sensitivity of one sweep."""

    width_log2: float | None  # None: no completed trial
    low_lr: float | None
    high_lr: float | None
    lower_bound: bool  # the interval reaches an edge of the grid
    margin: float


def lr_sensitivity(points: list[tuple[float, float | None]],
                   margin: float = SENSITIVITY_MARGIN) -> Sensitivity:
    """Width (in log2 units) of the learning-rate interval within ``margin`` of the best loss.

    ``points`` are (lr, final loss or None for diverged/failed trials).
    """
    pts = sorted((math.log2(lr), math.inf if loss is None else loss) for lr, loss in points)
    finite = [p for p in pts if math.isfinite(p[1])]
    if not finite:
        return Sensitivity(None, None, None, False, margin)
    best = min(range(len(pts)), key=lambda i: pts[i][1])
    threshold = pts[best][1] + margin

    def boundary(step: int) -> tuple[float, bool]:
        i = best
        while 0 <= i + step < len(pts) and pts[i + step][1] <= threshold:
            i += step
        if not 0 <= i + step < len(pts):
            return pts[i][0], True  # reached the edge of the grid
        (x_in, l_in), (x_out, l_out) = pts[i], pts[i + step]
        if not math.isfinite(l_out):
            return x_in, False
        return x_in + (threshold - l_in) / (l_out - l_in) * (x_out - x_in), False

    low, low_edge = boundary(-1)
    high, high_edge = boundary(+1)
    return Sensitivity(high - low, 2**low, 2**high, low_edge or high_edge, margin)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (std None with fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


@dataclass
class CellMetrics:
    """Every metric of one optimizer at one scale."""

    model: str
    optimizer: str
    n_params: int | None = None
    best_lr: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_at_edge: bool = False
    untuned: bool = False  # zero tuning budget: the default learning rate, one trial
    trials: int = 0
    trials_diverged: int = 0
    trials_failed: int = 0
    seeds: int = 0
    seeds_diverged: int = 0
    final_loss_mean: float | None = None
    final_loss_std: float | None = None
    final_loss_se: float | None = None
    final_bpb_mean: float | None = None
    delta_vs_baseline: float | None = None
    significant: bool | None = None
    tokens_to_target: float | None = None
    seconds_to_target: float | None = None
    token_speedup: float | None = None
    wall_speedup: float | None = None
    # "lower" (this optimizer's best lr at an edge), "upper" (AdamW's), "unknown" (both), or
    # None: the speedups are measured between two tuned optima (AdamW's own row: None)
    speedup_bound: str | None = None
    state_bytes: int | None = None
    state_bytes_per_param: float | None = None
    peak_memory_bytes: float | None = None
    optimizer_share: float | None = None
    step_time_s: float | None = None
    tokens_per_step: float | None = None
    tokens_per_s: float | None = None
    sensitivity: Sensitivity | None = None
    spikes_sweep: int = 0
    spikes_seeds: int = 0
    max_grad_norm: float | None = None
    trial_points: list[tuple[float, float | None, str]] = field(default_factory=list)
    trial_losses: list[float | None] = field(default_factory=list)  # None: diverged or failed
    # (k, expected best loss, bootstrap 10% and 90%) for k = 1 ... trials
    tuning_curve: list[tuple[int, float, float, float]] = field(default_factory=list)
    step_time_ratio: float | None = None  # vs AdamW, from in-run optimizer shares
    search: str | None = None
    curves: list[Curve] = field(default_factory=list)
    mean: Curve | None = None
    # the scale: model preset and token budget (a multiple of the workload's), its tokens
    size: str | None = None
    budget: float = 1.0
    tokens: float | None = None
    seed_losses: dict[int, float] = field(default_factory=dict)  # completed seeds' final loss
    data_speedup: DataSpeedup | None = None  # effective-data speedup (several budgets)
    # the shifted held-out corpus: its name, mean final loss over seeds, and gap to AdamW's
    shifted_corpus: str | None = None
    shifted_loss_mean: float | None = None
    shifted_loss_std: float | None = None
    shifted_bpb_mean: float | None = None
    shifted_delta_vs_baseline: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("curves")
        return data


def cell_metrics(model: str, optimizer: str, sweep: dict[str, Any], folder: Path,
                 margin: float = SENSITIVITY_MARGIN) -> CellMetrics:
    """The metrics of one sweep folder that need no baseline (speedups come later)."""
    m = CellMetrics(model=model, optimizer=optimizer)
    trials = sweep.get("trials", [])
    m.trials = len(trials)
    m.trials_diverged = sum(1 for t in trials if t["status"] == "diverged")
    m.trials_failed = sum(1 for t in trials if t["status"] == "error")
    m.spikes_sweep = sum(t.get("loss_spikes") or 0 for t in trials)
    m.search = (sweep.get("search") or {}).get("mode")
    m.trial_losses = [t["final_val_loss"] if t["status"] == "completed" else None
                      for t in trials]
    best = sweep.get("best")
    sliced = trials
    if best and best.get("point"):  # coordinate descent: the lr values at the best's settings
        others = {k: v for k, v in best["point"].items() if k != "lr"}
        sliced = [t for t in trials if t.get("point") and all(
            t["point"].get(k) == v for k, v in others.items())]
    m.trial_points = [(t["lr"], t["final_val_loss"] if t["status"] == "completed" else None,
                       t["status"]) for t in sliced if t.get("lr")]
    m.sensitivity = lr_sensitivity([(lr, loss) for lr, loss, _ in m.trial_points], margin)
    if best:
        m.best_lr, m.best_params = best["lr"], best["params"]
        ks = [t["k"] for t in trials if t.get("k") is not None]
        m.untuned = bool(sweep.get("untuned"))
        m.best_at_edge = not m.untuned and (bool(sweep.get("best_at_edge"))
                                            or at_edge(best.get("k"), ks))
    seeds = sweep.get("seeds", [])
    done = [s for s in seeds if s.get("status") == "completed" and s.get("final_val_loss")]
    m.seeds = len(seeds)
    m.seeds_diverged = sum(1 for s in seeds if s.get("status") == "diverged")
    m.spikes_seeds = sum(s.get("loss_spikes") or 0 for s in seeds)
    losses = [s["final_val_loss"] for s in done]
    m.final_loss_mean, m.final_loss_std = mean_std(losses)
    if m.final_loss_std is not None:
        m.final_loss_se = m.final_loss_std / math.sqrt(len(losses))
    m.final_bpb_mean = mean_std([s["final_val_bpb"] for s in done
                                 if s.get("final_val_bpb") is not None])[0]
    source = done or ([best] if best else [])
    if source:
        m.n_params = source[0].get("n_params")
        m.state_bytes = source[0].get("state_bytes")
        m.state_bytes_per_param = source[0].get("state_bytes_per_param")
        m.peak_memory_bytes = mean_std([s["peak_memory_bytes"] for s in source
                                        if s.get("peak_memory_bytes")])[0]
        m.optimizer_share = mean_std([s["optimizer_share"] for s in source
                                      if s.get("optimizer_share") is not None])[0]
        m.tokens_per_s = mean_std([s["tokens_per_s"] for s in source
                                   if s.get("tokens_per_s")])[0]
        m.step_time_s = mean_std([s["train_time_s"] / s["steps"] for s in source
                                  if s.get("train_time_s") and s.get("steps")])[0]
        m.tokens_per_step = mean_std([s["tokens"] / s["steps"] for s in source
                                      if s.get("tokens") and s.get("steps")])[0]
        grad_norms = [s["max_grad_norm"] for s in source if s.get("max_grad_norm") is not None]
        m.max_grad_norm = max(grad_norms) if grad_norms else None
    for s in done:
        curve = read_curve(folder / s["run_dir"]) if s.get("run_dir") else None
        if curve is not None:
            m.curves.append(curve)
    m.mean = mean_curve(m.curves)
    m.seed_losses = {int(s["seed"]): s["final_val_loss"] for s in done
                     if s.get("seed") is not None}
    m.tokens = mean_std([s["tokens"] for s in done if s.get("tokens")])[0]
    add_shifted(m, [read_summary(folder, s) for s in done])
    return m


def read_summary(folder: Path, seed: dict[str, Any]) -> dict[str, Any]:
    """A seed run's own ``summary.json`` (fields ``sweep.json`` does not keep), or {}."""
    path = folder / seed["run_dir"] / SUMMARY_FILE if seed.get("run_dir") else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}


def add_shifted(m: CellMetrics, summaries: list[dict[str, Any]]) -> None:
    """The shifted held-out corpus's final loss over the seed runs (runs recorded before it
    existed have none)."""
    done = [s for s in summaries if s.get("final_shifted_val_loss") is not None]
    if not done:
        return
    m.shifted_corpus = done[0].get("shifted_corpus")
    m.shifted_loss_mean, m.shifted_loss_std = mean_std([s["final_shifted_val_loss"]
                                                        for s in done])
    m.shifted_bpb_mean = mean_std([s["final_shifted_val_bpb"] for s in done
                                   if s.get("final_shifted_val_bpb") is not None])[0]


def add_baseline_metrics(cells: list[CellMetrics]) -> None:
    """Fill speedups, deltas and significance against the AdamW cell of the same scale."""
    base = next((c for c in cells if c.optimizer == BASELINE), None)
    if base is None or base.final_loss_mean is None:
        return
    target = base.final_loss_mean
    base_tokens = first_crossing(base.mean.tokens, base.mean.loss, target) if base.mean else None
    base_seconds = first_crossing(base.mean.seconds, base.mean.loss, target) \
        if base.mean else None
    for c in cells:
        if c.optimizer_share is not None and base.optimizer_share is not None \
                and c.optimizer_share < 1:
            c.step_time_ratio = (1 - base.optimizer_share) / (1 - c.optimizer_share)
        if c.mean is not None:
            c.tokens_to_target = first_crossing(c.mean.tokens, c.mean.loss, target)
            c.seconds_to_target = first_crossing(c.mean.seconds, c.mean.loss, target)
            c.token_speedup = speedup(base_tokens, c.tokens_to_target)
            c.wall_speedup = wall_clock_speedup(c.token_speedup, base.optimizer_share,
                                                c.optimizer_share,
                                                speedup(base_seconds, c.seconds_to_target))
        if c is not base:
            c.speedup_bound = speedup_bound(c.best_at_edge, base.best_at_edge)
        if c.shifted_loss_mean is not None and base.shifted_loss_mean is not None \
                and c.shifted_corpus == base.shifted_corpus:
            c.shifted_delta_vs_baseline = c.shifted_loss_mean - base.shifted_loss_mean
        if c.final_loss_mean is not None:
            c.delta_vs_baseline = c.final_loss_mean - target
            if c is not base and c.final_loss_se is not None and base.final_loss_se is not None:
                se = math.hypot(c.final_loss_se, base.final_loss_se)
                c.significant = abs(c.delta_vs_baseline) > SIGNIFICANCE_SE * se


def expected_best(losses: list[float], k: int) -> float:
    """The expected minimum of ``k`` draws with replacement from ``losses`` (the limit of a
    bootstrap with infinitely many resamples): with the losses sorted ascending,
    ``P(min = l_i) = ((n - i + 1) / n)**k - ((n - i) / n)**k`` (1-based ``i``)."""
    ordered = sorted(losses)
    n = len(ordered)
    return sum(value * (((n - i) / n) ** k - ((n - i - 1) / n) ** k)
               for i, value in enumerate(ordered))


def tuning_curve(losses: list[float | None], cap: float,
                 samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
                 ) -> list[tuple[int, float, float, float]]:
    """(k, expected best loss, 10% and 90% bootstrap quantiles) for k = 1 ... len(losses);
    a trial without a loss (diverged, failed) counts as ``cap``."""
    values = [cap if v is None else v for v in losses]
    if not values:
        return []
    rng = random.Random(seed)
    curve = []
    for k in range(1, len(values) + 1):
        draws = sorted(min(rng.choice(values) for _ in range(k)) for _ in range(samples))
        curve.append((k, expected_best(values, k), draws[int(0.1 * (samples - 1))],
                      draws[int(0.9 * (samples - 1))]))
    return curve


def add_tuning_cost(cells: list[CellMetrics]) -> None:
    """Fill each cell's tuning curve (the cap: the worst finite trial loss at this scale)."""
    finite = [v for c in cells for v in c.trial_losses if v is not None]
    if not finite:
        return
    cap = max(finite)
    for c in cells:
        c.tuning_curve = tuning_curve(c.trial_losses, cap)


@dataclass
class Profile:
    """A performance profile over workloads (AlgoPerf): per optimizer, the ratio of its
    tokens-to-target to the fastest optimizer's on each workload (inf: did not reach)."""

    workloads: list[str]
    ratios: dict[str, list[float]]
    tau_max: float = PROFILE_TAU_MAX

    def rho(self, optimizer: str, tau: float) -> float:
        """The fraction of workloads where ``optimizer`` is within a factor ``tau`` of the
        fastest."""
        ratios = self.ratios[optimizer]
        return sum(1 for r in ratios if r <= tau) / len(ratios)

    def score(self, optimizer: str) -> float:
        """Normalized area under rho(tau) for tau in [1, tau_max]: 1 when fastest on every
        workload, 0 when never within tau_max (exact for the step function)."""
        span = self.tau_max - 1
        return sum((self.tau_max - min(r, self.tau_max)) / span
                   for r in self.ratios[optimizer]) / len(self.ratios[optimizer])


def performance_profile(times: dict[str, dict[str, float | None]],
                        tau_max: float = PROFILE_TAU_MAX) -> Profile | None:
    """The profile of ``times`` (workload -> optimizer -> tokens-to-target, None: did not
    reach); None with fewer than two workloads or none where any optimizer reached."""
    workloads = [w for w, row in times.items() if any(v for v in row.values())]
    if len(times) < 2 or not workloads:
        return None
    optimizers = sorted({o for row in times.values() for o in row})
    ratios: dict[str, list[float]] = {o: [] for o in optimizers}
    for workload in times:
        row = times[workload]
        fastest = min((v for v in row.values() if v), default=None)
        for o in optimizers:
            value = row.get(o)
            ratios[o].append(value / fastest if value and fastest else math.inf)
    return Profile(list(times), ratios, tau_max)


def geometric_mean(values: list[float]) -> float | None:
    """The geometric mean of positive ``values`` (None when empty)."""
    if not values:
        return None
    return math.exp(statistics.fmean(math.log(v) for v in values))


def speedup_bound(at_edge: bool, baseline_at_edge: bool) -> str | None:
    """What a measured speedup is when best learning rates sit at grid edges (see the module
    docstring): ``"lower"``, ``"upper"``, ``"unknown"`` (both at an edge) or None."""
    if at_edge and baseline_at_edge:
        return "unknown"
    if at_edge:
        return "lower"
    return "upper" if baseline_at_edge else None


def baseline_settings(sweep: dict[str, Any]) -> dict[str, Any]:
    """The AdamW hyperparameters (besides lr) the baseline's best configuration ran with."""
    import llmvalley

    best = sweep.get("best") or {}
    params = {k: v for k, v in (best.get("params") or {}).items() if k != "lr"}
    config = merged_config(sweep.get("workload") or {}, sweep.get("fixed") or {}, params)
    settings = {**llmvalley.get_spec(BASELINE).defaults, **config["opt_args"]}
    if config.get("weight_decay") is not None:
        settings["weight_decay"] = config["weight_decay"]
    settings.pop("lr", None)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}


def weak_baseline(settings: dict[str, Any]) -> bool:
    """Library defaults (betas (0.9, 0.999) and weight decay 0.01): the protocol's weak
    baseline, never to be reported as "AdamW"."""
    betas = settings.get("betas")
    return (betas is not None and tuple(betas) == (0.9, 0.999)
            and settings.get("weight_decay") == 0.01)


def add_scaling(cells: list[CellMetrics]) -> ScalingFit | None:
    """AdamW's loss-against-data fit over the budgets of one model size, and every cell's
    effective-data speedup (None with one budget)."""
    baseline = {c.tokens: c.seed_losses for c in cells
                if c.optimizer == BASELINE and c.tokens and c.seed_losses}
    if len({c.budget for c in cells}) < 2:
        return None
    methods = {f"{c.model}/{c.optimizer}": (c.tokens, c.seed_losses) for c in cells}
    fit, speedups = data_speedups(baseline, methods)
    for c in cells:
        c.data_speedup = speedups[f"{c.model}/{c.optimizer}"]
    return fit


@dataclass
class Results:
    """A results folder's comparison, analysed: cells per scale in the compare's order.

    A scale is a model size at one token budget; without ``--budgets`` the scales are the
    models (``models`` holds the scale keys, ``sizes`` the model presets)."""

    folder: Path
    manifest: dict[str, Any]
    models: list[str]  # scale keys: nano, nano@2x, ...
    optimizers: list[str]
    cells: dict[str, list[CellMetrics]]  # scale key -> one entry per optimizer with a sweep
    margin: float
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)  # scale -> AdamW settings
    sizes: list[str] = field(default_factory=list)  # model presets
    budgets: list[float] = field(default_factory=lambda: [1.0])
    scales: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (size, budget)
    fits: dict[str, ScalingFit] = field(default_factory=dict)  # size -> AdamW's fit

    def size_keys(self) -> list[str]:
        """One scale per model size, at the reference budget (1 when compared, else the
        smallest): what the figures against model size show."""
        reference = 1.0 if 1.0 in self.budgets else min(self.budgets)
        return [scale_key(size, reference) for size in self.sizes]

    def budget_keys(self, size: str) -> list[str]:
        """The scales of one model size, budgets ascending."""
        return [key for key, (s, _) in self.scales.items() if s == size]

    def peak_above_model(self, model: str, optimizer: str) -> float | None:
        """Peak memory above the model's own, in bytes: this optimizer's peak less AdamW's
        peak without AdamW's state (parameters, gradients, activations and the runtime, the
        same for every optimizer of one model). Unlike the CPU's process peak RSS, which the
        runtime dominates, it shows what the optimizer adds (state and transient work)."""
        base, cell = self.cell(model, BASELINE), self.cell(model, optimizer)
        if base is None or cell is None or not base.peak_memory_bytes \
                or not cell.peak_memory_bytes or base.state_bytes is None:
            return None
        return cell.peak_memory_bytes - (base.peak_memory_bytes - base.state_bytes)

    def profile(self) -> Profile | None:
        """The performance profile over the compared sizes (None with one size)."""
        return performance_profile({model: {c.optimizer: c.tokens_to_target
                                             for c in self.cells[model]}
                                    for model in self.models})

    def geomean_speedup(self, optimizer: str) -> tuple[float | None, int]:
        """The geometric-mean token speedup over AdamW across sizes, and the number of sizes
        where the optimizer did not reach the target (left out of the mean)."""
        values, missed = [], 0
        for model in self.models:
            c = self.cell(model, optimizer)
            if c is None:
                continue
            if c.token_speedup:
                values.append(c.token_speedup)
            else:
                missed += 1
        return geometric_mean(values), missed

    def target(self, model: str) -> float | None:
        base = next((c for c in self.cells[model] if c.optimizer == BASELINE), None)
        return base.final_loss_mean if base else None

    def cell(self, model: str, optimizer: str) -> CellMetrics | None:
        return next((c for c in self.cells.get(model, []) if c.optimizer == optimizer), None)


def analyse(folder: str | Path, margin: float = SENSITIVITY_MARGIN) -> Results:
    """Read a ``valley compare`` results folder and compute every metric."""
    folder = Path(folder)
    manifest = load_compare(folder)
    spec = manifest["spec"]
    budgets = sorted(spec.get("budgets") or [1.0])  # results from before --budgets: one
    scales = {scale_key(model, budget): (model, budget)
              for model in spec["models"] for budget in budgets}
    cells: dict[str, list[CellMetrics]] = {}
    baseline: dict[str, dict[str, Any]] = {}
    for key, (model, budget) in scales.items():
        cells[key] = []
        for optimizer in spec["optimizers"]:
            sweep_folder = folder / key / optimizer
            path = sweep_folder / SWEEP_FILE
            if not path.is_file():
                continue
            sweep = json.loads(path.read_text())
            cell = cell_metrics(key, optimizer, sweep, sweep_folder, margin)
            cell.size, cell.budget = model, budget
            cells[key].append(cell)
            if optimizer == BASELINE:
                baseline[key] = baseline_settings(sweep)
        add_baseline_metrics(cells[key])
        add_tuning_cost(cells[key])
    fits = {}
    for model in spec["models"]:
        fit = add_scaling([c for key, (m, _) in scales.items() if m == model
                           for c in cells[key]])
        if fit is not None:
            fits[model] = fit
    return Results(folder, manifest, list(scales), list(spec["optimizers"]), cells,
                   margin, baseline, sizes=list(spec["models"]), budgets=budgets,
                   scales=scales, fits=fits)
