"""Composable optimizer transforms, grouped by concern.

Each published optimizer in :mod:`llmvalley.optim.recipes` is a short chain of these.
"""

from llmvalley.optim.transforms.adaptive import (
    ScaleByAdaBelief,
    ScaleByAdam,
    ScaleByAdan,
    ScaleByAdEMAMix,
    ScaleByLaProp,
    ScaleByMARS,
    ScaleByNAdam,
)
from llmvalley.optim.transforms.apply import ApplyLR
from llmvalley.optim.transforms.base import StepContext, Transform
from llmvalley.optim.transforms.decay import (
    CoupledWeightDecay,
    DecoupledWeightDecay,
    ProximalWeightDecay,
)
from llmvalley.optim.transforms.factored import ScaleByAdafactor, ScaleByCAME
from llmvalley.optim.transforms.mask import Cautious
from llmvalley.optim.transforms.momentum import EMA, HeavyBall
from llmvalley.optim.transforms.normalize import (
    ScaleBySNR,
    SCALEStep,
    SinkhornNormalize,
    SWANNormalizeWhiten,
)
from llmvalley.optim.transforms.orthogonalize import (
    ApplyScaledLR,
    CoshBrake,
    DionUpdate,
    MuonMomentum,
    NAMOUpdate,
    Orthogonalize,
    RMSRescale,
    ScaleByOrthoSecondMoment,
)
from llmvalley.optim.transforms.qdwh import PolarGradUpdate
from llmvalley.optim.transforms.rotated import COSMOSUpdate, ScaleByConda
from llmvalley.optim.transforms.sign import GradSignTimesMagnitude, LionDirection, Sign

__all__ = [
    "ApplyScaledLR",
    "CoshBrake",
    "COSMOSUpdate",
    "DionUpdate",
    "MuonMomentum",
    "NAMOUpdate",
    "Orthogonalize",
    "PolarGradUpdate",
    "RMSRescale",
    "SCALEStep",
    "ScaleBySNR",
    "ScaleByOrthoSecondMoment",
    "SinkhornNormalize",
    "SWANNormalizeWhiten",
    "ApplyLR",
    "Cautious",
    "CoupledWeightDecay",
    "DecoupledWeightDecay",
    "EMA",
    "GradSignTimesMagnitude",
    "HeavyBall",
    "LionDirection",
    "ProximalWeightDecay",
    "ScaleByAdaBelief",
    "ScaleByAdafactor",
    "ScaleByAdam",
    "ScaleByAdan",
    "ScaleByAdEMAMix",
    "ScaleByCAME",
    "ScaleByConda",
    "ScaleByLaProp",
    "ScaleByMARS",
    "ScaleByNAdam",
    "Sign",
    "StepContext",
    "Transform",
]
