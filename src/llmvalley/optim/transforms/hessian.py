"""Curvature-aware transforms: Hessian-diagonal preconditioners.

- :class:`SophiaClip`: Sophia's clipped diagonal-Newton step (Liu et al., arXiv 2305.14342) on
  a momentum, with the diagonal estimated by Gauss-Newton-Bartlett (Sophia-G: squared
  gradients of the loss on labels sampled from the model) or by Hutchinson (Sophia-H:
  ``u * (H u)`` with Gaussian ``u``).
- :class:`HutchinsonSecondMoment`: AdaHessian's second moment (Yao et al., arXiv 2006.00719):
  an EMA of the squared, spatially averaged ``|z * (H z)|`` with Rademacher ``z``, and the
  Adam-like step ``m_hat / (sqrt(v_hat)**k + eps)``.

The curvature estimates arrive through the shell's protocol (see
:meth:`~llmvalley.optim.shell.ChainOptimizer.curvature_request`): Sophia-G's sampled-label
gradients after a step, or the step's own gradients with their graph (``create_graph=True``)
before it, for Hessian-vector products. Random probes come from a per-tensor seed kept in the
optimizer state (a float slot, advanced at every draw), so a resumed run draws the same probes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform

# ---- checkpointed random probes ----------------------------------------------------------
_MASK53 = (1 << 53) - 1  # seeds are kept in float slots: integers below 2**53 are exact
_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64's finaliser (a bijective 64-bit mix)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def initial_probe_seed(name: str) -> float:
    """The first probe seed of a tensor: a function of torch's initial seed (so runs seeded
    with ``torch.manual_seed`` are reproducible, as the references' global-RNG probes are) and
    of the parameter's name (so tensors draw independent probes)."""
    return float(_mix(torch.initial_seed() ^ zlib.crc32(name.encode())) & _MASK53)


def next_probe_seed(seed: int) -> int:
    """The seed of the draw after the one made with ``seed``."""
    return _mix(seed) & _MASK53


def probe(seed: int, shape: Shape, kind: str, dtype: torch.dtype,
          device: torch.device) -> Tensor:
    """A random probe drawn from a generator seeded with ``seed``: ``"rademacher"`` (+-1) or
    ``"gaussian"`` (standard normal)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    if kind == "rademacher":
        bits = torch.randint(0, 2, tuple(shape), generator=gen, device=device)
        return (2 * bits - 1).to(dtype)
    if kind == "gaussian":
        return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)
    raise ValueError(f"unknown probe kind {kind!r}")


class ProbedTransform(Transform):
    """Base of the transforms that draw Hutchinson probes: keeps each tensor's probe seed in
    the float slot ``probe_seed`` and computes Hessian-vector products."""

    probe_kind = "rademacher"

    @staticmethod
    def seed_slot(name: str) -> SlotSpec:
        return SlotSpec("probe_seed", None, "exact", init=initial_probe_seed(name))

    def draw(self, ctx: StepContext) -> list[Tensor]:
        """One probe per tensor (in the compute dtype), advancing each tensor's seed."""
        out = []
        for i, g in enumerate(ctx.grads):
            seed = int(ctx.scalar("probe_seed", i))
            out.append(probe(seed, g.shape, self.probe_kind, ctx.dtypes[i], g.device))
            ctx.set_scalar("probe_seed", i, float(next_probe_seed(seed)))
        return out

    @staticmethod
    def hessian_vector(ctx: StepContext, vectors: list[Tensor]) -> list[Tensor]:
        """``H v`` for the tensors of ``ctx`` (the Hessian of the loss whose gradients, taken
        with ``create_graph=True``, are ``ctx.grads``), with ``v`` the concatenated
        ``vectors``."""
        pairs = [(g, v) for g, v in zip(ctx.grads, vectors) if g.requires_grad]
        if not pairs:
            raise RuntimeError(
                f"{ctx.group.get('optimizer', 'this method')} needs Hessian-vector products: "
                "take the step's backward with loss.backward(create_graph=True) and call "
                "optimizer.update_curvature() before optimizer.step()")
        products = torch.autograd.grad(
            [g for g, _ in pairs], ctx.params, grad_outputs=[v for _, v in pairs],
            retain_graph=True, allow_unused=True)
        return [torch.zeros_like(v) if hv is None else hv.detach().to(v.dtype)
                for hv, v in zip(products, vectors)]


