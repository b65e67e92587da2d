"""llmvalley: faithful, composable LLM optimizers and a benchmark to compare them.

Quickstart::

    import llmvalley
    opt = llmvalley.create_optimizer("adamw", model, lr=3e-4, weight_decay=0.1)
    print(llmvalley.state_bytes(opt))

The optimizer API is imported from :mod:`llmvalley.optim` on first use, so that importing the
package (``valley --help``, ``valley list``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
_OPTIM_EXPORTS = tuple(n for n in __all__ if n != "__version__")  # from llmvalley.optim
_SUBMODULES = ("bench", "cli", "commands", "data", "models", "optim")

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
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


def __getattr__(name: str) -> Any:
    if name in _OPTIM_EXPORTS:
        value = getattr(importlib.import_module("llmvalley.optim"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"llmvalley.{name}")
    raise AttributeError(f"module 'llmvalley' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_OPTIM_EXPORTS, *_SUBMODULES})
