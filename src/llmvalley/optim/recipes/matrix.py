"""Matrix (orthogonalized) optimizers: Muon, AdaMuon, NAMO, NAMO-D, AuON, Hybrid-AuON, Dion,
PolarGrad.

All apply to hidden weight matrices (``applies_to="matrix"``); ``create_optimizer(name,
model)`` routes embeddings, the output head, norms and biases to AdamW with the reference's
auxiliary settings (each spec's ``fallback_hparams``). Conv kernels (with
``matrix_ndim=">=2"``) are viewed as ``(out, -1)`` matrices.

Orthogonalization options shared by the Muon family (see
:mod:`llmvalley.optim.transforms.orthogonalize`): ``orthogonalizer`` (``"newton_schulz"``,
``"polar_express"``, ``"svd"``), ``ns_steps``, ``ns_coefficients``, ``ns_eps`` (the Frobenius
normalisation guard, torch.optim.Muon's ``eps``), ``ns_dtype`` (None: bf16 on CUDA, the
update's dtype elsewhere). ``shape_scale`` picks the update-scale convention: ``"keller"``
``sqrt(max(1, m/n))``, ``"moonlight"`` ``0.2 sqrt(max(m, n))``, ``"dion"`` ``sqrt(m/n)``,
``"none"``, or ``"rms"`` (rescale to RMS ``rms_target``); torch's ``"original"`` and
``"match_rms_adamw"`` are accepted as aliases.
"""

from __future__ import annotations

from typing import Any

from llmvalley.optim.recipes.common import require_positive_int
from llmvalley.optim.registry import OptimizerSpec, Paper, register
from llmvalley.optim.transforms import ApplyLR, DecoupledWeightDecay, Sign
from llmvalley.optim.transforms.orthogonalize import (
    NS_COEFFICIENTS,
    NS_EPS_FORMS,
    ORTHOGONALIZERS,
    ApplyScaledLR,
    CoshBrake,
    DionUpdate,
    MuonMomentum,
    NAMOUpdate,
    Orthogonalize,
    RMSRescale,
    ScaleByOrthoSecondMoment,
    check_shape_scale,
)
from llmvalley.optim.transforms.qdwh import POLAR_METHODS, PolarGradUpdate

#: Keller Jordan's MuonWithAuxAdam settings for the non-matrix parameters
MUON_AUX_ADAMW: dict[str, Any] = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)

ORTHO_DEFAULTS: dict[str, Any] = dict(
    orthogonalizer="newton_schulz", ns_steps=5, ns_coefficients=NS_COEFFICIENTS, ns_eps=1e-7,
    ns_dtype=None,
)


def check_matrix_group(name: str, group: dict[str, Any]) -> None:
    """Validate the orthogonalization / momentum / scale options shared by these recipes."""
    if "orthogonalizer" in group and group["orthogonalizer"] not in ORTHOGONALIZERS:
        raise ValueError(f"{name}: invalid orthogonalizer={group['orthogonalizer']!r}: "
                         f"one of {ORTHOGONALIZERS}")
    require_positive_int(name, group, "ns_steps")
    if "ns_eps_form" in group and group["ns_eps_form"] not in NS_EPS_FORMS:
        raise ValueError(f"{name}: invalid ns_eps_form={group['ns_eps_form']!r}: "
                         f"one of {NS_EPS_FORMS}")
    if "ns_coefficients" in group and len(group["ns_coefficients"]) != 3:
        raise ValueError(f"{name}: invalid ns_coefficients={group['ns_coefficients']!r}: "
                         "expected (a, b, c)")
    if "momentum" in group and not 0.0 <= float(group["momentum"]) < 1.0:
        raise ValueError(f"{name}: invalid momentum={group['momentum']!r}: must lie in [0, 1)")
    if "mu2" in group and not 0.0 <= float(group["mu2"]) < 1.0:
        raise ValueError(f"{name}: invalid mu2={group['mu2']!r}: must lie in [0, 1)")
    if "shape_scale" in group:
        check_shape_scale(name, group["shape_scale"])


def _check(name: str):
    return lambda group: check_matrix_group(name, group)


