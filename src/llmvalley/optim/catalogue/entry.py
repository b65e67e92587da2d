"""The record the catalogue keeps for each optimizer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Paper:
    """The publication that defines a method."""

    title: str
    arxiv: str
    year: int

    def __str__(self) -> str:
        return f"{self.title} (arXiv {self.arxiv})"


@dataclass(frozen=True)
class Entry:
    """Catalogue metadata of one optimizer."""

    family: str
    paper: Paper
    reference: str
    weight_decay: str = "decoupled (p *= 1 - lr*wd), before the update"
    notes: str = ""