# ---- Sophia ------------------------------------------------------------------------------
class SophiaClip(ProbedTransform):
    """Sophia's step: ``m = beta1 m + (1 - beta1) g`` (``exp_avg``, in the reference's order of
    operations, which the clip below amplifies where ``h`` is small) and the direction
    ``sign(m) * min(|m| / (rho * bs * max(h, 0) + eps), 1)``, with ``h`` (``hessian``) an EMA
    (``betas[1]``) of a Hessian-diagonal estimate.

    ``estimator="gauss_newton"`` (Sophia-G) folds in ``g_hat**2`` where ``g_hat`` are the
    gradients of the mean loss on labels sampled from the model, every ``hessian_interval``
    steps after the step (as the official training script); the batch factor ``B`` of the
    Gauss-Newton-Bartlett estimator ``B * g_hat**2`` is the hyperparameter ``bs`` (tokens per
    step), applied in the step as the official code does. ``estimator="hutchinson"`` (Sophia-H)
    folds in ``u * (H u)`` with ``u ~ N(0, I)``, before steps 1, 1 + k, 1 + 2k, ... (Algorithm 3
    of the paper: ``t mod k = 1``); it estimates the Hessian of the mean loss itself, so there
    is no batch factor. ``max(h, 0)`` leaves Sophia-G unchanged (its ``h`` is >= 0) and sends a
    negative Hutchinson estimate to the clip, as the paper's ``max(gamma * h, eps)`` does.
    """

    probe_kind = "gaussian"

    def __init__(self, estimator: str, bs_key: str | None = "bs") -> None:
        if estimator not in ("gauss_newton", "hutchinson"):
            raise ValueError(f"unknown Sophia estimator {estimator!r}")
        self.estimator = estimator
        self.curvature = "gauss_newton" if estimator == "gauss_newton" else "hessian_vector"
        self.elementwise = estimator == "gauss_newton"  # Hutchinson draws probes per tensor
        self.bs_key = bs_key
        self.slot_names = ("exp_avg", "hessian") if estimator == "gauss_newton" \
            else ("exp_avg", "hessian", "probe_seed")

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        if self.estimator == "gauss_newton":
            return [SlotSpec("exp_avg", shape), SlotSpec("hessian", shape, "unsigned")]
        return [SlotSpec("exp_avg", shape), SlotSpec("hessian", shape, "signed"),
                self.seed_slot(name)]

    def curvature_due(self, step: int, group: Mapping[str, Any]) -> bool:
        k = int(group["hessian_interval"])
        return step % k == 0 if self.estimator == "gauss_newton" else (step - 1) % k == 0

    def update_curvature(self, ctx: StepContext) -> None:
        beta2 = ctx.hp("betas")[1]
        hessians = ctx.slot("hessian")
        if self.estimator == "gauss_newton":
            for h, g in zip(hessians, ctx.grads):
                h.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            return
        probes = self.draw(ctx)
        products = self.hessian_vector(ctx, probes)
        sign = -1.0 if ctx.group.get("maximize") else 1.0  # the Hessian of -f
        for h, u, hu in zip(hessians, probes, products):
            h.mul_(beta2).add_(u * hu, alpha=sign * (1 - beta2))

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        scale = float(ctx.hp("rho")) * (float(ctx.hp(self.bs_key)) if self.bs_key else 1.0)
        eps = ctx.hp("eps")
        beta1 = ctx.hp("betas")[0]
        out = []
        for g, m, h in zip(updates, ctx.slot("exp_avg"), ctx.slot("hessian")):
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            denom = h.clamp(min=0) * scale + eps
            out.append(m.sign() * (m.abs() / denom).clamp(max=1))
        return out


