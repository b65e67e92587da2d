"""Run metrics: loss spikes, divergence, peak memory and optimizer-state bytes.

Loss spike: a training loss above ``median + k * MAD`` of the previous ``window`` losses
(median absolute deviation, floored at 0.1% of the median so a flat loss cannot make every
wiggle a spike), with ``window=50`` and ``k=6``; consecutive spiking steps count as one spike.
Nothing is flagged before the window is full.

Divergence: a non-finite loss or gradient norm at any step, or, after warmup, a smoothed training
loss (mean of the last 10 steps) more than 5% above the loss of the first step. Smoothing and
margin keep a run that merely has not started learning (loss flat near ln(vocab), batch noise
above and below) from counting as diverged.
"""

from __future__ import annotations

import math
import resource
import sys
from collections import deque

import numpy as np
import torch

SPIKE_WINDOW = 50
SPIKE_K = 6.0
MAD_FLOOR = 1e-3
DIVERGENCE_WINDOW = 10
DIVERGENCE_MARGIN = 0.05


class SpikeCounter:
    """Counts loss spikes (rolling median + k MAD rule, see the module docstring)."""

    def __init__(self, window: int = SPIKE_WINDOW, k: float = SPIKE_K) -> None:
        self.window = window
        self.k = k
        self.history: deque[float] = deque(maxlen=window)
        self.count = 0
        self.in_spike = False
        self.steps: list[int] = []  # first step of each spike

    def update(self, step: int, loss: float) -> bool:
        """Record ``loss`` at ``step``; return whether it is a spike."""
        spike = False
        if len(self.history) == self.window and math.isfinite(loss):
            median = float(np.median(self.history))
            mad = float(np.median(np.abs(np.asarray(self.history) - median)))
            spike = loss > median + self.k * max(mad, MAD_FLOOR * abs(median))
        if spike and not self.in_spike:
            self.count += 1
            self.steps.append(step)
        self.in_spike = spike
        if math.isfinite(loss):
            self.history.append(loss)
        return spike

    def state_dict(self) -> dict:
        return {"history": list(self.history), "count": self.count, "in_spike": self.in_spike,
                "steps": list(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.count, self.in_spike, self.steps = state["count"], state["in_spike"], state["steps"]


def divergence_reason(step: int, loss: float, grad_norm: float, initial_loss: float | None,
                      warmup_steps: int, recent_losses: list[float]) -> str | None:
    """Why the run counts as diverged at ``step`` (1-based), or None when it has not.

    ``recent_losses`` are the training losses of the last steps, ``loss`` included; their mean
    over the last ``DIVERGENCE_WINDOW`` is compared with the first step's loss.
    """
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if not math.isfinite(grad_norm):
        return f"non-finite gradient norm ({grad_norm})"
    if initial_loss is not None and step > warmup_steps and recent_losses:
        window = recent_losses[-DIVERGENCE_WINDOW:]
        smoothed = sum(window) / len(window)
        if smoothed > initial_loss * (1 + DIVERGENCE_MARGIN):
            return (f"mean loss of the last {len(window)} steps {smoothed:.4f} is more than "
                    f"{DIVERGENCE_MARGIN:.0%} above the initial loss {initial_loss:.4f} "
                    "after warmup")
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set size
    (for the whole process, so in-process sweeps see a running maximum)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def tensor_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in ``optimizer.state`` (numel * element size)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, *, from_registry: bool) -> int:
    """Exact optimizer-state bytes: ``llmvalley.state_bytes`` for registry optimizers (when the
    library provides it), the tensor count of ``optimizer.state`` otherwise."""
    import llmvalley

    counter = getattr(llmvalley, "state_bytes", None)
    if from_registry and counter is not None:
        return int(counter(optimizer))
    return tensor_state_bytes(optimizer)


def bits_per_byte(loss_nats: float, tokens_per_byte: float) -> float:
    """Convert a per-token loss in nats to bits per UTF-8 byte of text."""
    return loss_nats * tokens_per_byte / math.log(2)


def perplexity(loss_nats: float) -> float:
    """exp(loss), capped to avoid overflow."""
    return math.exp(min(loss_nats, 700.0))