register(
    OptimizerSpec(
        name="muon",
        family="matrix",
        paper=Paper("Muon: An optimizer for hidden layers in neural networks (Jordan et al., "
                    "blog 2024); Muon is Scalable for LLM Training (Liu et al.)",
                    "2502.16982", 2024),
        reference="KellerJordan/Muon (muon.py, SingleDeviceMuon); torch.optim.Muon "
        "(tested against, bit-exact with ns_dtype=bfloat16)",
        defaults=dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
                      shape_scale="keller", rms_target=0.2, **ORTHO_DEFAULTS),
        build=lambda g: [DecoupledWeightDecay(), MuonMomentum(), Orthogonalize(),
                         ApplyScaledLR()],
        applies_to="matrix",
        weight_decay="decoupled (p *= 1 - lr*wd, unadjusted lr), before the update",
        check=_check("muon"),
        fallback_hparams=dict(MUON_AUX_ADAMW),
        notes="Keller's defaults (lr 0.02, EMA momentum 0.95 with Nesterov, NS5, "
        "sqrt(max(1, m/n)), wd 0); the fallback AdamW is MuonWithAuxAdam's (lr 3e-4, betas "
        "(0.9, 0.95), eps 1e-10, wd 0). torch.optim.Muon's NS `eps` is `ns_eps` here. NS runs "
        "in fp32 on CPU by default (torch.optim.Muon always uses bf16); ns_dtype='bfloat16' "
        "reproduces torch bit for bit. The gradient is not modified (Keller's lerp_ on "
        "p.grad is done out of place).",
    )
)

register(
    OptimizerSpec(
        name="adamuon",
        family="matrix",
        paper=Paper("AdaMuon: Adaptive Muon Optimizer (Si, Zhang, Shen)", "2507.11005", 2025),
        reference="Chongjie-Si/AdaMuon (gpt2/models/optimizers/adamuon.py, per "
        "optimizers-part2.md); tested against an independent reference from the equations",
        defaults=dict(lr=6e-4, momentum=0.95, nesterov=True, weight_decay=0.1, eps=1e-8,
                      rms_target=0.2, **ORTHO_DEFAULTS),
        build=lambda g: [DecoupledWeightDecay(), MuonMomentum(), Sign(), Orthogonalize(),
                         ScaleByOrthoSecondMoment(), RMSRescale(), ApplyLR()],
        applies_to="matrix",
        check=_check("adamuon"),
        fallback_hparams=dict(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1),
        notes="O = NS5(sign(Nesterov momentum)); v = b v + (1-b) O^2 with b = momentum (0.95), "
        "no bias correction; O / (sqrt(v) + eps) rescaled to RMS 0.2 (0.2 sqrt(mn) / ||.||_F). "
        "The repository's top-level adamuon.py is a different variant (no sign, separate "
        "beta2=0.999 with bias correction, sqrt(min)/||.|| times 0.2 sqrt(max)); this recipe "
        "follows the GPT-2 code and the paper's Algorithm 1.",
    )
)


NAMO_PAPER = Paper("Adam Improves Muon: Adaptive Moment Estimation with Orthogonalized "
                   "Momentum (Zhang et al.)", "2602.17080", 2026)
NAMO_DEFAULTS: dict[str, Any] = dict(
    lr=1e-2, momentum=0.95, mu2=0.99, eps=1e-8, nesterov=True, weight_decay=0.1,
    scale_coeff=0.2, **ORTHO_DEFAULTS)
NAMO_NOTES = ("mu2 is the paper's mu_2 (EMA of the squared raw-gradient norm), eps its "
              "adamnorm_eps; scale_coeff the 0.2 of 0.2 sqrt(max(m, n)). Defaults are "
              "src/namo.py's (lr 1e-2; the paper's GPT-2 configs tune lr, e.g. 0.012 / 0.009). "
              "Weight decay is scaled by the clamped adaptive rate, not by lr. The AdamW "
              "backup (betas (0.9, 0.95), eps 1e-8, wd as the method) is the fallback.")

register(
    OptimizerSpec(
        name="namo",
        family="matrix",
        paper=NAMO_PAPER,
        reference="minxin-zhg/namo (src/namo.py, NAMO); tested against an independent "
        "reference from the equations",
        defaults=dict(NAMO_DEFAULTS),
        build=lambda g: [NAMOUpdate(columnwise=False)],
        applies_to="matrix",
        weight_decay="W *= 1 - wd * min(alpha, 1) (alpha: the adaptive rate), before the update",
        check=_check("namo"),
        fallback_hparams=dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        notes=NAMO_NOTES,
    )
)