# ---- AdaHessian --------------------------------------------------------------------------
def averaged_shape(shape: Shape, blocks: tuple[int, ...]) -> Shape:
    """The shape AdaHessian keeps its second moment in: averaging over a whole row (2-D),
    the last dimension (3-D, a 1-D convolution) or the kernel (4-D) keeps that dimension as 1;
    block averaging (a block size other than -1) and 0/1-D tensors keep the full shape."""
    nd = len(shape)
    if nd > 4:
        raise ValueError(f"adahessian: no spatial averaging rule for a {nd}-D tensor "
                         f"(shape {tuple(shape)}); the reference covers 1-D to 4-D")
    if nd <= 1 or blocks[nd - 1] != -1:
        return tuple(shape)
    kept = {2: 1, 3: 2, 4: 2}[nd]
    return tuple(shape[:kept]) + (1,) * (nd - kept)


def spatial_average(d: Tensor, blocks: tuple[int, ...]) -> Tensor:
    """AdaHessian's spatial averaging of ``d = |H z|`` (the reference's ``get_trace``)."""
    nd = d.ndim
    block = blocks[max(nd, 1) - 1]
    if block == -1:
        if nd <= 1:
            return d
        dims = {2: (1,), 3: (2,), 4: (2, 3)}[nd]
        return d.mean(dim=dims, keepdim=True)
    means = d.reshape(-1, block).mean(dim=1)
    return means.repeat_interleave(block).view(d.shape)


class HutchinsonSecondMoment(ProbedTransform):
    """AdaHessian's preconditioner on a debiased momentum (its input):
    ``m_hat / ((sqrt(v) ** k) / (sqrt(1 - beta2**t) ** k) + eps)`` where ``v`` is an EMA
    (``betas[1]``) of ``D**2`` and ``D`` is the spatially averaged ``|z * (H z)| = |H z|`` with
    Rademacher ``z`` (block sizes ``spatial_average_block_size`` for 1-D..4-D tensors, -1 the
    reference's defaults), folded in before every step. ``k`` is ``hessian_power``.
    """

    curvature = "hessian_vector"
    probe_kind = "rademacher"
    slot_names = ("exp_hessian_diag_sq", "probe_seed")

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        blocks = tuple(group["spatial_average_block_size"])
        return [SlotSpec("exp_hessian_diag_sq", averaged_shape(shape, blocks), "unsigned"),
                self.seed_slot(name)]

    def curvature_due(self, step: int, group: Mapping[str, Any]) -> bool:
        return True

    def update_curvature(self, ctx: StepContext) -> None:
        beta2 = ctx.hp("betas")[1]
        blocks = tuple(ctx.hp("spatial_average_block_size"))
        for i, g in enumerate(ctx.grads):
            block = blocks[max(g.ndim, 1) - 1]
            if block != -1 and g.numel() % block:
                raise ValueError(
                    f"adahessian: spatial_average_block_size {block} does not divide the "
                    f"{g.numel()} elements of {ctx.name(i)}")
        probes = self.draw(ctx)
        products = self.hessian_vector(ctx, probes)
        for v, hz in zip(ctx.slot("exp_hessian_diag_sq"), products):
            d = spatial_average(hz.abs(), blocks)
            v.mul_(beta2).addcmul_(d, d, value=1 - beta2)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta2 = ctx.hp("betas")[1]
        k = float(ctx.hp("hessian_power"))
        eps = ctx.hp("eps")
        out = []
        for m, v, t in zip(updates, ctx.slot("exp_hessian_diag_sq"), ctx.steps):
            denom = (v.sqrt() ** k) / math.sqrt(1 - beta2**t) ** k + eps
            out.append(m / denom)
        return out
