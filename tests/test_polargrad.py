"""PolarGrad (Lau et al., arXiv 2505.21799) and its QDWH polar factor (transforms/qdwh.py).

The library's QDWH is compared with an independent QDWH written here from the equations of
Nakatsukasa, Bai and Gygi (SIAM J. Matrix Anal. Appl. 31(5), 2010) with the semantics of
timlautk/polargrad's ``qdwh.py`` (one loop, paper forms of the weights, the Cholesky-form
step as a linear solve), and with the SVD polar factor once converged. The optimizer is
compared over 50 float64 steps with :class:`PolarGradRef`, a plain loop from the update
equations that uses that QDWH (or the exact polar factor).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import llmvalley
from llmvalley.optim.transforms.qdwh import qdwh, qdwh_schedule
from tests import references_matrix as refs
from tests.test_matrix_optimizers import (
    MATRIX_SHAPES,
    assert_close,
    gradients,
    initial,
    run_optimizer,
    run_reference,
)


# ---- an independent QDWH -------------------------------------------------------------------
def dynamic_weights(low: float) -> tuple[float, float, float]:
    """NBG (2010) eq. (3.8)-(3.10): the optimal (a, b, c) for the lower bound ``low``."""
    d = (4.0 * (1.0 - low**2) / low**4) ** (1.0 / 3.0)
    a = math.sqrt(1.0 + d) + 0.5 * math.sqrt(
        8.0 - 4.0 * d + 8.0 * (2.0 - low**2) / (low**2 * math.sqrt(1.0 + d)))
    b = (a - 1.0) ** 2 / 4.0
    return a, b, a + b - 1.0


def qdwh_reference(x: Tensor, iterations: int, perturb: float = 0.0, stage: str = "qr",
                   eps: float | None = None) -> tuple[Tensor, int, bool]:
    """QDWH in ``x``'s dtype with the reference's stopping rules; returns (U, iterations,
    converged). ``eps`` (default: the dtype's) is the initial lower bound and sets the
    tolerances. ``perturb`` multiplies the weight ``a`` of the ``stage`` ("qr", "cholesky" or
    "halley") iterations by ``1 + perturb`` (to show that the comparison notices a wrong
    coefficient)."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    wide = x.shape[0] < x.shape[1]
    y = x.T.clone() if wide else x.clone()
    norm_1 = float(y.abs().sum(dim=0).max())  # largest column sum
    norm_inf = float(y.abs().sum(dim=1).max())  # largest row sum
    if norm_1 > 0:
        y = y / math.sqrt(norm_1 * norm_inf)
    n = y.shape[1]
    eye = torch.eye(n, dtype=y.dtype)
    low, not_converged, k = eps, True, 0
    while k < iterations:
        if low + 5 * eps < 1:  # the dynamic weights
            a, b, c = dynamic_weights(low)
            low = low * (a + b * low**2) / (1.0 + c * low**2)
            kind = "qr" if c > 100 else "cholesky"
        elif not_converged:  # weights exhausted: Halley's (3, 1, 3) until converged
            a, b, c = 3.0, 1.0, 3.0
            kind = "halley"
        else:
            break
        if kind == stage:
            a *= 1 + perturb
        if kind == "qr":  # eq. (3.2)
            q, _ = torch.linalg.qr(torch.cat([math.sqrt(c) * y, eye]))
            y = (b / c) * y + (a - b / c) / math.sqrt(c) * q[: y.shape[0]] @ q[y.shape[0]:].T
        else:  # X (I + c X^T X)^{-1} by a linear solve, then the convergence test
            z = torch.linalg.solve(eye + c * y.T @ y, y.T).T
            new = (b / c) * y + (a - b / c) * z
            not_converged = float(torch.linalg.norm(new - y)) > (5 * eps) ** (1 / 3)
            y = new
        k += 1
    y = y @ (1.5 * eye - 0.5 * y.T @ y)  # one Newton-Schulz refinement
    return (y.T if wide else y), k, not not_converged


def svd_polar(x: Tensor) -> Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def ill_conditioned(m: int, n: int, cond: float, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    k = min(m, n)
    s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    return 3.0 * (u[:, :k] * s) @ v[:, :k].T


def matrices(dtype: torch.dtype) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(3)
    cond = 1e8 if dtype == torch.float64 else 1e3
    return {
        "tall": torch.randn(24, 10, generator=gen, dtype=torch.float64),
        "wide": torch.randn(7, 19, generator=gen, dtype=torch.float64) * 1e-3,
        "square": torch.randn(12, 12, generator=gen, dtype=torch.float64) * 50.0,
        "ill_tall": ill_conditioned(20, 12, cond),
        "ill_wide": ill_conditioned(9, 16, cond, seed=1),
    }


def diagonal(dtype: torch.dtype) -> Tensor:
    """A 7 x 5 matrix with singular values down to below eps (rows permuted): QDWH's
    schedule leaves the smallest one far from 1, so Halley steps follow. Each singular value
    evolves on its own, so rounding stays relative and the comparison stays tight."""
    tiny = (1e-8, 1e-10) if dtype == torch.float32 else (1e-17, 1e-19)
    x = torch.zeros(7, 5, dtype=dtype)
    x[range(5), range(5)] = torch.tensor((1.0, 0.5, 1e-3, *tiny), dtype=dtype)
    return x[[3, 1, 2, 0, 4, 5, 6]]


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def qdwh_tol(dtype: torch.dtype, kind: str) -> float:
    """Agreement of two QDWH implementations: rounding, amplified by the conditioning of the
    polar factor (about 1 / sigma_min) on the ill-conditioned inputs."""
    if dtype == torch.float64:
        return 1e-8 if kind.startswith("ill") else 2e-14
    return 5e-5 if kind.startswith("ill") else 2e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 10])
