"""llmvalley: faithful, composable LLM optimizers and a benchmark to compare them.

Quickstart::

    import llmvalley
    opt = llmvalley.create_optimizer("adamw", model, lr=3e-4, weight_decay=0.1)
    print(llmvalley.state_bytes(opt))
"""

from llmvalley.optim import (
    ChainOptimizer,
    Decay,
    OptimizerSpec,
    create_optimizer,
    get_spec,
    list_optimizers,
    register,
    spec_from_chain,
    state_bytes,
)

__version__ = "0.2.0"

__all__ = [
    "ChainOptimizer",
    "Decay",
    "OptimizerSpec",
    "__version__",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "register",
    "spec_from_chain",
    "state_bytes",
]
