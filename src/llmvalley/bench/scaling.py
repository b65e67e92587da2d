"""Scale dependence: AdamW's loss against data, and each method's effective-data speedup.

Wen et al. 2025 ("Fantastic Pretraining Optimizers and Where to Find Them") measure a method's
gain as the data AdamW would need to reach the method's loss: fit AdamW's end-of-schedule loss
against its token budget, ``L(D) = a * D**-b + c``, over several budgets (``valley compare
--budgets 1,2,4``); a method that reaches loss ``L`` with ``D`` tokens has the effective data
``D_eff = L^-1(L)`` and the speedup ``D_eff / D`` (1 for AdamW itself, up to the fit's residual).

- **The fit** (:func:`fit_power_law`) is a least-squares fit of the per-budget mean losses with
  ``a > 0``, ``b > 0`` and ``0 <= c < min(L)``: the asymptote is below every observed loss. It
  starts from a profile over ``c`` (for a given ``c``, ``log(L - c)`` is linear in ``log D``),
  refined by ``scipy.optimize.least_squares``. With three budgets it interpolates exactly when
  the losses are convex and decreasing. It is undefined (``None`` with a reason) with fewer
  than three budgets or when the loss does not fall with data.
- **Beyond the asymptote**: a method whose loss is at or below ``c`` has no finite ``D_eff``
  on the fit. It is reported as a *lower bound*: ``D_max / D``, with ``D_max`` AdamW's largest
  budget, since AdamW did not reach that loss with ``D_max`` tokens.
- **Extrapolation**: ``D_eff`` outside AdamW's budgets rests on the fitted form, not on a run
  (flagged).
- **Interval**: a paired bootstrap over seeds (:func:`data_speedups`): each resample draws seed
  numbers with replacement, once for every series of a model (AdamW at each budget and every
  method: the same seeds mean the same initialisation and data order), refits AdamW and
  recomputes every speedup; the interval is the 5-95% range (a 90% interval) of the resamples
  where the fit exists, ``inf`` where a resample falls beyond its asymptote.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

import numpy as np

#: bootstrap resamples and the interval's quantiles (a 90% interval)
SCALING_SAMPLES = 200
INTERVAL = (0.05, 0.95)
SCALING_SEED = 0
MIN_BUDGETS = 3
MAX_EXPONENT = 10.0


@dataclass(frozen=True)
class PowerLaw:
    """``L(D) = a * (D / d0)**-b + c`` (``d0``: the smallest budget, for conditioning)."""

    a: float
    b: float
    c: float
    d0: float

    def loss(self, tokens: float) -> float:
        """The fitted loss after ``tokens`` tokens."""
        return self.a * (tokens / self.d0) ** -self.b + self.c

    def tokens_for(self, loss: float) -> float:
        """The budget at which the fit reaches ``loss`` (``inf`` at or below the asymptote)."""
        if loss <= self.c:
            return math.inf
        return self.d0 * ((loss - self.c) / self.a) ** (-1.0 / self.b)

    @property
    def a_tokens(self) -> float:
        """``a`` in ``L(D) = a * D**-b + c`` with ``D`` in tokens."""
        return self.a * self.d0**self.b


@dataclass
class ScalingFit:
    """AdamW's fitted loss-against-data law at one model size (``law`` None: undefined)."""

    budgets: list[float]  # tokens, ascending
    losses: list[float]  # mean final loss at each budget
    law: PowerLaw | None
    reason: str | None = None  # why the fit is undefined
    rms: float | None = None  # root-mean-square residual of the fit (nats)


