"""Coordinate-descent tuning (Wen et al. 2025, "Fantastic Pretraining Optimizers and Where to
Find Them"): the learning rate and each method's most sensitive hyperparameters, one at a time.

Which hyperparameters a method tunes comes from one place, :func:`coordinate_axes`:

- the learning rate, always, on the sweep's log grid (``center * factor**k``);
- ``beta2`` when the registry defaults have ``betas`` (the second entry is replaced), else
  ``momentum`` when they have it;
- ``weight_decay`` when the defaults have it;
- ``warmup_steps``, from the workload (its warmup, or 10% of its steps), for every method;

with :data:`OVERRIDES` where a method needs other values or has no such hyperparameter worth
tuning. Every candidate list includes the value the method starts from (the workload's, the
comparison's baseline settings, or the registry default).

The search is a pure function of the finished trials (:func:`next_point`), so a restarted
sweep replays it and continues where it stopped. Passes go round the axes (learning rate first);
a pass evaluates the candidates of one axis with the others fixed at the best point so far and
moves to the best. The learning-rate pass tries one grid step either side of the current best
(the first pass: the sweep's initial grid), so an optimum at an edge is followed outwards. Once
a full round changes nothing, the learning-rate step halves (in log space), so the budget, the
same for every method, is always spent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

LR_AXIS = "lr"
#: Candidate values of each axis, before the start value is added.
BETA2_VALUES = (0.95, 0.98, 0.99, 0.999)
MOMENTUM_VALUES = (0.9, 0.95, 0.98)
WEIGHT_DECAY_VALUES = (0.0, 0.05, 0.1, 0.2)
WARMUP_MULTIPLIERS = (0.5, 1.0, 2.0)  # of the workload's warmup
#: Per-method exceptions: an axis name mapped to its own candidate values, or to None to leave
#: the axis out. Documented in docs/benchmark.md.
OVERRIDES: dict[str, dict[str, tuple[float, ...] | None]] = {
    # SGD's default momentum is 0 (plain SGD); the LLM range starts at 0.9
    "sgd": {"momentum": (0.0, 0.9, 0.95)},
    # Lion's second beta is its momentum EMA; the paper's range
    "lion": {"beta2": (0.95, 0.98, 0.99)},
    "lion8bit": {"beta2": (0.95, 0.98, 0.99)},
    # Adan's betas are (beta1, beta2, beta3) with a different meaning; tune its momentum-like
    # beta2 over the paper's range around 0.92
    "adan": {"beta2": (0.9, 0.92, 0.95)},
}
ROUND = 12  # digits compared when deciding whether two points are the same


@dataclass(frozen=True)
class Axis:
    """One tuned hyperparameter besides the learning rate: its candidate values and the value
    the method starts from (one of the candidates)."""

    name: str  # beta2, momentum, weight_decay or warmup_steps
    values: tuple[float, ...]
    start: float


def _candidates(values: Iterable[float], start: float, integer: bool = False) -> tuple:
    pool = {int(round(v)) if integer else float(v) for v in values} | {start}
    return tuple(sorted(pool))


def workload_warmup(workload: dict[str, Any]) -> int | None:
    """The warmup steps a workload runs with (its own, or 10% of its steps as ``valley train``
    plans them); None when the budget cannot be planned without the data."""
    from llmvalley.bench.config import coerce_config
    from llmvalley.bench.setup import plan_budget
    from llmvalley.models.presets import PRESETS

    known = {k: v for k, v in workload.items() if k not in ("opt_args", "fallback_args")}
    try:
        config = coerce_config(known)
    except Exception:  # noqa: BLE001 (a workload the sweep itself will reject later)
        return None
    preset = PRESETS.get(config.model)
    seq_len = config.seq_len or (preset.max_seq_len if preset else None)
    if seq_len is None:
        return None
    return plan_budget(config, seq_len).warmup_steps


def start_settings(optimizer: str, workload: dict[str, Any],
                   fixed: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters a cell runs with before tuning: registry defaults < the caller's
    fixed settings < the workload's (``betas``, ``momentum``, ``weight_decay``)."""
    from llmvalley.bench.sweep import merged_config

    config = merged_config(workload, fixed)
    settings = dict(registry_defaults(optimizer))
    settings.update(config.get("opt_args") or {})
    if config.get("weight_decay") is not None:
        settings["weight_decay"] = config["weight_decay"]
    return settings


