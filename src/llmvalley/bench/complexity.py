"""Implementation complexity of an optimizer, from the registry: the report's complexity table.

- **extra hyperparameters**: the registry defaults a method has beyond AdamW's (``lr``,
  ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``fused``).
- **state memory formula**: ``spec.state_numel`` evaluated on representative shapes (sides
  1024 to 5120) and fitted exactly to ``a mn + b m^2 + c n^2 + d min(m,n)^2 + e m + f n +
  h min(m,n) + i`` for an ``m x n`` matrix (``a n^2 + b n + c`` for a vector), at the registry
  defaults (ranks and block sizes included, so a formula holds for sides above those); the
  values at three shapes when no such formula fits. Matrix-only methods keep AdamW's ``2n``
  on every other tensor.
- **matrix decompositions per step**: from the method's transform chain, through the one table
  :data:`DECOMPOSITIONS` (transform or projector class name -> what it computes and how often).
  Counts are per hidden matrix and **amortized per step**: an SVD refreshed every 2000 steps
  counts 1/2000. A transform missing from the table counts as none; add new decomposition
  transforms there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: hyperparameters AdamW has (a method's others are its "extra" ones)
ADAMW_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "fused"})
#: (m, n) shapes the state formula is fitted on: both orientations, above typical ranks
SHAPES = ((1024, 1024), (1024, 2048), (2048, 1024), (2048, 2048), (1024, 3072), (3072, 1024),
          (2048, 4096), (4096, 2048), (3072, 3072), (4096, 4096), (3072, 5120), (5120, 3072))
VECTOR_SIZES = (1024, 2048, 3072, 4096)
TERMS = ("mn", "m^2", "n^2", "min(m,n)^2", "m", "n", "min(m,n)", "1")

Group = Mapping[str, Any]


def _ortho(key: str) -> Callable[[Group], tuple[str, float]]:
    """An orthogonalization step chosen by hyperparameter ``key``."""
    def describe(group: Group) -> tuple[str, float]:
        method = str(group.get(key, "newton_schulz"))
        names = {"newton_schulz": f"Newton-Schulz ({group.get('ns_steps', 5)} iterations)",
                 "polar_express": "Polar Express iteration", "svd": "SVD",
                 "qdwh": "QDWH polar (QR + Cholesky)"}
        return names.get(method, method), 1.0
    return describe


def _every(what: str, key: str, per_refresh: float = 1.0) -> Callable[[Group], tuple[str, float]]:
    """``per_refresh`` decompositions every ``group[key]`` steps."""
    def describe(group: Group) -> tuple[str, float]:
        period = int(group.get(key) or 1)
        return f"{what}, every {period} steps" if period > 1 else what, per_refresh / period
    return describe


#: transform or projector class name -> (group -> (what, decompositions per matrix per step))
DECOMPOSITIONS: dict[str, Callable[[Group], tuple[str, float]]] = {
    "Orthogonalize": _ortho("orthogonalizer"),
    "NAMOUpdate": _ortho("orthogonalizer"),
    "PolarGradUpdate": _ortho("polar_method"),
    "SWANNormalizeWhiten": _ortho("whitening"),
    "DionUpdate": lambda g: ("QR (power iteration)", 1.0),
    "SingularBasis": _every("SVD", "update_proj_gap"),
    "SVDProjector": _every("SVD", "update_proj_gap"),
    "OnlineProjector": lambda g: ("SVD at the first step only", 0.0),
    "TrackedSubspace": lambda g: ("QR (power iteration)", 1.0),
    "MomentumSubspace": _every("SVD", "update_proj_gap"),
    "KroneckerEigenbasis": _every("QR per Kronecker factor (2)", "precondition_frequency", 2.0),
    "ScaleByShampoo": _every("eigendecomposition per factor (2)", "precondition_frequency",
                             2.0),
    "ScaleBySPlus": _every("eigendecomposition per factor (2)", "inverse_every", 2.0),
    "ScaleByASGO": lambda g: (f"Polar Express inverse root ({g.get('matalg_steps')} "
                              "iterations)", 1.0),
}


@dataclass
class Complexity:
    """The complexity facts of one optimizer."""

    optimizer: str
    extra_hyperparameters: list[str]
    matrix_state: str  # formula in m, n (state elements of an m x n matrix)
    vector_state: str  # formula in n
    decompositions: list[str]  # what, per hidden matrix
    decompositions_per_step: float  # amortized, per hidden matrix


def _spec(optimizer: str) -> Any:
    import llmvalley

    return llmvalley.get_spec(optimizer)


def extra_hyperparameters(optimizer: str) -> list[str]:
    """Registry hyperparameters beyond AdamW's (none for the AdamW variants)."""
    if optimizer == "torch-adamw":
        return []
    return sorted(set(_spec(optimizer).defaults) - ADAMW_KEYS)