register(
    OptimizerSpec(
        name="namo_d",
        family="matrix",
        paper=NAMO_PAPER,
        reference="minxin-zhg/namo (src/namo.py, NAMO_D); tested against an independent "
        "reference from the equations",
        defaults=dict(NAMO_DEFAULTS, col_clamp=0.75),
        build=lambda g: [NAMOUpdate(columnwise=True)],
        applies_to="matrix",
        weight_decay="per column: W_:,j *= max(1 - wd * min(c_j b, 1), 0), before the update",
        check=_check("namo_d"),
        fallback_hparams=dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        notes=NAMO_NOTES + " col_clamp is the code's col_state_clamp_c (0.75; the paper's "
        "configs use 0.01); values outside (0, 1] disable the clamp.",
    )
)

AUON_PAPER = Paper("AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates "
                   "(Maity)", "2509.24320", 2025)

register(
    OptimizerSpec(
        name="auon",
        family="matrix",
        paper=AUON_PAPER,
        reference="ryyzn9/AuON (auon/optimizer.py, AuON); tested against an independent "
        "reference",
        defaults=dict(lr=0.24, momentum=0.95, nesterov=True, weight_decay=0.0, gamma=1.5),
        build=lambda g: [DecoupledWeightDecay(), MuonMomentum(), CoshBrake(), ApplyLR()],
        applies_to="matrix",
        check=_check("auon"),
        notes="EMA momentum with Nesterov look-ahead (always on in the reference); "
        "u = M~ / (sqrt(mean(cosh(gamma M~ / ||M~||)^2)) + 1e-8). For real layers the cosh "
        "factor is about 1, so AuON is close to unnormalized Nesterov SGD. No shape factor "
        "(the repository has none; some write-ups add sqrt(max(1, m/n))).",
    )
)

register(
    OptimizerSpec(
        name="auon_hybrid",
        family="matrix",
        paper=AUON_PAPER,
        reference="ryyzn9/AuON (auon/optimizer.py, HybridAuON); tested against an "
        "independent reference",
        defaults=dict(lr=0.24, momentum=0.95, nesterov=True, weight_decay=0.0, gamma=1.5,
                      **dict(ORTHO_DEFAULTS, ns_steps=1, ns_eps_form="add")),
        build=lambda g: [DecoupledWeightDecay(), MuonMomentum(), Orthogonalize(), CoshBrake(),
                         ApplyLR()],
        applies_to="matrix",
        check=_check("auon_hybrid"),
        notes="Hybrid-AuON: AuON's cosh brake applied to Newton-Schulz(M~). ns_steps=1 is "
        "the paper's 'single Newton-Schulz iteration'; the repository's HybridAuON class "
        "defaults to ns_steps=5 (pass ns_steps=5 to match it). The reference normalizes by "
        "||X||_F + 1e-7 (ns_eps_form='add') and runs NS in the parameter dtype; ns_dtype=None "
        "here means bf16 on CUDA as for every Muon-family method (pass ns_dtype='float32' "
        "for the reference's precision).",
    )
)


def _check_dion(group: dict[str, Any]) -> None:
    check_matrix_group("dion", group)
    frac = group.get("rank_fraction", 1.0)
    if not 0.0 < float(frac) <= 1.0:
        raise ValueError(f"dion: invalid rank_fraction={frac!r}: must lie in (0, 1]")


register(
    OptimizerSpec(
        name="dion",
        family="matrix",
        paper=Paper("Dion: Distributed Orthonormalized Updates (Ahn et al.)", "2504.05295",
                    2025),
        reference="microsoft/dion (dion/dion_simple.py); tested against an independent "
        "reference from the equations",
        defaults=dict(lr=0.01, momentum=0.95, weight_decay=0.01, eps=1e-8, rank_fraction=1.0,
                      shape_scale="dion"),
        build=lambda g: [DecoupledWeightDecay(), DionUpdate(), ApplyScaledLR()],
        applies_to="matrix",
        check=_check_dion,
        fallback_hparams=dict(lr=0.01, betas=(0.9, 0.95), weight_decay=0.01),
        notes="Single-process form: M += G; P = QR(MQ); R = M^T P; M -= (1-mu) P R^T; "
        "Q = R / (||R||_col + eps); X -= lr sqrt(m/n) P Q^T. Householder QR as dion_simple "
        "(the distributed dion.py defaults to randomized Cholesky QR). rank = "
        "ceil(rank_fraction * min(m, n)). The reference routes the unembedding to AdamW or to "
        "Lion at lr/sqrt(d_in); here it goes to the AdamW fallback (pass a rule to change).",
    )
)


