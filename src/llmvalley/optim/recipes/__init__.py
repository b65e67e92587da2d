"""Published optimizers as short recipes over shared transforms, one module per family.

Importing this package registers every recipe.
"""

from llmvalley.optim.recipes import adaptive, classical, factored, sign  # noqa: F401
