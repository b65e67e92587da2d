"""Hessian-based methods: Sophia (G and H) and AdaHessian.

Each needs more than the step's gradient: a curvature estimate through the shell's protocol
(:meth:`~llmvalley.optim.shell.ChainOptimizer.curvature_request`). AdaFisher is in
:mod:`llmvalley.optim.recipes.fisher`; ARC-LSR1 is not registered (see
:mod:`llmvalley.optim.catalogue.hessian`).
"""

from __future__ import annotations

import math
from typing import Any

from llmvalley.optim.recipes.common import require_betas, require_number, require_positive_int
from llmvalley.optim.spec import Decay, OptimizerSpec
from llmvalley.optim.transforms.hessian import HutchinsonSecondMoment, SophiaClip
from llmvalley.optim.transforms.momentum import EMA
from llmvalley.optim.validation import is_number


def _positive(name: str, group: dict[str, Any], key: str, *, strict: bool = True) -> None:
    if strict:
        require_number(name, group, key, "a finite number > 0",
                       lambda v: math.isfinite(v) and v > 0)
    else:
        require_number(name, group, key, "a finite number >= 0",
                       lambda v: math.isfinite(v) and v >= 0)


# ---- Sophia ------------------------------------------------------------------------------
def _check_sophia(name: str, batch_key: bool):
    betas = require_betas(name, 2)

    def check(group: dict[str, Any]) -> None:
        betas(group)
        _positive(name, group, "rho", strict=False)
        _positive(name, group, "eps")  # the clip divides by rho * bs * h + eps, h may be 0
        if batch_key:
            _positive(name, group, "bs")
        require_positive_int(name, group, "hessian_interval")

    return check


SOPHIA_DEFAULTS = dict(lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1, bs=5120,
                       eps=1e-15, hessian_interval=10)

sophia = OptimizerSpec(
    name="sophia",
    defaults=SOPHIA_DEFAULTS,
    build=lambda group: [SophiaClip("gauss_newton", bs_key="bs")],
    decay=Decay("decoupled"),
    check=_check_sophia("sophia", batch_key=True),
)

sophia_h = OptimizerSpec(
    name="sophia_h",
    defaults=dict(lr=1e-4, betas=(0.965, 0.99), rho=0.01, weight_decay=0.1, eps=1e-15,
                  hessian_interval=10),
    build=lambda group: [SophiaClip("hutchinson", bs_key=None)],
    decay=Decay("decoupled"),
    check=_check_sophia("sophia_h", batch_key=False),
)


# ---- AdaHessian --------------------------------------------------------------------------
def _check_adahessian(group: dict[str, Any]) -> None:
    require_betas("adahessian", 2)(group)
    power = group["hessian_power"]
    if not (is_number(power) and 0.0 <= float(power) <= 1.0):
        raise ValueError(f"adahessian: invalid hessian_power={power!r}: must be in [0, 1]")
    blocks = group["spatial_average_block_size"]
    if not (isinstance(blocks, (tuple, list)) and len(blocks) == 4 and all(
            isinstance(b, int) and not isinstance(b, bool) and (b == -1 or b >= 1)
            for b in blocks)):
        raise ValueError(f"adahessian: invalid spatial_average_block_size={blocks!r}: four "
                         "block sizes (1-D, 2-D, 3-D, 4-D tensors), each -1 or an integer >= 1")


adahessian = OptimizerSpec(
    name="adahessian",
    defaults=dict(lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0,
                  spatial_average_block_size=(-1, -1, -1, -1)),
    build=lambda group: [EMA("exp_avg", debias=True), HutchinsonSecondMoment()],
    decay=Decay("decoupled"),
    check=_check_adahessian,
)


SPECS: list[OptimizerSpec] = [sophia, sophia_h, adahessian]