POLARGRAD_DEFAULTS: dict[str, Any] = dict(
    lr=0.02, momentum=0.95, weight_decay=0.0, polar_first=False, polar_method="qdwh",
    inner_steps=2, ns_steps=5, ns_coefficients=NS_COEFFICIENTS, ns_eps=1e-7,
    ns_eps_form="clamp", ns_dtype=None,
)


def _check_polargrad(group: dict[str, Any]) -> None:
    check_matrix_group("polargrad", group)
    method = group.get("polar_method", "qdwh")
    if method not in POLAR_METHODS:
        raise ValueError(f"polargrad: invalid polar_method={method!r}: one of {POLAR_METHODS}")
    require_positive_int("polargrad", group, "inner_steps")
    if not isinstance(group.get("polar_first", False), bool):
        raise ValueError(f"polargrad: invalid polar_first={group['polar_first']!r}: a bool")
    if method == "polar_express" and group.get("ns_steps", 5) > 5:
        raise ValueError(f"polargrad: invalid ns_steps={group['ns_steps']!r}: polar_express "
                         "has a 5-iteration schedule")


register(
    OptimizerSpec(
        name="polargrad",
        family="matrix",
        paper=Paper("PolarGrad: A Class of Matrix-Gradient Optimizers from a Unifying "
                    "Preconditioning Perspective (Lau et al.)", "2505.21799", 2025),
        reference="timlautk/polargrad (polar_grad.py PolarGrad; qdwh.py / polar.py for the "
        "QDWH polar factor); QDWH tested against an independent implementation from the "
        "Nakatsukasa-Bai-Gygi equations and the SVD polar factor, the optimizer against an "
        "independent reference in float64",
        defaults=dict(POLARGRAD_DEFAULTS),
        build=lambda g: [DecoupledWeightDecay(), PolarGradUpdate(), ApplyLR()],
        applies_to="matrix",
        weight_decay="decoupled (p *= 1 - lr*wd), before the update",
        check=_check_polargrad,
        fallback_hparams=dict(MUON_AUX_ADAMW),
        notes="M = lerp(M, G, 1 - momentum); U = polar(M); W <- W(1 - lr wd) - lr <M, U> U "
        "(<M, U> = ||M||_* for the exact factor); polar_first=True: U = polar(G), "
        "M = lerp(M, U, 1 - momentum), W <- W(1 - lr wd) - lr <G, U> M. No shape scale: the "
        "step grows with the nuclear norm (so with the matrix size), hence much smaller rates "
        "than Muon on large layers. Defaults are polar_grad.py's (lr 0.02, momentum 0.95, "
        "wd 0, qdwh, inner_steps 2; its README example uses lr 1e-3, momentum 0.9; "
        "polar_grad_ddp.py differs: wd 0.01, inner_steps 5, bf16 buffers). "
        "QDWH is qdwh.py's: wide matrices transposed; x / sqrt(||x||_1 ||x||_inf); l0 = the "
        "compute dtype's eps, so the schedule depends on the dtype (inner_steps=2 gives two "
        "QR-form iterations in fp32 and fp64, far from converged for small singular values, "
        "so <M, U> is below ||M||_* as in the reference); QR form for c > 100, then Cholesky "
        "form with "
        "the ||du||_F > (5 eps)^(1/3) test, then Halley (3, 1, 3) steps while not converged "
        "and below inner_steps; one final Newton-Schulz refinement. It runs in at least fp32 "
        "(bf16/fp16 promoted; the reference does not support bf16), one matrix at a time. "
        "polar_method='newton_schulz' / 'polar_express' / 'svd' are llmvalley's "
        "orthogonalizers with the ns_* options (ns_steps 5, Muon's conventions; inner_steps is "
        "QDWH's only), not "
        "the reference's ns / precond_ns code (which runs inner_steps bf16 NS iterations with "
        "||X||_F + 1e-7: ns_steps=2, ns_eps_form='add', ns_dtype='bfloat16' come close); "
        "their U is cast to the momentum's dtype before <M, U>. zolo-pd and precond_ns are not "
        "offered. >2-D kernels use their (out, -1) matrix view (polar_grad.py takes 2-D only). "
        "The reference README has no auxiliary Adam: the AdamW fallback is Muon's (lr 3e-4, "
        "betas (0.9, 0.95), eps 1e-10, wd 0). State: momentum (mn per matrix).",
    )
)
