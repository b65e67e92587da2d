"""Adaptive (second-moment) methods: Adam and its published relatives."""

from __future__ import annotations

from typing import Any

import torch

from llmvalley.optim.recipes.common import cautious, require_betas
from llmvalley.optim.registry import OptimizerSpec, Paper, register
from llmvalley.optim.transforms import (
    ApplyLR,
    CoupledWeightDecay,
    DecoupledWeightDecay,
    GradSignTimesMagnitude,
    ProximalWeightDecay,
    ScaleByAdaBelief,
    ScaleByAdam,
    ScaleByAdan,
    ScaleByAdEMAMix,
    ScaleByLaProp,
    ScaleByMARS,
    ScaleByNAdam,
)
from llmvalley.optim.transforms.base import StepContext

ADAM_PAPER = Paper("Adam: A Method for Stochastic Optimization (Kingma & Ba)", "1412.6980", 2014)
FUSED_DEVICES = ("cpu", "cuda")


def _fused_adam(decoupled: bool):
    """Fast path: torch's fused Adam/AdamW kernel, when the group's chain is exactly that.

    Used unless ``fused=False``, ``cautious=True``, or the tensors are not all on one CPU/CUDA
    device in one floating dtype; the differential tests run both paths.
    """

    def run(ctx: StepContext) -> bool:
        group = ctx.group
        if group["fused"] is False or group["cautious"]:
            return False
        first = ctx.params[0]
        if first.device.type not in FUSED_DEVICES or not first.is_floating_point():
            return False
        for p, g in zip(ctx.params, ctx.grads):
            if p.dtype != first.dtype or g.dtype != first.dtype or p.device != first.device:
                return False
            if not (p.is_contiguous() and g.is_contiguous()):  # the kernel assumes dense
                return False
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        steps = {t: torch.tensor(float(t), device=first.device) for t in set(ctx.steps)}
        kernel(
            ctx.params,
            ctx.grads,
            ctx.buffers("exp_avg"),
            ctx.buffers("exp_avg_sq"),
            ctx.buffers("max_exp_avg_sq") if amsgrad else [],
            [steps[t] for t in ctx.steps],
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            amsgrad=amsgrad,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )
        return True

    return run


ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, cautious=False,
                     fused=None)

register(
    OptimizerSpec(
        name="adam",
        family="adaptive",
        paper=ADAM_PAPER,
        reference="torch.optim.Adam",
        defaults=dict(ADAM_DEFAULTS, weight_decay=0.0),
        build=lambda g: [CoupledWeightDecay(), ScaleByAdam(), *cautious(g), ApplyLR()],
        weight_decay="coupled L2 (g += wd*p), as torch.optim.Adam",
        structural=("cautious",),
        fused=_fused_adam(decoupled=False),
        check=require_betas("adam", 2),
        notes="fused=None uses torch's fused kernel when it applies (same math); "
        "cautious=True masks the update (C-Adam).",
    )
)

register(
    OptimizerSpec(
        name="adamw",
        family="adaptive",
        paper=Paper("Decoupled Weight Decay Regularization (Loshchilov & Hutter)",
                    "1711.05101", 2017),
        reference="torch.optim.AdamW",
        defaults=dict(ADAM_DEFAULTS, weight_decay=1e-2),
        build=lambda g: [DecoupledWeightDecay(), ScaleByAdam(), *cautious(g), ApplyLR()],
        structural=("cautious",),
        fused=_fused_adam(decoupled=True),
        check=require_betas("adamw", 2),
        notes="cautious=True gives C-AdamW (Liang et al., arXiv 2411.16085) with torch's eps "
        "form; the mask comes from the update's sign, not exp_avg**2.",
    )
)

register(
    OptimizerSpec(
        name="nadam",
        family="adaptive",
        paper=Paper("Incorporating Nesterov Momentum into Adam (Dozat, ICLR workshop 2016)",
                    "n/a", 2016),
        reference="torch.optim.NAdam",
        defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                      momentum_decay=4e-3, decoupled_weight_decay=False, cautious=False),
        build=lambda g: [
            DecoupledWeightDecay() if g["decoupled_weight_decay"] else CoupledWeightDecay(),
            ScaleByNAdam(), *cautious(g), ApplyLR(),
        ],
        weight_decay="coupled L2 by default; decoupled_weight_decay=True gives NAdamW",
        structural=("cautious", "decoupled_weight_decay"),
        check=require_betas("nadam", 2),
    )
)

register(
    OptimizerSpec(
        name="adabelief",
        family="adaptive",
        paper=Paper("AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed "
                    "Gradients (Zhuang et al., NeurIPS 2020)", "2010.07468", 2020),
        reference="juntang-zhuang/Adabelief-Optimizer; adabelief-pytorch 0.2.1 (tested against)",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False,
                      weight_decouple=True, fixed_decay=False, rectify=True,
                      degenerated_to_sgd=True, cautious=False),
        build=lambda g: [
            (DecoupledWeightDecay(lr_scaled=not g["fixed_decay"]) if g["weight_decouple"]
             else CoupledWeightDecay()),
            ScaleByAdaBelief(), *cautious(g), ApplyLR(),
        ],
        weight_decay="decoupled (p *= 1 - lr*wd, or 1 - wd with fixed_decay) before the "
        "update; weight_decouple=False gives coupled L2",
        structural=("cautious", "weight_decouple", "fixed_decay"),
        check=require_betas("adabelief", 2),
        notes="With amsgrad and rectify together the running maximum is used in the "
        "rectified branch too (the reference silently ignores it there).",
    )
)


