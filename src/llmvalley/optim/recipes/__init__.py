"""Published optimizers as short recipes over shared transforms, one module per family.

Each module lists its specs in ``SPECS``; the registry collects :data:`ALL_SPECS` (recipes
never import the registry). Behaviour only: papers, references and notes are in
:mod:`llmvalley.optim.catalogue`.
"""

from llmvalley.optim.recipes import (
    adaptive,
    adaptive_variants,
    classical,
    factored,
    fisher,
    hessian,
    kronecker,
    lowrank,
    matrix,
    normalized,
    ranger,
    rotated,
    schedule_free,
    sign,
    stability,
    subspace,
    wrappers,
)

ALL_SPECS = [
    *classical.SPECS, *adaptive.SPECS, *sign.SPECS, *factored.SPECS, *matrix.SPECS,
    *normalized.SPECS, *rotated.SPECS, *adaptive_variants.SPECS, *stability.SPECS,
    *schedule_free.SPECS, *wrappers.SPECS, *lowrank.SPECS, *subspace.SPECS, *kronecker.SPECS,
    *hessian.SPECS, *ranger.SPECS, *fisher.SPECS,
]
