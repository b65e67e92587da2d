"""Shell options that change a recipe's chain, for every recipe that can take them.

The full chain of a group is
``[AdaGC clipping?, MARS correction?, coupled L2?] + recipe + [cautious mask?]``:

- ``adagc=True``: AdaGC's per-tensor adaptive gradient clipping (Wang et al., arXiv
  2502.11034) on the gradient, first, where a training loop clips; its options are
  ``adagc_lambda_rel``, ``adagc_beta``, ``adagc_lambda_abs`` and ``adagc_warmup``.

- ``mars=True``: MARS's variance-reduced gradient (Yuan et al., arXiv 2411.10438, the
  approximate form) replaces the gradient before the recipe, so ``adamw`` + ``mars=True`` is
  MARS-AdamW and ``lion`` + ``mars=True`` is MARS-Lion. It uses the recipe's first momentum
  coefficient (``betas[0]``, else ``momentum``) and ``mars_gamma``.
- coupled weight decay (``Decay("coupled")``) adds ``wd * p`` to the (corrected) gradient.
- ``cautious=True``: the cautious mask (Liang et al., arXiv 2411.16085) on the recipe's
  direction, for every recipe, matrix methods included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmvalley.optim.spec import _hashable
from llmvalley.optim.state import group_precision
from llmvalley.optim.transforms.base import Transform
from llmvalley.optim.transforms.combine import KeyMap, assign_keys
from llmvalley.optim.transforms.decay import CoupledWeightDecay
from llmvalley.optim.transforms.mask import Cautious
from llmvalley.optim.transforms.momentum import MARSCorrection
from llmvalley.optim.transforms.stability import AdaptiveGradClip


def _options_key(spec: Any, group: Mapping[str, Any]) -> tuple:
    decay = spec.decay_for(group)
    return (tuple(_hashable(group.get(k)) for k in spec.structural),
            bool(group.get("mars")), bool(group.get("cautious")), decay.form, decay.key,
            bool(group.get("adagc")))


def chain_and_keys(spec: Any, group: Mapping[str, Any]) -> tuple[list[Transform], KeyMap]:
    """The group's full chain (shell options included) and its slot keys, cached on the
    spec."""
    key = _options_key(spec, group)
    cache = spec._full_chains
    if key not in cache:
        pre: list[Transform] = []
        if group.get("adagc"):
            pre.append(AdaptiveGradClip())
        if group.get("mars"):
            pre.append(MARSCorrection(gamma_key="mars_gamma"))
        decay = spec.decay_for(group)
        if decay.form == "coupled":
            pre.append(CoupledWeightDecay(decay.key))
        post: list[Transform] = [Cautious()] if group.get("cautious") else []
        chain = [*pre, *spec.chain(group), *post]
        cache[key] = (chain, assign_keys(chain))
    return cache[key]


def full_chain(spec: Any, group: Mapping[str, Any]) -> list[Transform]:
    return chain_and_keys(spec, group)[0]


def is_plain(spec: Any, group: Mapping[str, Any]) -> bool:
    """No shell option changes ``spec``'s chain or its storage for ``group`` beyond what its
    fused kernel computes itself: the state precisions of its
    :attr:`~llmvalley.optim.spec.OptimizerSpec.fused_state` (as ``state_precision``) and the
    shell options of its :attr:`~llmvalley.optim.spec.OptimizerSpec.fused_options`."""
    fused_state, fused_options = spec.fused_state, spec.fused_options
    precision = group_precision(group)
    return not (any(group.get(k) and k not in fused_options
                    for k in ("mars", "cautious", "adagc"))
                or (precision and not (isinstance(precision, str) and precision in fused_state))
                or group.get("master_weights") is not None)
