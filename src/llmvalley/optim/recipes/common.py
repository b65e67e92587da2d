"""Checks shared by recipes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from llmvalley.optim.validation import is_number


def require_betas(name: str, count: int):
    """A check that ``betas`` has exactly ``count`` entries."""

    def check(group: dict[str, Any]) -> None:
        betas = group["betas"]
        if len(betas) != count:
            raise ValueError(
                f"{name}: invalid betas={tuple(betas)!r}: expected {count} values"
            )

    return check


def require_positive_int(name: str, group: dict[str, Any], key: str) -> None:
    """Raise ValueError naming ``key`` unless ``group[key]`` (when present) is an int >= 1."""
    if key not in group:
        return
    value = group[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: invalid {key}={value!r}: an integer >= 1")


def require_number(name: str, group: dict[str, Any], key: str, rule: str,
                   ok: Callable[[float], bool] = lambda v: True) -> None:
    """Raise ValueError naming ``key`` unless ``group[key]`` is a real number for which ``ok``
    holds (``rule`` says which, in words: "a number >= 0"; NaN fails every comparison)."""
    value = group[key]
    if not is_number(value) or math.isnan(float(value)) or not ok(float(value)):
        raise ValueError(f"{name}: invalid {key}={value!r}: must be {rule}")


def require_flag(name: str, group: dict[str, Any], key: str) -> None:
    """Raise ValueError naming ``key`` unless ``group[key]`` is True or False."""
    if not isinstance(group[key], bool):
        raise ValueError(f"{name}: invalid {key}={group[key]!r}: must be True or False")


def require_count(name: str, group: dict[str, Any], key: str, minimum: int = 0) -> None:
    """Raise ValueError naming ``key`` unless ``group[key]`` is an integer >= ``minimum``."""
    value = group[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: invalid {key}={value!r}: an integer >= {minimum}")
