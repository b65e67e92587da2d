"""Sign-based methods: Lion and Signum."""

from __future__ import annotations

from llmvalley.optim.fused import fused_lowbit_lion
from llmvalley.optim.recipes.common import require_betas
from llmvalley.optim.spec import OptimizerSpec
from llmvalley.optim.transforms import EMA, LionDirection, Sign

SPECS = [
    OptimizerSpec(
        name="lion",
        defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0),
        build=lambda g: [LionDirection()],
        fused=fused_lowbit_lion,
        fused_state=("bf16",),
        check=require_betas("lion", 2),
    ),
    OptimizerSpec(
        name="lion8bit",
        defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, state_precision="int8"),
        build=lambda g: [LionDirection()],
        fused=fused_lowbit_lion,
        fused_state=("int8", "int4", "bf16"),
        check=require_betas("lion8bit", 2),
    ),
    OptimizerSpec(
        name="signum",
        defaults=dict(lr=1e-2, momentum=0.9, weight_decay=0.0),
        build=lambda g: [EMA("momentum_buffer", beta_key="momentum"), Sign()],
    ),
]
