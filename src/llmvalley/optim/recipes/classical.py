"""Classical first-order methods."""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import cautious
from llmvalley.optim.registry import OptimizerSpec, Paper, register
from llmvalley.optim.transforms import ApplyLR, CoupledWeightDecay, HeavyBall


def _check_sgd(group: dict[str, Any]) -> None:
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("sgd: invalid nesterov=True: requires momentum > 0 and dampening = 0")


register(
    OptimizerSpec(
        name="sgd",
        family="classical",
        paper=Paper("On the importance of initialization and momentum in deep learning "
                    "(Sutskever et al., ICML 2013)", "n/a", 2013),
        reference="torch.optim.SGD",
        defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                      cautious=False),
        build=lambda g: [CoupledWeightDecay(), HeavyBall(), *cautious(g), ApplyLR()],
        weight_decay="coupled L2 (g += wd*p), as torch.optim.SGD",
        structural=("cautious",),
        check=_check_sgd,
    )
)
