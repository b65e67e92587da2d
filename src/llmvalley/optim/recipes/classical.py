"""Classical first-order methods."""

from __future__ import annotations

from typing import Any

from llmvalley.optim.fused import fused_sgd
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms import HeavyBall


def _check_sgd(group: dict[str, Any]) -> None:
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("sgd: invalid nesterov=True: requires momentum > 0 and dampening = 0")


SPECS = [
    OptimizerSpec(
        name="sgd",
        defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
        build=lambda g: [HeavyBall()],
        decay=Decay("coupled"),
        fused=fused_sgd,
        check=_check_sgd,
    ),
]