def _format(coefficients: dict[str, float]) -> str:
    parts = []
    for term, value in coefficients.items():
        if abs(value) < 1e-6:
            continue
        number = f"{value:.4g}"
        if term == "1":
            parts.append(number)
        else:
            sign = {"1": "", "-1": "-"}
            parts.append(f"{sign[number]}{term}" if number in sign else f"{number}·{term}")
    return " + ".join(parts).replace("+ -", "- ") or "0"


def fit_formula(numel: Callable[[tuple[int, ...]], int]) -> str:
    """The state formula of an ``m x n`` matrix from ``numel(shape)`` (see module docstring);
    the values themselves when no exact fit exists."""
    rows, values = [], []
    for m, n in SHAPES:
        rows.append([m * n, m * m, n * n, min(m, n) ** 2, m, n, min(m, n), 1])
        values.append(numel((m, n)))
    a, b = np.array(rows, dtype=float), np.array(values, dtype=float)
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    solution = np.where(np.abs(solution - np.round(solution, 4)) < 1e-6,
                        np.round(solution, 4), solution)
    if not np.allclose(a @ solution, b, rtol=1e-6, atol=0.5):
        return "; ".join(f"{m}x{n}: {v}" for (m, n), v in zip(SHAPES[:3], values[:3]))
    return _format(dict(zip(TERMS, solution.tolist())))


def vector_formula(numel: Callable[[tuple[int, ...]], int]) -> str:
    """The state formula ``a n^2 + b n + c`` of a vector of ``n`` elements."""
    ns = np.array(VECTOR_SIZES, dtype=float)
    values = np.array([numel((int(n),)) for n in VECTOR_SIZES], dtype=float)
    a, b, c = np.polyfit(ns, values, 2)
    if not np.allclose(np.polyval((a, b, c), ns), values, atol=0.5):
        return ", ".join(f"{int(n)}: {int(v)}" for n, v in zip(ns, values))
    return _format({"n^2": round(float(a), 4), "n": round(float(b), 4),
                    "1": round(float(c), 4)})


def decompositions(optimizer: str) -> tuple[list[str], float]:
    """What matrix decompositions one hidden matrix's step computes, and how many per step
    (amortized), from the transform chain at the registry defaults through
    :data:`DECOMPOSITIONS` (the path a 2-D tensor takes with the most)."""
    if optimizer == "torch-adamw":
        return [], 0.0
    from llmvalley.optim.spec import SHELL_DEFAULTS
    from llmvalley.optim.transforms.combine import chain_paths

    spec = _spec(optimizer)
    group = {**SHELL_DEFAULTS, **spec.defaults}
    best: tuple[list[str], float] = ([], 0.0)
    for path in chain_paths(spec.chain(group)):
        found, total = [], 0.0
        for t in path:
            for obj in (t, getattr(t, "projector", None)):
                describe = DECOMPOSITIONS.get(type(obj).__name__) if obj is not None else None
                if describe is not None:
                    what, count = describe(group)
                    found.append(what)
                    total += count
        if total > best[1]:
            best = (found, total)
    return best


def complexity(optimizer: str) -> Complexity:
    """Every registry-derived complexity fact of ``optimizer``."""
    if optimizer == "torch-adamw":
        return Complexity(optimizer, [], "2mn", "2n", [], 0.0)
    spec = _spec(optimizer)

    def numel(shape: tuple[int, ...]) -> int:
        return spec.state_numel(shape)

    try:
        matrix = fit_formula(numel)
    except Exception as exc:  # noqa: BLE001 (a spec that cannot size a shape: say so)
        matrix = f"? ({type(exc).__name__})"
    if spec.applies_to == "matrix":
        vector = "2n (AdamW fallback)"
    else:
        try:
            vector = vector_formula(numel)
        except Exception as exc:  # noqa: BLE001
            vector = f"? ({type(exc).__name__})"
    what, per_step = decompositions(optimizer)
    return Complexity(optimizer, extra_hyperparameters(optimizer), matrix, vector, what,
                      per_step)
