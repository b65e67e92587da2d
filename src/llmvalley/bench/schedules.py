"""Learning-rate schedules as multipliers of the peak learning rate.

Every schedule starts with a linear warmup from ``1/warmup`` to 1 over ``warmup_steps`` updates;
then:

- ``cosine``: half a cosine from 1 down to ``min_ratio`` at the last step;
- ``wsd`` (warmup-stable-decay): 1 until the last ``decay_fraction`` of all steps, then a linear
  decay to ``min_ratio`` at the last step;
- ``linear``: a straight line from 1 down to ``min_ratio`` at the last step;
- ``constant``: 1.

``step`` is the 0-based index of the update about to be taken, so a schedule is a pure function
of the step (resuming needs no scheduler state).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "linear", "constant")


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """The factor applied to each parameter group's peak learning rate at update ``step``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_start = max(warmup_steps, total_steps - round(decay_fraction * total_steps))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total_steps - 1 - decay_start)
        return 1.0 - (1.0 - min_ratio) * min(progress, 1.0)
    progress = min((step - warmup_steps) / max(1, total_steps - 1 - warmup_steps), 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
