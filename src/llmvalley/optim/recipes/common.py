"""Checks shared by recipes."""

from __future__ import annotations

from typing import Any


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
