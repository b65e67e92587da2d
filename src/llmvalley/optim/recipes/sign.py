"""Sign-based methods: Lion and Signum."""

from __future__ import annotations

from llmvalley.optim.recipes.common import cautious, require_betas
from llmvalley.optim.registry import OptimizerSpec, Paper, register
from llmvalley.optim.transforms import EMA, ApplyLR, DecoupledWeightDecay, LionDirection, Sign

register(
    OptimizerSpec(
        name="lion",
        family="sign",
        paper=Paper("Symbolic Discovery of Optimization Algorithms (Chen et al.)",
                    "2302.06675", 2023),
        reference="google/automl lion (official); lion-pytorch 0.2.5 on PyPI (tested against)",
        defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, cautious=False),
        build=lambda g: [DecoupledWeightDecay(), LionDirection(), *cautious(g), ApplyLR()],
        structural=("cautious",),
        check=require_betas("lion", 2),
        notes="Language-model settings in the paper: betas=(0.95, 0.98), lr 3-10x below "
        "AdamW's, weight decay 3-10x above. cautious=True gives C-Lion (mask from sign(c)*g).",
    )
)

register(
    OptimizerSpec(
        name="signum",
        family="sign",
        paper=Paper("signSGD: Compressed Optimisation for Non-Convex Problems "
                    "(Bernstein et al., ICML 2018)", "1802.04434", 2018),
        reference="jxbz/signSGD; MXNet mx.optimizer.Signum (official)",
        defaults=dict(lr=1e-2, momentum=0.9, weight_decay=0.0, cautious=False),
        build=lambda g: [
            DecoupledWeightDecay(), EMA("momentum_buffer", beta_key="momentum"), Sign(),
            *cautious(g), ApplyLR(),
        ],
        structural=("cautious",),
        weight_decay="decoupled (p *= 1 - lr*wd), before the update (MXNet's wd_lh)",
        notes="m = momentum*m + (1-momentum)*g from m=0; p -= lr*sign(m) (Algorithm 2). "
        "Defaults lr=0.01, momentum=0.9 as MXNet's Signum. MXNet's coupled `wd` (added to the "
        "gradient before the momentum) is not offered: weight_decay is the decoupled wd_lh.",
    )
)