def registry_defaults(optimizer: str) -> dict[str, Any]:
    """The registry defaults of ``optimizer`` (torch-adamw: torch's AdamW defaults)."""
    if optimizer == "torch-adamw":
        return {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    import llmvalley

    return dict(llmvalley.get_spec(optimizer).defaults)


def coordinate_axes(optimizer: str, workload: dict[str, Any],
                    fixed: dict[str, Any] | None = None) -> tuple[Axis, ...]:
    """The axes a coordinate-descent sweep of ``optimizer`` tunes besides the learning rate,
    in pass order (see the module docstring)."""
    settings = start_settings(optimizer, workload, fixed or {})
    overrides = OVERRIDES.get(optimizer, {})
    axes: list[Axis] = []

    def add(name: str, default_values: tuple[float, ...], start: float,
            integer: bool = False) -> None:
        values = overrides.get(name, default_values)
        if values is None:
            return
        axes.append(Axis(name, _candidates(values, start, integer), start))

    betas = settings.get("betas")
    if isinstance(betas, list | tuple) and len(betas) >= 2 and betas[1] is not None:
        add("beta2", BETA2_VALUES, float(betas[1]))
    elif isinstance(settings.get("momentum"), int | float):
        add("momentum", MOMENTUM_VALUES, float(settings["momentum"]))
    if isinstance(settings.get("weight_decay"), int | float):
        add("weight_decay", WEIGHT_DECAY_VALUES, float(settings["weight_decay"]))
    warmup = workload_warmup(workload)
    if warmup:
        add("warmup_steps", tuple(m * warmup for m in WARMUP_MULTIPLIERS), warmup, integer=True)
    return tuple(axes)


def point_params(point: dict[str, float], axes: tuple[Axis, ...], center: float,
                 factor: float, settings: dict[str, Any]) -> dict[str, Any]:
    """The trial parameters of a point (``lr``, ``weight_decay``, ``warmup_steps`` and
    optimizer arguments: ``betas`` with its second entry replaced, ``momentum``)."""
    params: dict[str, Any] = {LR_AXIS: center * factor ** point[LR_AXIS]}
    for axis in axes:
        value = point[axis.name]
        if axis.name == "beta2":
            betas = list(settings["betas"])
            betas[1] = value
            params["betas"] = tuple(betas)
        elif axis.name == "warmup_steps":
            params["warmup_steps"] = int(value)
        else:
            params[axis.name] = value
    return params


def _key(point: dict[str, float]) -> tuple:
    return tuple(sorted((k, round(float(v), ROUND)) for k, v in point.items()))


@dataclass
class Plan:
    """What to run next: ``points`` not yet started in the current pass (empty: wait for
    running trials), and the pass it belongs to."""

    points: list[dict[str, float]]
    axis: str
    best: dict[str, float] | None


def next_point(axes: tuple[Axis, ...], initial_ks: list[int],
               finished: dict[tuple, float], running: set[tuple],
               max_passes: int = 10_000) -> Plan:
    """Replay coordinate descent over the ``finished`` points (key -> loss; +inf for diverged
    or failed trials) and return the points of the first pass that is not complete.

    ``running`` points are taken (neither proposed again nor judged); while any point of the
    current pass runs and none is left to start, the plan is empty (wait).
    """
    names = [LR_AXIS, *(a.name for a in axes)]
    current = {LR_AXIS: 0.0, **{a.name: a.start for a in axes}}
    step = 1.0
    unchanged = 0  # passes in a row that did not move the current point
    first = True
    for index in range(max_passes):
        name = names[index % len(names)]
        if name == LR_AXIS:
            if first:
                values = [current[LR_AXIS] + k for k in initial_ks]
                first = False
            else:
                values = [current[LR_AXIS] - step, current[LR_AXIS], current[LR_AXIS] + step]
        else:
            values = list(next(a for a in axes if a.name == name).values)
        candidates = [{**current, name: v} for v in values]
        keys = [_key(c) for c in candidates]
        todo = [c for c, k in zip(candidates, keys) if k not in finished and k not in running]
        if todo:
            return Plan(todo, name, _best(current, finished))
        if any(k in running for k in keys):
            return Plan([], name, _best(current, finished))
        scored = [(finished[k], c[name]) for c, k in zip(candidates, keys)]
        best_loss, best_value = min(scored, key=lambda s: (s[0], abs(s[1] - current[name])))
        current_loss = finished.get(_key(current), math.inf)
        if math.isinf(best_loss) and name == LR_AXIS and min(values) < current[LR_AXIS]:
            # every learning rate diverged or failed: move down, where it is safer
            current = {**current, LR_AXIS: min(values)}
            unchanged = 0
        elif best_loss < current_loss:
            current = {**current, name: best_value}
            unchanged = 0
        else:
            unchanged += 1
            if unchanged >= len(names):  # a full round without a move: refine the lr step
                step /= 2
                unchanged = 0
    raise RuntimeError("coordinate descent did not find a new point")  # pragma: no cover


def _best(current: dict[str, float], finished: dict[tuple, float]) -> dict[str, float] | None:
    return current if _key(current) in finished else None


def point_key(point: dict[str, float]) -> tuple:
    """The comparable identity of a point (rounded values, sorted names)."""
    return _key(point)
