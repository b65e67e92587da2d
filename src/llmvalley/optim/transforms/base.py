"""The transform protocol: the unit every optimizer is built from.

A transform turns a list of *updates* (one tensor per parameter, initially the gradients) into
new updates, optionally reading and writing per-parameter state. Transforms run over whole
lists of tensors (``torch._foreach_*`` style) so one optimizer step is a handful of vectorised
calls, not a Python loop of tiny ops.

A chain ends with a transform that writes the parameters (usually :class:`~.apply.ApplyLR`).
Numeric hyperparameters are read from ``ctx.group`` at every step, so editing
``param_groups`` (or an LR scheduler doing so) takes effect as in ``torch.optim``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Shape = tuple[int, ...]


@dataclass
class StepContext:
    """Everything a transform may need for one parameter group at one step.

    Attributes:
        params: the tensors being optimised, in the compute dtype (a float32 working copy
            for low-precision parameters, the parameters themselves otherwise).
        grads: the gradients in the compute dtype (sign-flipped when ``maximize``).
        states: one state dict per parameter (``optimizer.state[p]``).
        steps: the step number of each parameter, counted from 1 for this step.
        group: the parameter group (hyperparameters).
        names: parameter names for error messages and name-based rules.
    """

    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Any]]
    steps: list[int]
    group: dict[str, Any]
    names: list[str] = field(default_factory=list)

    def zeros(self, i: int, shape: Sequence[int] | None = None) -> Tensor:
        """A zero state tensor for parameter ``i``, in the compute dtype (its shape unless
        ``shape`` is given)."""
        p = self.params[i]
        if shape is None:
            return torch.zeros_like(p, memory_format=torch.contiguous_format)
        return torch.zeros(tuple(shape), dtype=p.dtype, device=p.device)

    def buffers(self, key: str) -> list[Tensor]:
        """The state tensor ``key`` of every parameter, created as zeros on first use."""
        out = []
        for i, st in enumerate(self.states):
            buf = st.get(key)
            if buf is None:
                buf = self.zeros(i)
                st[key] = buf
            out.append(buf)
        return out

    def name(self, i: int) -> str:
        """Parameter ``i``'s name for error messages (``"parameter"`` when unnamed)."""
        return self.names[i] if self.names else "parameter"

    def hp(self, key: str) -> Any:
        """A hyperparameter of this group."""
        return self.group[key]


class Transform:
    """Base class of all transforms.

    Subclasses implement :meth:`__call__` and, when they keep state, :meth:`state_numel`,
    which must agree exactly with the tensors they create (tests check it).
    """

    #: names of per-parameter state tensors this transform owns (part of the checkpoint format)
    state_keys: tuple[str, ...] = ()

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def state_numel(self, shape: Shape, group: dict[str, Any]) -> int:
        """Number of state elements this transform keeps for a parameter of ``shape``."""
        return 0

    def __repr__(self) -> str:
        return type(self).__name__


def numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def bias_corrections(beta: float, steps: list[int]) -> list[float]:
    """``1 - beta**t`` for each step ``t``."""
    return [1.0 - beta**t for t in steps]