@pytest.mark.parametrize("kind", ["tall", "wide", "square", "ill_tall", "ill_wide"])
def test_qdwh_matches_independent_qdwh(dtype, iterations, kind):
    x = matrices(dtype)[kind].to(dtype)
    ours = qdwh(x, iterations)
    theirs, k, converged = qdwh_reference(x, iterations)
    assert ours.u.dtype == dtype and ours.u.shape == x.shape
    assert (ours.iterations, ours.converged) == (k, converged)
    assert rel(ours.u, theirs) <= qdwh_tol(dtype, kind)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iterations", [2, 5, 8, 10, 12, 20])
def test_qdwh_halley_stage_matches_independent_qdwh(dtype, iterations):
    x = diagonal(dtype)
    ours = qdwh(x, iterations)
    theirs, k, converged = qdwh_reference(x, iterations)
    assert (ours.iterations, ours.converged) == (k, converged)
    assert rel(ours.u, theirs) <= qdwh_tol(dtype, "diagonal")
    schedule = sum(map(len, qdwh_schedule(torch.finfo(dtype).eps, iterations)))
    if iterations > schedule:  # Halley steps follow the schedule ...
        assert k > schedule
    if iterations == 20:  # ... until the convergence test passes
        assert converged and k < iterations


@pytest.mark.parametrize("eps", [0.1, 3e-3, 1e-5, 1e-10])
def test_qdwh_with_a_given_eps_matches_independent_qdwh(eps):
    """The lower bound / tolerance ``eps`` changes where the schedule stops (l + 5 eps >= 1)
    and when the Cholesky-form test passes."""
    for kind in ("tall", "wide", "square"):
        x = matrices(torch.float64)[kind]
        for iterations in (1, 2, 3, 10):
            ours = qdwh(x, iterations, eps=eps)
            theirs, k, converged = qdwh_reference(x, iterations, eps=eps)
            assert (ours.iterations, ours.converged) == (k, converged), (kind, iterations)
            assert rel(ours.u, theirs) <= 2e-14, (kind, iterations)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_qdwh_comparison_detects_a_wrong_weight(dtype):
    """A 1% error in the weight ``a`` of any stage breaks the comparison: QR stage at
    inner_steps 2, Cholesky stage at 3 (well-conditioned inputs; on the ill-conditioned
    ones its effect is below the rounding noise in float32), Halley stage on the diagonal
    input."""
    cases = [(kind, x, "qr", 2) for kind, x in matrices(dtype).items()]
    cases += [(kind, x, "cholesky", 3) for kind, x in matrices(dtype).items()
              if dtype == torch.float64 or not kind.startswith("ill")]
    cases += [("diagonal", diagonal(dtype), "halley", 8), ("diagonal", diagonal(dtype),
                                                             "halley", 20)]
    for kind, x, stage, iterations in cases:
        x = x.to(dtype)
        ours = qdwh(x, iterations).u
        wrong, _, _ = qdwh_reference(x, iterations, perturb=1e-2, stage=stage)
        assert rel(ours, wrong) > 3 * qdwh_tol(dtype, kind), (kind, stage)


