"""Factored second moments (Adafactor, CAME): O(m + n) state for an m x n matrix.

Parameters with two or more dimensions are factored over their last two dimensions (leading
dimensions are treated as a batch); vectors and scalars keep a full second moment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform
from llmvalley.optim.transforms.stored import compiled_cpu, stored_factors, stored_scalars

#: rows summed together first when a compiled CPU step reduces over a matrix's columns
#: (:func:`column_mean`)
COLUMN_GROUP = 16


def rms(x: Tensor) -> Tensor:
    """Root mean square of all entries, as a 0-d tensor (no host sync).

    In a compiled CPU step a matrix's squares are summed per row first: inductor did not
    vectorise one whole-tensor sum over a product with broadcast factors (Adafactor's
    ``u = g r c``), 2.4x slower than the row sums (8192 x 512 float32). Equal to rounding.
    """
    if compiled_cpu(x) and x.dim() >= 2:
        return ((x * x).sum(dim=-1).sum() / x.numel()).sqrt()
    return torch.linalg.vector_norm(x) / (x.numel() ** 0.5)


def column_mean(x: Tensor) -> Tensor:
    """Mean over dimension -2, kept: ``(..., m, n) -> (..., 1, n)``.

    In a compiled CPU step, groups of :data:`COLUMN_GROUP` rows are summed first: inductor
    reduces over an outer dimension one 16-column strip at a time down the whole matrix,
    while the grouped sums fuse with the row sums into one pass (8192 x 512 float32: row and
    column sums 0.69 ms, against 1.69 ms). Equal to float rounding.
    """
    m = x.shape[-2]
    if compiled_cpu(x) and m % COLUMN_GROUP == 0 and m > COLUMN_GROUP:
        groups = x.unflatten(-2, (m // COLUMN_GROUP, COLUMN_GROUP)).sum(dim=-2)
        return groups.sum(dim=-2, keepdim=True) / m
    return x.mean(dim=-2, keepdim=True)


def clip_by_rms(update: Tensor, threshold: float) -> Tensor:
    """``update / max(1, rms(update) / threshold)`` (Adafactor's update clipping), in place."""
    return update.div_(stored_scalars([(rms(update) / threshold).clamp_(min=1.0)])[0])


def row_col_shapes(shape: Shape, keepdim: bool) -> tuple[Shape, Shape]:
    """Shapes of the row and column factors over the last two dimensions (``keepdim``: as
    ``(..., m, 1)`` and ``(..., 1, n)``, as torch.optim.Adafactor stores them)."""
    lead = tuple(shape[:-2])
    if keepdim:
        return (*lead, shape[-2], 1), (*lead, 1, shape[-1])
    return (*lead, shape[-2]), (*lead, shape[-1])


def factored_rsqrt(row: Tensor, col: Tensor, eps1: float) -> Tensor:
    """``rsqrt(max(row col / max(mean(row), eps1), eps1**2))`` (Adafactor's preconditioner
    from its ``(..., m, 1)`` and ``(..., 1, n)`` factors), computed as the product of a
    per-row and a per-column ``rsqrt``
    (:func:`~llmvalley.optim.transforms.stored.stored_factors`), capped at ``1 / eps1``: equal
    in exact arithmetic (``rsqrt`` is decreasing; a zero factor gives the cap), and
    to float rounding in practice. torch.optim.Adafactor divides the outer product element
    by element first, which costs two more passes over the matrix; Shazeer & Stern's
    reference (tensor2tensor) multiplies the two factors' rsqrt, as here."""
    rows, cols = stored_factors(
        (row / row.mean(dim=-2, keepdim=True).clamp(min=eps1)).rsqrt(), col.rsqrt())
    return (rows * cols).clamp_(max=1.0 / eps1)


class ScaleByAdafactor(Transform):
    """Adafactor (Shazeer & Stern, arXiv 1804.04235) as ``torch.optim.Adafactor`` computes
    it (equal to float rounding: the factored statistics and preconditioner are evaluated in
    fewer passes, see :func:`factored_rsqrt`).

    ``beta2_t = 1 - t**beta2_decay``; row/column means of ``g**2`` are tracked with that decay
    and combined as ``R C / mean(R)``; ``u = g / sqrt(max(V, eps1**2))`` is clipped to RMS
    ``d``; the step is ``max(eps2, RMS(p)) * min(lr, 1/sqrt(t)) * u`` (``lr`` caps the relative
    step size, so it is applied here and the step is marked absolute in the plan).
    ``eps1=None`` means the machine epsilon of the compute dtype. No first moment.
    State: ``row_var`` and ``col_var`` (factored) or ``variance``.
    """

    per_tensor = True

    slot_names = ("row_var", "col_var", "variance")

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        if len(shape) > 1:
            row, col = row_col_shapes(shape, keepdim=True)
            return [SlotSpec("row_var", row, "unsigned"), SlotSpec("col_var", col, "unsigned")]
        return [SlotSpec("variance", shape, "unsigned")]

    def prelude(self, ctx: StepContext) -> dict[str, list[Any]]:
        """Each tensor's EMA weight ``t**beta2_decay`` and relative step ``min(lr, 1/sqrt(t))``
        (computed before a compiled kernel, which would otherwise evaluate the powers of the
        step in its loop and specialise on the ``min``)."""
        decay, lr = ctx.hp("beta2_decay"), float(ctx.hp("lr"))
        return {"weight": [t**decay for t in ctx.steps],
                "rate": [min(lr, t**-0.5) for t in ctx.steps]}

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        eps1, eps2 = ctx.hp("eps")
        d = ctx.hp("d")
        numbers = ctx.prelude()
        out = []
        for i, (g, p, weight, rate) in enumerate(zip(updates, ctx.params, numbers["weight"],
                                                     numbers["rate"])):
            e1 = torch.finfo(g.dtype).eps if eps1 is None else eps1
            alpha = rms(p).clamp_(min=eps2) * rate
            if g.dim() > 1:
                row, col = ctx.slot("row_var", [i])[0], ctx.slot("col_var", [i])[0]
                # mean squares (torch.optim.Adafactor: norms squared, equal to rounding): one
                # square, two sums; a column norm (a reduction over the outer dimension) ran
                # 17x slower than a row norm on CPU (4096 x 256)
                sq = g * g
                row.lerp_(sq.mean(dim=-1, keepdim=True), weight)
                col.lerp_(column_mean(sq), weight)
                # a per-row times a per-column rsqrt, capped (torch.optim.Adafactor forms
                # R C / mean(R) over every element first: equal to rounding, two passes more)
                u = factored_rsqrt(row, col, e1).mul_(g)
            else:
                variance = ctx.slot("variance", [i])[0]
                variance.lerp_(g * g, weight)
                u = variance.clamp(min=e1 * e1).rsqrt_().mul_(g)
            clip, alpha = stored_scalars([(rms(u) / d).clamp_(min=1.0), alpha.to(u.dtype)])
            out.append(u.div_(clip).mul_(alpha))
            ctx.plan.absolute[i] = True
        return out


class ScaleByCAME(Transform):
    """CAME (Luo et al., ACL'23, arXiv 2307.02047), as came-pytorch 0.1.3.

    ``u = g / sqrt(V)`` with ``V`` the factored EMA (beta2) of ``g**2 + eps1``, clipped to RMS
    ``clip_threshold``; ``m = EMA_beta1(u)``; the confidence ``(u - m)**2 + eps2`` gets a
    factored EMA (beta3) ``S`` and the direction is ``m / sqrt(S)``. Non-factored parameters
    (fewer than 2 dims) use ``m`` directly, as the reference. No bias correction.
    State: ``exp_avg`` + ``exp_avg_sq_row/col`` + ``exp_avg_res_row/col`` (factored) or
    ``exp_avg`` + ``exp_avg_sq``.
    """

    per_tensor = True

    slot_names = (
        "exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col",
        "exp_avg_res_row", "exp_avg_res_col",
    )

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list[SlotSpec]:
        if len(shape) >= 2:
            row, col = row_col_shapes(shape, keepdim=False)
            return [SlotSpec("exp_avg", shape),
                    SlotSpec("exp_avg_sq_row", row, "unsigned"),
                    SlotSpec("exp_avg_sq_col", col, "unsigned"),
                    SlotSpec("exp_avg_res_row", row, "unsigned"),
                    SlotSpec("exp_avg_res_col", col, "unsigned")]
        return [SlotSpec("exp_avg", shape), SlotSpec("exp_avg_sq", shape, "unsigned")]

    @staticmethod
    def _approx_rsqrt(row: Tensor, col: Tensor) -> Tensor:
        r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        r, c = stored_factors(r, col.unsqueeze(-2).rsqrt())
        return torch.mul(r, c)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        beta1, beta2, beta3 = ctx.hp("betas")
        eps1, eps2 = ctx.hp("eps")
        threshold = ctx.hp("clip_threshold")
        m = ctx.slot("exp_avg")
        out = []
        for i, g in enumerate(updates):
            factored = g.dim() >= 2
            sq = g * g + eps1
            if factored:
                row, col, rrow, rcol = (ctx.slot(k, [i])[0] for k in (
                    "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col"))
                row.mul_(beta2).add_(sq.mean(dim=-1), alpha=1 - beta2)
                col.mul_(beta2).add_(column_mean(sq).squeeze(-2), alpha=1 - beta2)
                u = self._approx_rsqrt(row, col).mul_(g)
            else:
                second = ctx.slot("exp_avg_sq", [i])[0]
                second.mul_(beta2).add_(sq, alpha=1 - beta2)
                u = second.rsqrt().mul_(g)
            clip_by_rms(u, threshold)
            m[i].mul_(beta1).add_(u, alpha=1 - beta1)
            if factored:
                res = (u - m[i]).square_().add_(eps2)
                rrow.mul_(beta3).add_(res.mean(dim=-1), alpha=1 - beta3)
                rcol.mul_(beta3).add_(column_mean(res).squeeze(-2), alpha=1 - beta3)
                out.append(self._approx_rsqrt(rrow, rcol).mul_(m[i]))
            else:
                out.append(m[i].clone())
        return out
