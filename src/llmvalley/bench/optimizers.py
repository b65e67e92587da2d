"""Building the optimizer of a run: any registry name, or ``torch-adamw`` as the peer baseline."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmvalley.cli import UsageError
from llmvalley.optim import create_optimizer, get_spec

PEER_BASELINE = "torch-adamw"


def torch_adamw(model: nn.Module, lr: float, weight_decay: float | None = None,
                **kwargs: Any) -> torch.optim.AdamW:
    """Unmodified ``torch.optim.AdamW`` (fused where available); weight decay applies to
    parameters with 2 or more dimensions only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    wd = 0.01 if weight_decay is None else weight_decay  # torch's default
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # fused unsupported for this device/dtype
        return torch.optim.AdamW(groups, lr=lr, **kwargs)


def build_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float | None,
                    opt_args: dict[str, Any], fallback_args: dict[str, Any]
                    ) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``model``; user errors become one-line UsageErrors.

    ``fallback_args`` (``--fallback-arg``) merge with the method's documented fallback
    settings (the spec's ``fallback_hparams``, e.g. Muon's betas (0.9, 0.95), eps 1e-10,
    weight decay 0): the keys given replace those, the others stay.
    """
    hparams: dict[str, Any] = {"lr": lr, **opt_args}
    if weight_decay is not None:
        hparams["weight_decay"] = weight_decay
    if name == PEER_BASELINE:
        if fallback_args:
            raise UsageError("--fallback-arg applies to matrix-only methods, not torch-adamw")
        try:
            return torch_adamw(model, **hparams)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"bad hyperparameters for torch-adamw: {exc}") from None
    try:
        if fallback_args:
            hparams["fallback_hparams"] = fallback_hparams(name, fallback_args)
        return create_optimizer(name, model, **hparams)
    except (KeyError, ValueError, TypeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise UsageError(f"cannot build optimizer {name!r}: {message}") from None


def fallback_hparams(name: str, fallback_args: dict[str, Any]) -> dict[str, Any]:
    """The AdamW fallback settings of ``name``: its spec's documented ``fallback_hparams``
    overlaid with the user's ``fallback_args`` (AdamW's registry defaults fill the rest)."""
    return {**(get_spec(name).fallback_hparams or {}), **fallback_args}
