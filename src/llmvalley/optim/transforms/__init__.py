"""Composable optimizer transforms, grouped by concern.

Each published optimizer in :mod:`llmvalley.optim.recipes` is a short chain of these. A
transform returns a direction (and, through ``ctx.plan``, step scales); it never writes the
parameters: :class:`~llmvalley.optim.shell.ChainOptimizer` does, once.
"""

from llmvalley.optim.transforms.adaptive import (
    ScaleByAdaBelief,
    ScaleByAdam,
    ScaleByAdan,
    ScaleByAdEMAMix,
    ScaleByLaProp,
    ScaleByNAdam,
)
from llmvalley.optim.transforms.base import (
    SlotSpec,
    StepContext,
    StepPlan,
    StepScale,
    Transform,
)
from llmvalley.optim.transforms.combine import (
    Branch,
    InBasis,
    Partition,
    Projector,
    assign_keys,
    run_chain,
)
from llmvalley.optim.transforms.decay import CoupledWeightDecay
from llmvalley.optim.transforms.factored import ScaleByAdafactor, ScaleByCAME
from llmvalley.optim.transforms.mask import Cautious
from llmvalley.optim.transforms.momentum import EMA, HeavyBall, MARSCorrection, NesterovSum
from llmvalley.optim.transforms.normalize import (
    RMSNormalize,
    ScaleBySNR,
    SinkhornNormalize,
    SWANNormalizeWhiten,
)
from llmvalley.optim.transforms.orthogonalize import (
    CoshBrake,
    DionUpdate,
    MuonMomentum,
    NAMOUpdate,
    Orthogonalize,
    RMSRescale,
    ScaleByOrthoSecondMoment,
    ShapeScale,
)
from llmvalley.optim.transforms.qdwh import PolarGradUpdate
from llmvalley.optim.transforms.rotated import FrobeniusNormalize, SingularBasis, TrackedSubspace
from llmvalley.optim.transforms.sign import GradSignTimesMagnitude, LionDirection, Sign

__all__ = [
    "EMA",
    "Branch",
    "Cautious",
    "CoshBrake",
    "CoupledWeightDecay",
    "DionUpdate",
    "FrobeniusNormalize",
    "GradSignTimesMagnitude",
    "HeavyBall",
    "InBasis",
    "LionDirection",
    "MARSCorrection",
    "MuonMomentum",
    "NAMOUpdate",
    "NesterovSum",
    "Orthogonalize",
    "Partition",
    "PolarGradUpdate",
    "Projector",
    "RMSNormalize",
    "RMSRescale",
    "SWANNormalizeWhiten",
    "ScaleByAdaBelief",
    "ScaleByAdafactor",
    "ScaleByAdam",
    "ScaleByAdan",
    "ScaleByAdEMAMix",
    "ScaleByCAME",
    "ScaleByLaProp",
    "ScaleByNAdam",
    "ScaleByOrthoSecondMoment",
    "ScaleBySNR",
    "ShapeScale",
    "Sign",
    "SingularBasis",
    "SinkhornNormalize",
    "SlotSpec",
    "StepContext",
    "StepPlan",
    "StepScale",
    "TrackedSubspace",
    "Transform",
    "assign_keys",
    "run_chain",
]
