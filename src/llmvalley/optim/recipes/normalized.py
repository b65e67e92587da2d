"""Stateless and minimal-state normalized methods: SWAN, SinkGD, SCALE, SGD-SaI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmvalley.optim.recipes.common import require_positive_int
from llmvalley.optim.spec import OptimizerSpec
from llmvalley.optim.transforms import (
    EMA,
    Branch,
    Partition,
    RMSNormalize,
    ScaleByAdam,
    ScaleBySNR,
    SinkhornNormalize,
    SWANNormalizeWhiten,
)


def _check_swan(group: dict[str, Any]) -> None:
    if group.get("whitening") not in ("newton_schulz", "svd"):
        raise ValueError(f"swan: invalid whitening={group.get('whitening')!r}: "
                         "'newton_schulz' or 'svd'")
    require_positive_int("swan", group, "ns_steps")


def _check_sinkgd(group: dict[str, Any]) -> None:
    require_positive_int("sinkgd", group, "sinkhorn_steps")


HEAD_NAME = "lm_head"
EMBED_NAME = "embed_tokens"


def scale_role(shape: tuple, group: Mapping[str, Any], name: str = "") -> str:
    """SCALE's rule (OptimAI-Lab/Minimalist_LLM_Pretraining ``SCALE``): < 2-D tensors take
    AdamW; the output layer (``momentum_layer=True``, or by default a name containing
    ``lm_head``) normalizes a momentum; ``embed_tokens`` normalizes columns, the rest rows."""
    if len(shape) < 2:
        return "vector"
    flag = group.get("momentum_layer")
    head = HEAD_NAME in name if flag is None else bool(flag)
    embed = EMBED_NAME in name
    return ("head" if head else "matrix") + ("_embed" if embed else "")


def _scale_chain(group: Mapping[str, Any]) -> list:
    def head(dim: int) -> list:
        return [EMA("exp_avg", beta_key="momentum"), RMSNormalize(dim)]

    return [Partition(scale_role, {
        "matrix": [RMSNormalize(1)],
        "matrix_embed": [RMSNormalize(0)],
        "head": head(1),
        "head_embed": head(0),
        # the reference's HF-style AdamW, at lr * adam_lr_ratio (decay at that rate too); the
        # default ratio 20 is the reference's LLaMA 60M-350M scripts' (adam_lr 2e-2, lr 1e-3)
        "vector": Branch([ScaleByAdam(eps_form="hf")],
                         aliases={"betas": "betas_1d", "eps": "eps_1d"},
                         lr_mult=lambda g: float(g["adam_lr_ratio"])),
    })]


SPECS = [
    OptimizerSpec(
        name="swan",
        defaults=dict(lr=1e-3, weight_decay=0.0, eps=1e-8, whitening="newton_schulz",
                      ns_steps=10, rescale=True),
        build=lambda g: [SWANNormalizeWhiten()],
        applies_to="matrix",
        check=_check_swan,
    ),
    OptimizerSpec(
        name="sinkgd",
        defaults=dict(lr=1e-3, weight_decay=0.0, sinkhorn_steps=5),
        build=lambda g: [SinkhornNormalize()],
        applies_to="matrix",
        check=_check_sinkgd,
    ),
    OptimizerSpec(
        name="scale",
        defaults=dict(lr=1e-3, momentum=0.9, weight_decay=0.0, momentum_layer=None,
                      adam_lr_ratio=20.0, betas_1d=(0.9, 0.999), eps_1d=1e-8),
        build=_scale_chain,
        rules=((r"(^|\.)lm_head(\.|$)", {"momentum_layer": True}),),
        legacy_keys={"moment1": "exp_avg", "moment2": "exp_avg_sq"},
    ),
    OptimizerSpec(
        name="sgd_sai",
        defaults=dict(lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2),
        build=lambda g: [ScaleBySNR()],
    ),
]