@pytest.mark.parametrize("dtype,tol,ill_tol", [(torch.float64, 1e-12, 1e-7),
                                                (torch.float32, 2e-6, 2e-4)])
def test_qdwh_converges_to_the_svd_polar_factor(dtype, tol, ill_tol):
    for kind, x in matrices(dtype).items():
        x = x.to(dtype)
        result = qdwh(x, 10)
        assert result.converged, kind
        exact = svd_polar(x.double())
        assert rel(result.u, exact) <= (ill_tol if kind.startswith("ill") else tol), kind


def test_qdwh_schedule_depends_on_the_dtype():
    """inner_steps=2: two QR-form iterations in both precisions. With room to converge,
    fp32 schedules 2 QR + 2 Cholesky iterations and fp64 2 QR + 4 Cholesky."""
    for dtype, chol in ((torch.float32, 2), (torch.float64, 4)):
        eps = torch.finfo(dtype).eps
        qr2, chol2 = qdwh_schedule(eps, 2)
        assert (len(qr2), len(chol2)) == (2, 0)
        qr_all, chol_all = qdwh_schedule(eps, 10)
        assert (len(qr_all), len(chol_all)) == (2, chol)
        assert all(c > 100 for _, _, c in qr_all) and all(c <= 100 for _, _, c in chol_all)
        for a, b, c in qr_all + chol_all:  # the paper's weights, in either algebraic form
            assert b == pytest.approx((a - 1) ** 2 / 4, rel=1e-12)
            assert c == pytest.approx(a + b - 1, rel=1e-12)
        assert qr_all[0][0] == pytest.approx(dynamic_weights(eps)[0], rel=1e-12)
    # inner_steps=2 has no Cholesky-form step, so it reports "not converged"
    assert qdwh(matrices(torch.float64)["tall"], 2)[1:] == (2, False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_qdwh_runs_wide_matrices_on_their_transpose(dtype):
    """As polar.py: the wide case is the tall one transposed (the Gram / Cholesky matrices
    are then min(m, n) square), bit for bit."""
    for kind, x in matrices(dtype).items():
        if kind != "square":
            x = x.to(dtype)
            assert torch.equal(qdwh(x.T, 3).u, qdwh(x, 3).u.T), kind


def test_qdwh_promotes_half_precision_and_maps_zero_to_zero():
    x = torch.randn(10, 6)
    half = qdwh(x.bfloat16(), 2).u
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, qdwh(x.bfloat16().float(), 2).u.bfloat16())
    zero = qdwh(torch.zeros(5, 3, dtype=torch.float64), 2).u
    assert torch.equal(zero, torch.zeros(5, 3, dtype=torch.float64))


# ---- PolarGrad against a reference loop ----------------------------------------------------
class PolarGradRef(refs.Reference):
    """Lau et al. PolarGrad(M): M = beta M + (1 - beta) G, U = polar(M), step ||M||_* U as
    <M, U> U; ``polar_first``: U = polar(G), M = beta M + (1 - beta) U, step <G, U> M;
    W(1 - lr wd) - lr step. polar = :func:`qdwh_reference` or the exact factor."""

    def update(self, p, g, st, name):
        lr, beta, wd = self.hp["lr"], self.hp["momentum"], self.hp["weight_decay"]
        steps = self.hp.get("inner_steps", 2)

        def polar(x: Tensor) -> Tensor:
            return refs.polar(x) if self.hp.get("exact") else qdwh_reference(x, steps)[0]

        gm = refs.as_matrix(g)
        m = st.setdefault("M", torch.zeros_like(gm))
        if self.hp.get("polar_first"):
            u = polar(gm)
            m.mul_(beta).add_((1 - beta) * u)
            step = (gm * u).sum() * m
        else:
            m.mul_(beta).add_((1 - beta) * gm)
            u = polar(m)
            step = (m * u).sum() * u
        p.mul_(1 - lr * wd).sub_(lr * step.reshape(p.shape))


POLARGRAD_CASES = [
    dict(lr=0.02, momentum=0.95, weight_decay=0.0, polar_first=False),
    dict(lr=0.02, momentum=0.95, weight_decay=0.0, polar_first=True),
    dict(lr=0.01, momentum=0.9, weight_decay=0.1, polar_first=False, inner_steps=3),
    dict(lr=0.01, momentum=0.9, weight_decay=0.1, polar_first=True, inner_steps=4),
    dict(lr=0.01, momentum=0.9, weight_decay=0.1, polar_first=False, inner_steps=10),
]