def _profile(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """(a, b, c) minimising the squared error over a grid of asymptotes ``c`` (closed-form
    ``a``, ``b`` for each ``c``: a line in log-log); None when no ``c`` gives ``b > 0``."""
    cs = np.linspace(0.0, float(y.min()), 201)[:-1, None]  # candidate asymptotes
    lx = np.log(x)[None, :]
    ly = np.log(y[None, :] - cs)
    dx = lx - lx.mean()
    slopes = (dx * (ly - ly.mean(axis=1, keepdims=True))).sum(axis=1) / (dx**2).sum()
    intercepts = ly.mean(axis=1) - slopes * lx.mean()
    a, b = np.exp(intercepts), -slopes
    errors = ((a[:, None] * x[None, :] ** -b[:, None] + cs - y[None, :]) ** 2).sum(axis=1)
    errors[b <= 0] = np.inf
    i = int(np.argmin(errors))
    return None if not np.isfinite(errors[i]) else (float(a[i]), float(b[i]), float(cs[i, 0]))


def fit_power_law(budgets: list[float], losses: list[float]) -> ScalingFit:
    """Fit ``L(D) = a * D**-b + c`` to mean losses at several budgets (see the module)."""
    from scipy.optimize import least_squares

    pairs = sorted((float(d), float(v)) for d, v in zip(budgets, losses)
                   if d > 0 and v is not None and math.isfinite(v))
    xs = [d for d, _ in pairs]
    ys = [v for _, v in pairs]
    if len(set(xs)) < MIN_BUDGETS:
        return ScalingFit(xs, ys, None, f"needs AdamW's loss at {MIN_BUDGETS} or more budgets "
                                        f"(has {len(set(xs))})")
    if ys[-1] >= ys[0]:
        return ScalingFit(xs, ys, None, "AdamW's loss does not fall with more data")
    d0 = xs[0]
    x, y = np.asarray(xs) / d0, np.asarray(ys)
    start = _profile(x, y)
    if start is None:
        return ScalingFit(xs, ys, None, "no decreasing power law fits AdamW's losses")
    top = float(y.min())
    upper = top - 1e-9 * max(1.0, abs(top))
    a0, b0, c0 = start
    result = least_squares(
        lambda p: p[0] * x ** -p[1] + p[2] - y,
        x0=[a0, min(max(b0, 1e-6), MAX_EXPONENT - 1e-6), min(max(c0, 0.0), upper * 0.999999)],
        bounds=([1e-12, 1e-6, 0.0], [np.inf, MAX_EXPONENT, max(upper, 1e-12)]), method="trf")
    a, b, c = (float(v) for v in result.x) if result.success else start
    law = PowerLaw(a, b, c, d0)
    rms = math.sqrt(statistics.fmean((law.loss(d) - v) ** 2 for d, v in pairs))
    return ScalingFit(xs, ys, law, None, rms)


@dataclass
class DataSpeedup:
    """A method's effective-data speedup ``D_eff / D`` over AdamW at one budget."""

    value: float | None  # None: the fit is undefined (see ``note``)
    low: float | None = None  # the bootstrap interval (high may be inf)
    high: float | None = None
    # "lower": the loss is beyond AdamW's fitted asymptote, ``value`` is the lower bound
    # D_max / D (AdamW did not reach that loss with its largest budget)
    bound: str | None = None
    extrapolated: bool = False  # D_eff outside AdamW's budgets
    effective_tokens: float | None = None  # D_eff (inf beyond the asymptote)
    tokens: float | None = None  # D
    note: str | None = None


def speedup_at(law: PowerLaw, loss: float, tokens: float) -> tuple[float, float]:
    """(``D_eff / D``, ``D_eff``) for a loss reached with ``tokens`` (inf beyond c)."""
    effective = law.tokens_for(loss)
    return effective / tokens, effective


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _mean_of(series: dict[int, float], draws: list[int], rng: random.Random) -> float:
    """The mean of ``series`` over the drawn seeds (paired); seeds it lacks are redrawn from
    its own (an unpaired fallback for a seed that diverged in one series only)."""
    values = [series[s] for s in draws if s in series]
    while len(values) < len(draws):
        values.append(series[rng.choice(sorted(series))])
    return statistics.fmean(values)


def data_speedups(baseline: dict[float, dict[int, float]],
                  methods: dict[str, tuple[float, dict[int, float]]],
                  samples: int = SCALING_SAMPLES, seed: int = SCALING_SEED
                  ) -> tuple[ScalingFit, dict[str, DataSpeedup]]:
    """AdamW's fit at one model size and every method's speedup with its interval.

    ``baseline``: AdamW's final loss per seed at each budget (tokens -> seed -> loss);
    ``methods``: name -> (its budget in tokens, its final loss per seed). Never raises on
    undefined fits: the speedups then carry ``value`` None and the fit's reason.
    """
    budgets = sorted(d for d, series in baseline.items() if series)
    fit = fit_power_law(budgets, [statistics.fmean(baseline[d].values()) for d in budgets])
    result: dict[str, DataSpeedup] = {}
    if fit.law is None:
        for name, (tokens, _) in methods.items():
            result[name] = DataSpeedup(None, tokens=tokens, note=fit.reason)
        return fit, result
    d_min, d_max = budgets[0], budgets[-1]
    for name, (tokens, series) in methods.items():
        if not series or not tokens:
            result[name] = DataSpeedup(None, tokens=tokens, note="no completed seed run")
            continue
        value, effective = speedup_at(fit.law, statistics.fmean(series.values()), tokens)
        entry = DataSpeedup(value, tokens=tokens, effective_tokens=effective)
        if math.isinf(value):
            entry.value, entry.bound = d_max / tokens, "lower"
            entry.note = (f"below AdamW's fitted asymptote c = {fit.law.c:.4f}: no AdamW budget "
                          f"on the fit reaches it; at least AdamW's largest budget / D")
        else:
            entry.extrapolated = not d_min <= effective <= d_max
        result[name] = entry
    # the paired bootstrap: one seed draw per resample, shared by every series
    seeds = sorted({s for series in baseline.values() for s in series}
                   | {s for _, series in methods.values() for s in series})
    rng = random.Random(seed)
    replicates: dict[str, list[float]] = {name: [] for name in methods}
    fitted = 0
    for _ in range(samples):
        draws = [rng.choice(seeds) for _ in seeds]
        law = fit_power_law(budgets, [_mean_of(baseline[d], draws, rng) for d in budgets]).law
        if law is None:
            continue
        fitted += 1
        for name, (tokens, series) in methods.items():
            if series and tokens:
                replicates[name].append(speedup_at(law, _mean_of(series, draws, rng),
                                                   tokens)[0])
    for name, values in replicates.items():
        entry = result[name]
        if entry.value is not None and values and fitted >= samples / 2:
            entry.low, entry.high = (_quantile(values, q) for q in INTERVAL)
            if entry.bound == "lower":
                entry.low = min(entry.low, entry.value)
    return fit, result
