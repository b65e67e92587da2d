"""Stateless and minimal-state normalized methods: SWAN, SinkGD, SCALE, SGD-SaI."""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import require_positive_int
from llmvalley.optim.registry import OptimizerSpec, Paper, register
from llmvalley.optim.transforms import ApplyLR, DecoupledWeightDecay
from llmvalley.optim.transforms.normalize import (
    ScaleBySNR,
    SCALEStep,
    SinkhornNormalize,
    SWANNormalizeWhiten,
)


def _check_swan(group: dict[str, Any]) -> None:
    if group.get("whitening") not in ("newton_schulz", "svd"):
        raise ValueError(f"swan: invalid whitening={group.get('whitening')!r}: "
                         "'newton_schulz' or 'svd'")
    require_positive_int("swan", group, "ns_steps")


register(
    OptimizerSpec(
        name="swan",
        family="normalized",
        paper=Paper("SWAN: SGD with Normalization and Whitening Enables Stateless LLM "
                    "Training (Ma, Gong, Scetbon, Meeds, ICML 2025)", "2412.13148", 2024),
        reference="none released (paper's Algorithms 1-3); tested against an independent "
        "reference from the equations",
        defaults=dict(lr=1e-3, weight_decay=0.0, eps=1e-8, whitening="newton_schulz",
                      ns_steps=10, rescale=True),
        build=lambda g: [DecoupledWeightDecay(), SWANNormalizeWhiten(), ApplyLR()],
        applies_to="matrix",
        check=_check_swan,
        notes="No official code: equations from the paper. GradNorm standardizes each row over "
        "the d_in columns (biased std + eps); GradWhitening (G G^T)^{-1/2} G on the short side "
        "by coupled Newton-Schulz (ns_steps) or exactly (whitening='svd'); rescale=True "
        "restores ||GradNorm(G)||_F (update RMS 1). [unverified] lr, eps and ns_steps are "
        "not fixed by a reference implementation; third-party ports disagree (not used).",
    )
)


def _check_sinkgd(group: dict[str, Any]) -> None:
    require_positive_int("sinkgd", group, "sinkhorn_steps")


register(
    OptimizerSpec(
        name="sinkgd",
        family="normalized",
        paper=Paper("Gradient Multi-Normalization for Stateless and Scalable LLM Training "
                    "(Scetbon et al.)", "2502.06742", 2025),
        reference="none released (paper's SR-Sinkhorn); tested against an independent "
        "reference from the equations",
        defaults=dict(lr=1e-3, weight_decay=0.0, sinkhorn_steps=5),
        build=lambda g: [DecoupledWeightDecay(), SinkhornNormalize(), ApplyLR()],
        applies_to="matrix",
        check=_check_sinkgd,
        notes="No official code: equations from the paper. L = sinkhorn_steps rounds of "
        "X <- sqrt(n) diag(||X_i,:||)^-1 X then X <- sqrt(m) X diag(||X_:,j||)^-1; "
        "W <- W - lr X (entries of RMS about 1, so Adam-scale learning rates). [unverified] "
        "the paper's learning rate (a third-party port uses 0.05x the global lr for these "
        "layers).",
    )
)

register(
    OptimizerSpec(
        name="scale",
        family="normalized",
        paper=Paper("SCALE: Stochastic Column-normalized Last-layer Momentum (Glentis et al.)",
                    "2506.16659", 2025),
        reference="OptimAI-Lab/Minimalist_LLM_Pretraining (mem_eff_pt/pt_scale/"
        "scale_optimizer.py); tested against an independent reference from that code's rules",
        defaults=dict(lr=1e-3, momentum=0.9, weight_decay=0.0, momentum_layer=None,
                      adam_lr_ratio=1.0, betas_1d=(0.9, 0.999), eps_1d=1e-8),
        build=lambda g: [SCALEStep()],
        applies_to="any",
        rules=((r"(^|\.)lm_head(\.|$)", {"momentum_layer": True}),),
        notes="Covers every parameter itself: >= 2-D weights take row-RMS-normalized "
        "gradients (embed_tokens: column-normalized, chosen by name); the output layer "
        "(momentum_layer=True; by default a name containing 'lm_head', and create_optimizer "
        "puts it in its own group) normalizes an EMA momentum (beta 0.9); < 2-D parameters "
        "take the reference's HF-style AdamW at lr * adam_lr_ratio (adam_lr / max_lr in the "
        "reference, so it follows the schedule). Memory: the head momentum plus Adam "
        "moments of the 1-D parameters.",
    )
)

register(
    OptimizerSpec(
        name="sgd_sai",
        family="normalized",
        paper=Paper("No More Adam: Learning Rate Scaling at Initialization is All You Need "
                    "(Xu et al.)", "2412.11768", 2024),
        reference="AnonymousAlethiometer/SGD_SaI; sgd-sai 1.0.3 (tested against)",
        defaults=dict(lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2),
        build=lambda g: [DecoupledWeightDecay(), ScaleBySNR(), ApplyLR()],
        applies_to="any",
        notes="gsnr = ||g0|| / (std(g0) + eps) from each tensor's first gradient, frozen; "
        "b = g0 then b = mu b + (1-mu) g; p *= 1 - lr wd; p -= lr gsnr b. momentum=0 works "
        "here (the reference fails on it). One-element tensors get gsnr = 1 (the reference's "
        "|g|/eps, about 1e8, diverges).",
    )
)
