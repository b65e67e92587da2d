"""llmvalley: faithful, composable LLM optimizers and a benchmark to compare them.

Quickstart::

    import llmvalley
    opt = llmvalley.create_optimizer("adamw", model, lr=3e-4, weight_decay=0.1)
    print(llmvalley.state_bytes(opt))
"""

from llmvalley.optim import (
    ChainOptimizer,
    OptimizerSpec,
    create_optimizer,
    get_spec,
    list_optimizers,
    state_bytes,
)

__version__ = "0.1.0"

__all__ = [
    "ChainOptimizer",
    "OptimizerSpec",
    "__version__",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "state_bytes",
]
