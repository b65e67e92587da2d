"""Published optimizers as short recipes over shared transforms, one module per family.

Importing this package registers every recipe.
"""

from llmvalley.optim.recipes import (  # noqa: F401
    adaptive,
    classical,
    factored,
    matrix,
    normalized,
    rotated,
    sign,
)
