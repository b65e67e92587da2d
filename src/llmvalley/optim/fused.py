"""The fused execution tier: torch's fused kernels, where one computes exactly a recipe's chain
and its parameter write.

- adam / adamw: ``torch._fused_adam_`` / ``torch._fused_adamw_`` (``torch.optim.Adam(W)``
  with ``fused=True``);
- sgd: ``torch._fused_sgd_`` (``torch.optim.SGD(fused=True)``: momentum, dampening, Nesterov,
  coupled decay);
- adagrad: ``torch._fused_adagrad_`` (``torch.optim.Adagrad(fused=True)``: learning-rate
  decay, coupled decay; the accumulator starts at ``initial_accumulator_value``).

Each is a spec's ``fused`` callable ``(ctx) -> bool``: it runs the kernel on the group's
tensors and returns True, or returns False (nothing done) and the foreach chain runs. It
runs for ``implementation="fused"`` and is ``"auto"``'s first choice
(:func:`~llmvalley.optim.spec.execution_tier`); not with ``implementation="foreach"`` or
``"compiled"``, with adam's ``fused=False``, when a shell option changes the chain or its
storage (the shell checks), or when the tensors are not all dense, on one CPU or CUDA
device, in one floating dtype. The kernels compute the same equations as the chains, in
their own order: results agree to float rounding (the differential tests run both paths).
The shell flips the gradients' sign for ``maximize`` before the kernel sees them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmvalley.optim.transforms.adaptive import ScaleByAdam
from llmvalley.optim.transforms.base import StepContext
from llmvalley.optim.transforms.momentum import HeavyBall
from llmvalley.optim.transforms.stored import device_number
from llmvalley.optim.transforms.variants import ScaleByAdagrad

FUSED_DEVICES = ("cpu", "cuda")
# instances that declare the slots the kernels update (bound with the default slot keys)
_ADAM = ScaleByAdam()
_HEAVY_BALL = HeavyBall()
_ADAGRAD = ScaleByAdagrad()


def ready(ctx: StepContext) -> bool:
    """Whether the group may run a fused kernel: not asked for another tier, and its tensors
    dense, on one CPU/CUDA device, in one floating dtype."""
    group = ctx.group
    if group.get("fused") is False or group.get("implementation") in ("foreach", "compiled"):
        return False
    first = ctx.params[0]
    if first.device.type not in FUSED_DEVICES or not first.is_floating_point():
        return False
    for p, g in zip(ctx.params, ctx.grads):
        if p.dtype != first.dtype or g.dtype != first.dtype or p.device != first.device:
            return False
        if not (p.is_contiguous() and g.is_contiguous()):  # the kernels assume dense
            return False
    return True


def _step_tensors(ctx: StepContext) -> list[torch.Tensor]:
    """Each tensor's step count of this step as a float tensor (what the kernels read)."""
    device = ctx.params[0].device
    dtype = torch.get_default_dtype()
    made = {t: device_number(float(t), device, dtype) for t in set(ctx.steps)}
    return [made[t] for t in ctx.steps]


def fused_adam(decoupled: bool) -> Callable[[StepContext], bool]:
    """Adam (``decoupled=False``: coupled decay) or AdamW through torch's fused kernel."""

    def run(ctx: StepContext) -> bool:
        if not ready(ctx):
            return False
        group = ctx.group
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        slots = ctx.bind(_ADAM, {})
        kernel(
            ctx.params, ctx.grads, slots.slot("exp_avg"), slots.slot("exp_avg_sq"),
            slots.slot("max_exp_avg_sq") if amsgrad else [], _step_tensors(ctx),
            lr=float(group["lr"]), beta1=beta1, beta2=beta2,
            weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=amsgrad,
            maximize=False, grad_scale=None, found_inf=None,
        )
        return True

    return run


def fused_sgd(ctx: StepContext) -> bool:
    """SGD through torch's fused kernel. A momentum buffer created this step starts as the
    update (``is_first_step``), as :class:`~llmvalley.optim.transforms.HeavyBall` does: the
    kernel runs once for the tensors whose buffer is new and once for the others."""
    if not ready(ctx):
        return False
    group = ctx.group
    momentum = group["momentum"]
    options = dict(weight_decay=group["weight_decay"], momentum=momentum,
                   lr=float(group["lr"]), dampening=group["dampening"],
                   nesterov=group["nesterov"], maximize=False, grad_scale=None, found_inf=None)
    if momentum == 0:  # no buffer
        torch._fused_sgd_(ctx.params, ctx.grads, [], is_first_step=False, **options)
        return True
    slots = ctx.bind(_HEAVY_BALL, {})
    buffers, fresh = slots.slot("momentum_buffer"), slots.fresh("momentum_buffer")
    for first in (True, False):
        idx = [i for i, f in enumerate(fresh) if f == first]
        if idx:
            torch._fused_sgd_([ctx.params[i] for i in idx], [ctx.grads[i] for i in idx],
                              [buffers[i] for i in idx], is_first_step=first, **options)
    return True


def fused_adagrad(ctx: StepContext) -> bool:
    """Adagrad through torch's fused kernel (an accumulator created this step is filled with
    ``initial_accumulator_value`` first, as :class:`~llmvalley.optim.transforms.ScaleByAdagrad`
    does)."""
    if not ready(ctx):
        return False
    group = ctx.group
    slots = ctx.bind(_ADAGRAD, {})
    sums = slots.slot("sum")
    for s, fresh in zip(sums, slots.fresh("sum")):
        if fresh:
            s.fill_(group["initial_accumulator_value"])
    torch._fused_adagrad_(
        ctx.params, ctx.grads, sums, _step_tensors(ctx), lr=float(group["lr"]),
        lr_decay=group["lr_decay"], weight_decay=group["weight_decay"], eps=group["eps"],
        maximize=False, grad_scale=None, found_inf=None,
    )
    return True


__all__ = ["FUSED_DEVICES", "fused_adagrad", "fused_adam", "fused_sgd", "ready"]