def _adan_chain(group: dict[str, Any]) -> list:
    if group["no_prox"]:
        return [DecoupledWeightDecay(), ScaleByAdan(), *cautious(group), ApplyLR()]
    return [ScaleByAdan(), *cautious(group), ApplyLR(), ProximalWeightDecay()]


register(
    OptimizerSpec(
        name="adan",
        family="adaptive",
        paper=Paper("Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep "
                    "Models (Xie et al.)", "2208.06677", 2022),
        reference="sail-sg/Adan (adan.py)",
        defaults=dict(lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                      no_prox=False, cautious=False),
        build=_adan_chain,
        weight_decay="proximal after the update (p /= 1 + lr*wd); no_prox=True: decoupled "
        "before",
        structural=("cautious", "no_prox"),
        check=require_betas("adan", 3),
        notes="betas follow the code's convention (1 minus the paper's). The reference's "
        "max_grad_norm option is not offered: clip the gradients before step() instead, "
        "which gives identical results (the clipped gradient is what Adan stores).",
    )
)

register(
    OptimizerSpec(
        name="laprop",
        family="adaptive",
        paper=Paper("LaProp: Separating Momentum and Adaptivity in Adam (Ziyin, Wang, Ueda)",
                    "2002.04839", 2020),
        reference="Z-T-WANG/LaProp-Optimizer (laprop.py)",
        defaults=dict(lr=4e-4, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0, amsgrad=False,
                      cautious=False),
        build=lambda g: [
            ScaleByLaProp(), *cautious(g), ApplyLR(), DecoupledWeightDecay(lr_scaled=False),
        ],
        weight_decay="decoupled, NOT scaled by lr (p -= wd*p), after the update, as the "
        "official code",
        structural=("cautious",),
        check=require_betas("laprop", 2),
        notes="The reference's `centered` option is not offered (it references undefined "
        "variables and cannot run).",
    )
)

register(
    OptimizerSpec(
        name="ademamix",
        family="adaptive",
        paper=Paper("The AdEMAMix Optimizer: Better, Faster, Older (Pagliardini et al.)",
                    "2409.03113", 2024),
        reference="apple/ml-ademamix (pytorch/ademamix.py)",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=8.0, beta3_warmup=None,
                      alpha_warmup=None, eps=1e-8, weight_decay=0.0, cautious=False),
        build=lambda g: [ScaleByAdEMAMix(), *cautious(g), DecoupledWeightDecay(), ApplyLR()],
        weight_decay="decoupled, lr-scaled, on the pre-update parameters (u += wd*p)",
        structural=("cautious",),
        check=require_betas("ademamix", 3),
        notes="alpha=8 is the README's language-model setting (the code's default is 2); the "
        "paper sets alpha_warmup = beta3_warmup = the total number of steps.",
    )
)


def _check_mars(group: dict[str, Any]) -> None:
    require_betas("mars", 2)(group)
    if len(group["betas_1d"]) != 2:
        raise ValueError(f"mars: invalid betas_1d={group['betas_1d']!r}: expected 2 values")


register(
    OptimizerSpec(
        name="mars",
        family="adaptive",
        paper=Paper("MARS: Unleashing the Power of Variance Reduction for Training Large "
                    "Models (Yuan et al.)", "2411.10438", 2024),
        reference="AGI-Arena/MARS (MARS/optimizers/mars.py, mars_type='mars-adamw', "
        "is_approx=True)",
        defaults=dict(lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0, gamma=0.025,
                      optimize_1d=False, lr_1d=3e-3, betas_1d=(0.9, 0.95),
                      weight_decay_1d=0.1, cautious=False),
        build=lambda g: [ScaleByMARS(), *cautious(g), ApplyLR()],
        weight_decay="decoupled, lr-scaled, inside the update (u += wd*p)",
        structural=("cautious",),
        decay_keys=("weight_decay", "weight_decay_1d"),
        check=_check_mars,
        notes="The reference stores a reference to p.grad as last_grad (wrong when gradients "
        "are zeroed in place); a copy is kept here. Non-2-D parameters take the reference's "
        "AdamW branch unless optimize_1d=True.",
    )
)

register(
    OptimizerSpec(
        name="grams",
        family="adaptive",
        paper=Paper("Grams: Gradient Descent with Adaptive Momentum Scaling (Cao, Li, Song)",
                    "2412.17107", 2024),
        reference="Gunale0926/Grams; grams-pytorch 0.0.2 (tested against)",
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0),
        build=lambda g: [
            DecoupledWeightDecay(), ScaleByAdam(eps_form="hf"), GradSignTimesMagnitude(),
            ApplyLR(),
        ],
        check=require_betas("grams", 2),
        notes="HF epsilon form, as the reference. The reference overwrites p.grad with "
        "sign(g)*|m|; here the gradient is left untouched.",
    )
)
