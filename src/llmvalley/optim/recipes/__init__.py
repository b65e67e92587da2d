"""Published optimizers as short recipes over shared transforms, one module per family.

Each module lists its specs in ``SPECS``; the registry collects :data:`ALL_SPECS` (recipes
never import the registry). Behaviour only: papers, references and notes are in
:mod:`llmvalley.optim.catalogue`.
"""

from llmvalley.optim.recipes import (
    adaptive,
    classical,
    factored,
    matrix,
    normalized,
    rotated,
    sign,
)

ALL_SPECS = [
    *classical.SPECS, *adaptive.SPECS, *sign.SPECS, *factored.SPECS, *matrix.SPECS,
    *normalized.SPECS, *rotated.SPECS,
]
