"""Hyperparameter checks shared by every optimizer.

:func:`validate_common` checks the hyperparameters of a group by their conventional names, so
each recipe only validates what is particular to it (its spec's ``check``). Errors are
``ValueError("{optimizer}: invalid {key}={value!r}: {rule}")``, naming the offending key.

A numeric hyperparameter must be a real number: an ``int``, a ``float``, a NumPy scalar or a
1-element real tensor (LR schedulers and tensor learning rates; reading its value may
synchronise with the device). Strings (``lr="0.01"``), bools, complex numbers, ``None`` and
multi-element tensors are refused, and so are ``inf`` and ``nan``. The ranges:

- ``lr``, ``weight_decay``, ``momentum_decay``, ``gamma``, ``alpha``, ``lr_1d``,
  ``weight_decay_1d``, ``clip_threshold``, ``d``: >= 0;
- ``momentum``: in [0, 1) (an EMA or heavy-ball coefficient; 1 never forgets);
- ``dampening``: in [0, 1] (``torch.optim.SGD`` does not check it; outside [0, 1] the
  gradient's weight ``1 - dampening`` would flip sign or exceed 1);
- ``eps``: >= 0, or a tuple/list of such numbers in which ``None`` entries are allowed
  (Adafactor's and CAME's ``(None, 1e-3)`` form);
- ``betas``, ``betas_1d``: a tuple/list whose every entry lies in [0, 1) (the length is the
  recipe's business);
- ``warmup``, ``alpha_warmup``, ``beta3_warmup``: ``None`` or a whole number >= 1;
- ``nonfinite``: one of :data:`NONFINITE_POLICIES`.

Keys that are absent are not checked; other keys are left to the recipes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

#: what the shell does with a non-finite gradient: raise, skip the step, or step anyway
NONFINITE_POLICIES = ("raise", "skip", "ignore")

#: hyperparameters that must be finite numbers >= 0
NONNEGATIVE_KEYS = ("lr", "weight_decay", "momentum_decay", "gamma", "alpha", "lr_1d",
                    "weight_decay_1d", "clip_threshold", "d")
#: hyperparameters that must be None or a whole number >= 1
WARMUP_KEYS = ("warmup", "alpha_warmup", "beta3_warmup")


def _bad(name: str, key: str, value: Any, rule: str) -> ValueError:
    """The error for an invalid hyperparameter (the message names ``key``)."""
    return ValueError(f"{name}: invalid {key}={value!r}: {rule}")


def _is_bool(value: Any) -> bool:
    """A Python, NumPy or tensor bool (``float()`` would read it as 0 or 1)."""
    if isinstance(value, bool):
        return True
    dtype = getattr(value, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype == torch.bool
    return getattr(dtype, "kind", None) == "b"  # NumPy bool scalar or array


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (see :func:`is_number`), else None.

    The result may be ``inf`` or ``nan``; a Python int too large for a float reads as ``inf``.
    """
    if value is None or isinstance(value, (str, bytes)) or _is_bool(value):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        return float(value.item())
    try:
        return float(value)
    except OverflowError:
        return math.inf
    except (TypeError, ValueError):
        return None


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number a numeric hyperparameter may hold: an int, float,
    NumPy scalar or 1-element real tensor, but not a bool or a string. Finiteness is not
    checked (see :func:`validate_common`)."""
    return _number(value) is not None


def _kind(value: Any) -> str | None:
    """What a look-alike non-number is ("a string" ...), for the error message; else None."""
    if isinstance(value, (str, bytes)):
        return "a string"
    if _is_bool(value):
        return "a bool"
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        return f"a tensor of {value.numel()} elements"
    return None


def _check(name: str, key: str, value: Any, expect: str, ok: Callable[[float], bool],
           shown: Any = None) -> None:
    """Raise unless ``value`` is a finite real number for which ``ok`` holds.

    ``expect`` completes "must be ..."; ``shown`` is the value the message prints (the whole
    tuple when ``value`` is one of its entries).
    """
    v = _number(value)
    if v is None or not math.isfinite(v) or not ok(v):
        kind = _kind(value)
        if kind is None:
            why = ""
        else:
            why = f", not {kind}" if shown is None else f" ({value!r} is {kind})"
        raise _bad(name, key, value if shown is None else shown, f"must be {expect}{why}")


def validate_common(name: str, group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of ``group``.

    ``name`` is the optimizer's, for the message. The keys checked and their ranges are listed
    in this module's docstring; a key absent from ``group`` is not checked.
    """
    for key in NONNEGATIVE_KEYS:
        if key in group:
            _check(name, key, group[key], "a finite number >= 0", lambda v: v >= 0)
    if "momentum" in group:
        _check(name, "momentum", group["momentum"], "a finite number in [0, 1)",
               lambda v: 0 <= v < 1)
    if "dampening" in group:
        _check(name, "dampening", group["dampening"], "a finite number in [0, 1]",
               lambda v: 0 <= v <= 1)
    if "eps" in group:
        eps = group["eps"]
        for e in eps if isinstance(eps, (tuple, list)) else (eps,):
            if e is not None:
                _check(name, "eps", e, "a finite number >= 0, or a tuple of them (or None)",
                       lambda v: v >= 0, shown=eps)
    for key in ("betas", "betas_1d"):
        if key in group:
            betas = group[key]
            if not isinstance(betas, (tuple, list)):
                raise _bad(name, key, betas, "must be a tuple of floats in [0, 1)")
            for b in betas:
                _check(name, key, b, "a tuple of finite numbers, each in [0, 1)",
                       lambda v: 0 <= v < 1, shown=betas)
    if group.get("nonfinite", "raise") not in NONFINITE_POLICIES:
        raise _bad(name, "nonfinite", group["nonfinite"], f"must be one of {NONFINITE_POLICIES}")
    for key in WARMUP_KEYS:
        if group.get(key) is not None:
            _check(name, key, group[key], "None or an integer >= 1",
                   lambda v: v >= 1 and v == int(v))