@pytest.mark.parametrize("hp", POLARGRAD_CASES)
def test_polargrad_matches_reference(hp):
    ours = run_optimizer(lambda ps: llmvalley.create_optimizer("polargrad", ps, **hp),
                         MATRIX_SHAPES)
    theirs = run_reference(PolarGradRef, MATRIX_SHAPES, **hp)
    assert_close(ours, theirs, 1e-12)


@pytest.mark.parametrize("polar_first", [False, True])
def test_polargrad_svd_matches_reference_with_exact_polar_factor(polar_first):
    hp = dict(lr=0.01, momentum=0.9, weight_decay=0.05, polar_first=polar_first)
    ours = run_optimizer(
        lambda ps: llmvalley.create_optimizer("polargrad", ps, polar_method="svd", **hp),
        MATRIX_SHAPES)
    theirs = run_reference(PolarGradRef, MATRIX_SHAPES, exact=True, **hp)
    assert_close(ours, theirs, 1e-10)


def test_polargrad_newton_schulz_is_muon_style_ns_with_nuclear_scale():
    """polar_method="newton_schulz" (our convention): Keller's NS5 of M, scaled by <M, U>."""
    shapes = MATRIX_SHAPES[:3]
    hp = dict(lr=0.01, momentum=0.95, weight_decay=0.0)
    ours = run_optimizer(lambda ps: llmvalley.create_optimizer(
        "polargrad", ps, polar_method="newton_schulz", ns_eps_form="add", **hp), shapes)
    params = initial(shapes)
    mom = [torch.zeros_like(p) for p in params]
    for grads in gradients(shapes):
        for p, m, g in zip(params, mom, grads):
            m.mul_(0.95).add_(0.05 * g)
            u = refs.ns5(m)
            p.sub_(0.01 * (m * u).sum() * u)
    assert_close(ours, params, 1e-9)


def test_polargrad_defaults_are_the_reference_class_defaults():
    spec = llmvalley.get_spec("polargrad")
    d = spec.defaults
    assert (d["lr"], d["momentum"], d["weight_decay"], d["polar_first"], d["polar_method"],
            d["inner_steps"]) == (0.02, 0.95, 0.0, False, "qdwh", 2)
    assert spec.applies_to == "matrix" and spec.paper.arxiv == "2505.21799"
    assert spec.state_numel((6, 3, 2, 2)) == 72


def test_first_step_is_nuclear_norm_times_polar_factor():
    """With the exact factor, step 1 is -lr ||M||_* U V^T with M = (1 - beta) G."""
    g = torch.randn(7, 5, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(7, 5, dtype=torch.float64))
    opt = llmvalley.create_optimizer("polargrad", [w], polar_method="svd", lr=0.1)
    w.grad = g.clone()
    opt.step()
    m = 0.05 * g
    expected = -0.1 * torch.linalg.matrix_norm(m, ord="nuc") * svd_polar(g)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-14)


def test_zero_gradient_gives_zero_step():
    w = nn.Parameter(torch.ones(4, 6))
    opt = llmvalley.create_optimizer("polargrad", [w], polar_first=True)
    w.grad = torch.zeros(4, 6)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(4, 6))


@pytest.mark.parametrize("method", ["qdwh", "newton_schulz", "polar_express", "svd"])
def test_every_polar_method_trains(method):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    target = x @ torch.randn(8, 4)
    w = nn.Parameter(0.01 * torch.randn(8, 4))
    opt = llmvalley.create_optimizer("polargrad", [w], lr=0.1, polar_method=method)
    def loss() -> Tensor:
        return ((x @ w - target) ** 2).mean()

    start = loss().item()
    for _ in range(100):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.05 * start


@pytest.mark.parametrize("bad", [
    dict(polar_method="zolo-pd"), dict(polar_method="ns"), dict(inner_steps=0),
    dict(inner_steps=2.0), dict(inner_steps=True), dict(momentum=1.0), dict(momentum=-0.1),
    dict(polar_first="yes"), dict(ns_steps=0), dict(lr=-1.0), dict(weight_decay=-0.1),
    dict(ns_eps_form="plus"),
])
def test_invalid_hyperparameters_are_named(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        llmvalley.create_optimizer("polargrad", [nn.Parameter(torch.zeros(4, 4))], **bad)


def test_polar_express_step_limit_is_named():
    with pytest.raises(ValueError, match="ns_steps"):
        llmvalley.create_optimizer("polargrad", [nn.Parameter(torch.zeros(4, 4))],
                                   polar_method="polar_express", ns_steps=6)
