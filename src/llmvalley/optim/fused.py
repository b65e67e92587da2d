"""The fused execution tier: torch's fused kernels, where one computes exactly a recipe's chain
and its parameter write.

- adam / adamw: ``torch._fused_adam_`` / ``torch._fused_adamw_`` (``torch.optim.Adam(W)``
  with ``fused=True``);
- sgd: ``torch._fused_sgd_`` (``torch.optim.SGD(fused=True)``: momentum, dampening, Nesterov,
  coupled decay);
- adagrad: ``torch._fused_adagrad_`` (``torch.optim.Adagrad(fused=True)``: learning-rate
  decay, coupled decay; the accumulator starts at ``initial_accumulator_value``);
- adafactor, came, adamp and sgdp (CPU, float32): the hand-written kernels
  ``kernels/*.cpp`` (:mod:`llmvalley.optim.kernels`): two, three, two and two passes over a
  matrix, where inductor's code for the chains makes six, eight, three and two; the eager
  chains make many more, and ``"auto"`` compiles only after hundreds of steps;
- adamw8bit, adamw4bit and lion8bit (CPU, float32 parameters; 8-/4-bit state, or float32
  where the codec keeps a small tensor unquantized), lion, and adamw with bfloat16 state
  (``state_precision="bf16"`` or ``state_dtype=torch.bfloat16``; float32 state stays on
  torch's kernel): ``kernels/lowbit.cpp``, one pass that decodes each block of the moments,
  updates them, writes the parameter and encodes them again, leaving the chain's codes, block
  scales and stochastically rounded bfloat16 moments bit for bit;
- schedulefree_sgd and schedulefree_adamw (CPU, float32): ``kernels/schedule_free.cpp``, one
  pass over y, z and the gradient (and AdamW's second moment), where the eager chain makes
  four to eight and ``"auto"`` compiles only after hundreds of steps;
- adan (CPU, float32): ``kernels/adan.cpp``, one pass over its three moments, the last
  gradient and the parameter, where the eager chain makes about fifteen;
- spam and grams (CPU, float32): ``kernels/adam_hf.cpp``, one pass of Adam in the HF eps form
  (SPAM's moments reset, spike clipping and warm-up multiplier; Grams' magnitude with the
  gradient's sign), with the write, where the eager chains make about ten;
- stable_spam (CPU, float32): ``kernels/stable_spam.cpp``, two passes over the gradient (the
  peak and the clipped norm together, then the moments and the write; a third while many
  elements come near the clipping limit), where inductor's code makes six;
- fadam (CPU, float32): ``kernels/fadam.cpp``, three passes (the Fisher diagonal with the
  gradient's RMS, the RMS of the natural gradient and decay, then the momentum and the
  write), where the eager chain makes about fourteen;
- mars, and adamw / adagc with AdaGC's clipping (CPU, float32): ``kernels/adam.cpp``, two
  passes for a matrix's MARS-AdamW (the corrected gradient's norm, then the moments, the last
  gradient and the write) and one for the AdamW branch of the other tensors, where the eager
  chain makes about twelve; one pass for AdamW whose gradient it scales by AdaGC's clipping
  factor as it reads it (the shell option ``adagc=True``, the specs' ``fused_options``: the
  norms are taken once, shared with the warm-up's global norm, and no clipped copy of the
  gradients is made).

Each is a spec's ``fused`` callable ``(ctx) -> bool``: it runs the kernel on the group's
tensors and returns True, or returns False (nothing done) and the foreach chain runs. It
runs for ``implementation="fused"`` and is ``"auto"``'s first choice
(:func:`~llmvalley.optim.spec.execution_tier`); not with ``implementation="foreach"`` or
``"compiled"``, with adam's ``fused=False``, when a shell option changes the chain or its
storage (the shell checks; a spec's ``fused_state`` lists the state precisions its kernel
stores itself, its ``fused_options`` the shell options it computes itself), or when the
tensors are not all dense, on one CPU or CUDA device, in one floating dtype. The kernels
compute the same equations as the chains, in their own order: results agree to float
rounding (the differential tests run both paths).
The shell flips the gradients' sign for ``maximize`` before the kernel sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim import kernels, quantize
from llmvalley.optim.state import ABSMAX, _quantizer, group_precision
from llmvalley.optim.transforms.adaptive import ScaleByAdam, ScaleByAdan
from llmvalley.optim.transforms.base import StepContext
from llmvalley.optim.transforms.factored import ScaleByAdafactor, ScaleByCAME
from llmvalley.optim.transforms.momentum import HeavyBall, MARSCorrection
from llmvalley.optim.transforms.schedule_free import ScheduleFree
from llmvalley.optim.transforms.sign import LionDirection
from llmvalley.optim.transforms.stability import (
    AdaptiveGradClip,
    ScaleBySpikeAwareAdam,
    ScaleByStableSPAM,
    stable_spam_scale,
    stable_spam_steps,
)
from llmvalley.optim.transforms.stored import device_number
from llmvalley.optim.transforms.variants import DampedMomentum, ScaleByAdagrad, ScaleByFAdam

FUSED_DEVICES = ("cpu", "cuda")
# instances that declare the slots the kernels update (bound with the default slot keys)
_ADAM = ScaleByAdam()
_HEAVY_BALL = HeavyBall()
_ADAGRAD = ScaleByAdagrad()
_ADAFACTOR = ScaleByAdafactor()
_CAME = ScaleByCAME()
_SGDP = DampedMomentum()
_LION = LionDirection()
_SF_SGD = ScheduleFree("momentum")
_SF_ADAMW = ScheduleFree("betas")
_ADAM_INPUT = ScaleByAdam(first_moment="input")
_ADAGC = AdaptiveGradClip()
_ADAN = ScaleByAdan()
_STABLE_SPAM = ScaleByStableSPAM()
_SPAM = ScaleBySpikeAwareAdam()
_ADAM_HF = ScaleByAdam(eps_form="hf")
_FADAM = ScaleByFAdam()
_MARS = MARSCorrection()


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
    """Adam (``decoupled=False``: coupled decay) or AdamW through torch's fused kernel;
    AdamW with bfloat16 moments through the low-bit kernel (:func:`fused_lowbit_adam`), and
    with AdaGC's clipping (``adagc=True``) through the Adam kernel (:func:`fused_adagc_adam`)."""

    def run(ctx: StepContext) -> bool:
        if not ready(ctx):
            return False
        group = ctx.group
        if group.get("adagc"):
            return decoupled and group_precision(group) is None and fused_adagc_adam(ctx)
        if group_precision(group) is not None:
            # bfloat16 moments (the spec's fused_state): the low-bit kernel stores them
            return decoupled and fused_lowbit_adam(ctx)
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


def _cpu_kernel(ctx: StepContext, name: str) -> Any:
    """The built CPU kernel ``name`` when the group may run it (plain float32 tensors on
    CPU, see :func:`ready`), else None."""
    first = ctx.params[0]
    if not ready(ctx) or first.device.type != "cpu" or first.dtype != torch.float32 \
            or not all(kernels.plain(t) for t in (*ctx.params, *ctx.grads)):
        return None
    return kernels.load(name)


def _dense_slots(ctx: StepContext, transform: Any,
                 names: Callable[[Tensor], tuple[str, ...]]) -> list[list[Tensor]] | None:
    """Each tensor's slots ``names(p)``, or None when one is not dense float32 (or a tensor
    is empty): then the chain runs."""
    slots = ctx.bind(transform, {})
    work = []
    for i, p in enumerate(ctx.params):
        state = [slots.slot(k, [i])[0] for k in names(p)]
        if p.numel() == 0 or any(s.dtype != torch.float32 or not s.is_contiguous()
                                 or not kernels.plain(s) for s in state):
            return None
        work.append(state)
    return work


def _layout(p: Tensor) -> tuple[int, int, int]:
    """``(batch, m, n)``: the batch of ``m x n`` matrices a kernel sees, ``m = 0`` for a
    tensor of fewer than two dimensions (``n`` elements)."""
    if p.dim() > 1:
        m, n = p.shape[-2], p.shape[-1]
        return p.numel() // (m * n), m, n
    return 1, 0, p.numel()


def _shrink(ctx: StepContext, i: int) -> float:
    """The decoupled decay factor ``1 - lr wd`` of tensor ``i`` (the spec's decay form)."""
    return 1.0 - float(ctx.group["lr"]) * ctx.plan.lr_mult[i] * ctx.plan.weight_decay[i]


def fused_adafactor(ctx: StepContext) -> bool:
    """Adafactor through :mod:`llmvalley.optim.kernels`' CPU kernel, for float32 tensors on
    CPU (the spec's decay is decoupled and scaled by ``lr``: ``p *= 1 - lr wd``, as
    torch.optim.Adafactor); anything else, or a machine that cannot build the kernel, runs
    the chain. One call per tensor updates its row/column factors (or a vector's full second
    moment) in place and writes the parameter."""
    kernel = _cpu_kernel(ctx, "adafactor")
    work = kernel and _dense_slots(
        ctx, _ADAFACTOR, lambda p: ("row_var", "col_var") if p.dim() > 1 else ("variance",))
    if not work:
        return False
    group = ctx.group
    eps1, eps2 = group["eps"]
    eps1 = torch.finfo(torch.float32).eps if eps1 is None else eps1
    lr, decay, d = float(group["lr"]), group["beta2_decay"], float(group["d"])
    for i, (p, g, state, t) in enumerate(zip(ctx.params, ctx.grads, work, ctx.steps)):
        row, col = state if len(state) == 2 else (state[0], state[0])
        kernel(p, g, row, col, *_layout(p), float(t**decay), float(eps1), min(lr, t**-0.5),
               float(eps2), d, _shrink(ctx, i), kernels.threads_for(p.numel()))
    return True


def adam_numbers(beta1: float, beta2: float, eps: float, t: int) -> tuple[float, ...]:
    """The numbers of Adam's update at step ``t`` that the kernels take: ``b1, 1 - b1, b2,
    1 - b2`` and the denominator's ``a = bc1 / sqrt(bc2)``, ``b = eps bc1`` (``u = m /
    (sqrt(v) a + b)``, ScaleByAdam's form)."""
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    return beta1, 1 - beta1, beta2, 1 - beta2, bc1 / bc2**0.5, eps * bc1


def _adam_numbers(group: Any) -> Callable[[int], tuple[float, ...]]:
    """:func:`adam_numbers` at the group's ``betas`` and ``eps``, as a function of ``t``."""
    beta1, beta2 = group["betas"]
    return lambda t: adam_numbers(beta1, beta2, group["eps"], t)


def _projected(ctx: StepContext, kernel: Any, work: list[list[Tensor]], mode: int,
               numbers: Callable[[int], tuple[float, ...]], wd_scale: float) -> None:
    """AdamP's / SGDP's kernel on every tensor: ``numbers(t)`` are its six direction numbers
    at step ``t`` (see ``kernels/projected.cpp``), ``wd_scale`` multiplies the decay."""
    group = ctx.group
    eps, lr = group["eps"], float(group["lr"])
    for i, (p, g, state, t) in enumerate(zip(ctx.params, ctx.grads, work, ctx.steps)):
        s1, s2 = (state + [p, p])[:2]  # the unused pointers are never read
        rows = p.shape[0] if p.dim() > 1 else 1
        kernel(p, g, s1, s2, rows, p.numel() // rows, *numbers(t), lr * ctx.plan.lr_mult[i],
               ctx.plan.weight_decay[i] * wd_scale, group["wd_ratio"], group["delta"], eps,
               int(group["nesterov"]), int(p.dim() > 1), kernels.threads_for(p.numel()), mode)


def fused_adamp(ctx: StepContext) -> bool:
    """AdamP through :mod:`llmvalley.optim.kernels`' CPU kernel, under the same conditions as
    :func:`fused_adafactor` (decay ``p *= 1 - lr wd``, times ``wd_ratio`` where the tensor is
    projected, as clovaai/AdamP). One call per tensor updates its moments in place, makes the
    projection's choice and writes the parameter."""
    kernel = _cpu_kernel(ctx, "projected")
    work = kernel and _dense_slots(ctx, _ADAM, lambda p: ("exp_avg", "exp_avg_sq"))
    if not work:
        return False
    _projected(ctx, kernel, work, 0, _adam_numbers(ctx.group), 1.0)
    return True


def fused_sgdp(ctx: StepContext) -> bool:
    """SGDP through the same kernel (its momentum buffer starts from zero, as
    :class:`~llmvalley.optim.transforms.variants.DampedMomentum`; the decay is divided by
    ``1 - momentum`` for every tensor, as clovaai/AdamP)."""
    momentum = ctx.group["momentum"]
    names = ("momentum_buffer",) if momentum != 0 else ()
    kernel = _cpu_kernel(ctx, "projected")
    work = kernel and _dense_slots(ctx, _SGDP, lambda p: names)
    if not work:
        return False
    keep = 1.0 - ctx.group["dampening"]
    _projected(ctx, kernel, work, 1 if momentum != 0 else 2,
               lambda t: (momentum, keep, 0.0, 0.0, 0.0, 0.0), 1.0 / (1.0 - momentum))
    return True


def fused_came(ctx: StepContext) -> bool:
    """CAME through :mod:`llmvalley.optim.kernels`' CPU kernel, under the same conditions as
    :func:`fused_adafactor` (decay ``p *= 1 - lr wd``, as came-pytorch). One call per tensor
    updates its momentum and factors in place and writes the parameter."""
    kernel = _cpu_kernel(ctx, "came")
    work = kernel and _dense_slots(ctx, _CAME, lambda p: (
        ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col")
        if p.dim() > 1 else ("exp_avg", "exp_avg_sq")))
    if not work:
        return False
    group = ctx.group
    beta1, beta2, beta3 = group["betas"]
    eps1, eps2 = group["eps"]
    lr = float(group["lr"])
    for i, (p, g, state) in enumerate(zip(ctx.params, ctx.grads, work)):
        if len(state) == 5:
            exp_avg, row, col, rrow, rcol = state
        else:
            exp_avg, row = state
            col = rrow = rcol = row
        kernel(p, g, exp_avg, row, col, rrow, rcol, *_layout(p), lr * ctx.plan.lr_mult[i],
               beta1, 1 - beta1, beta2, 1 - beta2, beta3, 1 - beta3, eps1, eps2,
               float(group["clip_threshold"]), _shrink(ctx, i), kernels.threads_for(p.numel()))
    return True


def _schedule_free(ctx: StepContext, transform: ScheduleFree, adam: bool) -> bool:
    """Schedule-free SGD or AdamW (training mode) through :mod:`llmvalley.optim.kernels`' CPU
    kernel, for float32 tensors on CPU: one pass per tensor over y (the parameter), z, the
    gradient (and AdamW's second moment), with the coupled decay, at the numbers the chain's
    prelude gives (which it advances: ``lr_max``, ``weight_sum``). A z created this step
    starts at y, as the chain's."""
    kernel = _cpu_kernel(ctx, "schedule_free")
    work = kernel and _dense_slots(ctx, transform, lambda p: ("z",))
    seconds = work and adam and _dense_slots(ctx, _ADAM_INPUT, lambda p: ("exp_avg_sq",))
    if not work or (adam and not seconds):
        return False
    bound = ctx.bind(transform, {})
    numbers = bound.prelude()
    group = ctx.group
    wd = float(group["weight_decay"])
    beta2 = group["betas"][1] if adam else 0.0
    eps = group["eps"] if adam else 0.0
    for i, (p, g, (z,), fresh, t) in enumerate(zip(ctx.params, ctx.grads, work,
                                                   bound.fresh("z"), ctx.steps)):
        if fresh:
            z.copy_(p)
        v = seconds[i][0] if adam else z  # SGD: never read
        kernel(p, g, z, v, p.numel(), wd, numbers["c"][i], numbers["coef"][i],
               numbers["lr"][i], beta2, 1 - beta2, 1 / (1 - beta2**t) ** 0.5 if adam else 0.0,
               eps, int(adam), kernels.threads_for(p.numel()))
    return True


def fused_schedule_free_sgd(ctx: StepContext) -> bool:
    """Schedule-free SGD through the schedule-free kernel (:func:`_schedule_free`)."""
    return _schedule_free(ctx, _SF_SGD, adam=False)


def fused_schedule_free_adamw(ctx: StepContext) -> bool:
    """Schedule-free AdamW through the schedule-free kernel (:func:`_schedule_free`)."""
    return _schedule_free(ctx, _SF_ADAMW, adam=True)


def _adam_hf(ctx: StepContext, transform: ScaleByAdam, numbers: Mapping[str, list[Any]],
             grams: bool, decay_after: bool) -> bool:
    """The HF-eps-form Adam kernel (``kernels/adam_hf.cpp``) on every tensor of the group, with
    SPAM's per-tensor ``numbers`` (``reset``, ``clip``, ``ramp``; none for Grams)."""
    kernel = _cpu_kernel(ctx, "adam_hf")
    work = kernel and _dense_slots(ctx, transform, lambda p: ("exp_avg", "exp_avg_sq"))
    if not work:
        return False
    group = ctx.group
    beta1, beta2 = group["betas"]
    lr, eps = float(group["lr"]), float(group["eps"])
    theta = float(group.get("threshold", 0.0))
    for i, (p, g, (m, v), t) in enumerate(zip(ctx.params, ctx.grads, work, ctx.steps)):
        scale = math.sqrt(1 - beta2**t) / (1 - beta1**t)
        kernel(p, g, m, v, p.numel(), theta, int(bool(numbers and numbers["clip"][i])),
               int(bool(numbers and numbers["reset"][i])), 1 - beta1, beta2, 1 - beta2, eps,
               scale, float(numbers["ramp"][i]) if numbers else 1.0, int(grams),
               lr * ctx.plan.lr_mult[i], _shrink(ctx, i), int(ctx.plan.weight_decay[i] != 0),
               int(decay_after), kernels.threads_for(p.numel()))
    return True


def fused_spam(ctx: StepContext) -> bool:
    """SPAM through :mod:`llmvalley.optim.kernels`' HF-eps-form Adam kernel, for float32
    tensors on CPU: one pass per tensor (moments reset, spike clipping, Adam, the warm-up
    multiplier, the write and the decay after it), at the flags and multipliers of the
    transform's prelude."""
    return _adam_hf(ctx, _SPAM, ctx.bind(_SPAM, {}).prelude(), grams=False, decay_after=True)


def fused_grams(ctx: StepContext) -> bool:
    """Grams through the same kernel: one pass per tensor (Adam in the HF eps form, the
    magnitude of its update with the gradient's sign, the decay and the write)."""
    return _adam_hf(ctx, _ADAM_HF, {}, grams=True, decay_after=False)


def fused_stable_spam(ctx: StepContext) -> bool:
    """Stable-SPAM through :mod:`llmvalley.optim.kernels`' CPU kernel, for float32 tensors on
    CPU (decay ``p *= 1 - lr wd``): three passes per tensor (the gradient's peak, the clipped
    gradient's norm, then the moments and the write), its three statistics updated in place,
    at the numbers of the transform's prelude (bias corrections at the restarted counts,
    reset flags) and Adam's restarted step count, with or without ``total_steps``' cosine
    factor."""
    kernel = _cpu_kernel(ctx, "stable_spam")
    work = kernel and _dense_slots(ctx, _STABLE_SPAM, lambda p: (
        "exp_avg", "exp_avg_sq", *ScaleByStableSPAM.STATS))
    if not work:
        return False
    group = ctx.group
    numbers = ctx.bind(_STABLE_SPAM, {}).prelude()
    g1, g2, g3 = (float(group[k]) for k in ("gamma1", "gamma2", "gamma3"))
    beta1, beta2 = group["betas"]
    eps, lr, interval = float(group["eps"]), float(group["lr"]), int(group["reset_interval"])
    total, eta_min = group["total_steps"], float(group["eta_min"])
    for i, (p, g, state, t) in enumerate(zip(ctx.params, ctx.grads, work, ctx.steps)):
        s = stable_spam_scale(t, total, eta_min)
        adam = adam_numbers(beta1 * s, beta2, eps, stable_spam_steps(t, interval)[1])
        kernel(p, g, *state, p.numel(), g1 * s, 1 - g1 * s, g2, 1 - g2, g3, 1 - g3,
               numbers["c_max"][i], numbers["c_norm"][i], numbers["c_sq"][i], eps,
               int(numbers["reset"][i]), *adam[1:], lr * ctx.plan.lr_mult[i], _shrink(ctx, i),
               int(ctx.plan.weight_decay[i] != 0), kernels.threads_for(p.numel()))
    return True


def fused_fadam(ctx: StepContext) -> bool:
    """FAdam through :mod:`llmvalley.optim.kernels`' CPU kernel, for float32 tensors on CPU:
    three passes per tensor (the Fisher diagonal with the gradient's RMS, the RMS of the
    natural gradient and of the natural decay, then the momentum and the write), at the
    ``beta2_t`` of the transform's prelude. FAdam's decay is in its direction (the spec's
    decay form is ``"none"``)."""
    kernel = _cpu_kernel(ctx, "fadam")
    work = kernel and _dense_slots(ctx, _FADAM, lambda p: ("momentum", "fim"))
    if not work:
        return False
    group = ctx.group
    beta2_t = ctx.bind(_FADAM, {}).prelude()["beta2_t"]
    beta1, lr = group["betas"][0], float(group["lr"])
    for i, (p, g, (m, f)) in enumerate(zip(ctx.params, ctx.grads, work)):
        kernel(p, g, m, f, p.numel(), beta2_t[i], 1 - beta2_t[i], 1 - beta1,
               float(group["eps"]), float(group["clip"]), float(group["p"]),
               float(group["weight_decay"]), lr * ctx.plan.lr_mult[i],
               kernels.threads_for(p.numel()))
    return True


def fused_adan(ctx: StepContext) -> bool:
    """Adan through :mod:`llmvalley.optim.kernels`' CPU kernel, for float32 tensors on CPU: one
    pass per tensor (its three moments, the last gradient and the write, with the proximal
    decay, or the decoupled one with ``no_prox``). A last gradient created this step makes the
    first difference zero, as the chain's."""
    kernel = _cpu_kernel(ctx, "adan")
    work = kernel and _dense_slots(ctx, _ADAN, lambda p: (
        "exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"))
    if not work:
        return False
    group = ctx.group
    beta1, beta2, beta3 = group["betas"]
    eps, lr, proximal = float(group["eps"]), float(group["lr"]), not group["no_prox"]
    fresh = ctx.bind(_ADAN, {}).fresh("prev_grad")
    for i, (p, g, state, t) in enumerate(zip(ctx.params, ctx.grads, work, ctx.steps)):
        rate, wd = lr * ctx.plan.lr_mult[i], ctx.plan.weight_decay[i]
        kernel(p, g, *state, p.numel(), int(fresh[i]), 1 - beta1, beta2, 1 - beta2, beta3,
               1 - beta3, 1 - beta1**t, beta2 / (1 - beta2**t), math.sqrt(1 - beta3**t), eps,
               rate, 1 + rate * wd if proximal else 1 - rate * wd, int(wd != 0), int(not proximal),
               kernels.threads_for(p.numel()))
    return True


def fused_adagc_adam(ctx: StepContext) -> bool:
    """AdamW with AdaGC's clipping (``adagc=True``; the adagc recipe) through
    :mod:`llmvalley.optim.kernels`' Adam kernel, for float32 tensors on CPU without
    ``amsgrad``: one pass per tensor that scales the gradient by its clipping factor as it
    reads it (torch's fused kernels take a gradient scale too, but write the unscaled gradient
    back into ``.grad``). The factors are computed once the kernel is certain to run; their
    norms are the warm-up's global norm's (one read of the gradients for both)."""
    if ctx.group.get("amsgrad"):
        return False
    kernel = _cpu_kernel(ctx, "adam")
    work = kernel and _dense_slots(ctx, _ADAM, lambda p: ("exp_avg", "exp_avg_sq"))
    if not work:
        return False
    factors = _ADAGC.factors(ctx.bind(_ADAGC, {}), ctx.grads)
    numbers = _adam_numbers(ctx.group)
    lr = float(ctx.group["lr"])
    for i, (p, g, (m, v), t) in enumerate(zip(ctx.params, ctx.grads, work, ctx.steps)):
        kernel(p, g, m, v, m, p.numel(), 0.0, 0, float(factors[i]), *numbers(t)[1:],
               lr * ctx.plan.lr_mult[i], _shrink(ctx, i), int(ctx.plan.weight_decay[i] != 0),
               kernels.threads_for(p.numel()))
    return True


def fused_mars(ctx: StepContext) -> bool:
    """MARS through :mod:`llmvalley.optim.kernels`' Adam kernel, for float32 tensors on CPU:
    the matrices' MARS-AdamW in two passes (the corrected gradient's norm, then the moments,
    the last gradient and the write), the other tensors' AdamW branch (``betas_1d``,
    ``weight_decay_1d``, the rate ``lr_1d``) in one, as the recipe's partition sends them."""
    from llmvalley.optim.recipes.adaptive import _mars_branch, _mars_vector_lr

    kernel = _cpu_kernel(ctx, "adam")
    if not kernel:
        return False
    group = ctx.group
    matrix = [_mars_branch(tuple(p.shape), group) == "matrix" for p in ctx.params]
    adam = _dense_slots(ctx, _ADAM, lambda p: ("exp_avg", "exp_avg_sq"))
    matrices = [i for i, mat in enumerate(matrix) if mat]
    lasts = _dense_slots(ctx.subset(matrices), _MARS, lambda p: ("last_grad",)) \
        if matrices else []
    if adam is None or lasts is None:
        return False
    lasts = iter(lasts)
    lr, eps = float(group["lr"]), float(group["eps"])
    vector_mult = _mars_vector_lr(group) if not all(matrix) else 1.0
    for i, (p, g, (m, v), t) in enumerate(zip(ctx.params, ctx.grads, adam, ctx.steps)):
        if matrix[i]:
            (beta1, beta2), wd, rate = group["betas"], ctx.plan.weight_decay[i], lr
            (last,) = next(lasts)
            k = float(group["gamma"]) * beta1 / (1 - beta1)
        else:
            (beta1, beta2), wd = group["betas_1d"], group["weight_decay_1d"]
            rate, last, k = lr * vector_mult, m, 0.0  # no correction: last is never read
        rate *= ctx.plan.lr_mult[i]
        kernel(p, g, m, v, last, p.numel(), k, int(matrix[i]), 1.0,
               *adam_numbers(beta1, beta2, eps, t)[1:], rate, 1.0 - rate * wd, int(wd != 0),
               kernels.threads_for(p.numel()))
    return True


#: the state kinds the low-bit kernel reads: 8-bit codes, 4-bit codes, bfloat16, float32
_KINDS = {"int8": 8, "int4": 4, torch.bfloat16: 16, torch.float32: 32}


def _tables(kind: str, signed: bool) -> tuple[Tensor, Tensor | None]:
    """The code map of a quantized slot and its nearest-entry table (the codec's own,
    :func:`~llmvalley.optim.quantize._code_table`; None for a map it cannot tabulate), on
    CPU."""
    found = _TABLES.get((kind, signed))
    if found is None:
        qmap = _quantizer(kind, signed, torch.device("cpu")).qmap
        table = quantize._code_table(tuple(qmap.tolist()), "cpu")
        found = _TABLES[(kind, signed)] = (qmap, table)
    return found


_TABLES: dict[tuple[str, bool], tuple[Tensor, Tensor | None]] = {}


def _lowbit_slots(ctx: StepContext, transform: Any, names: tuple[str, ...]
                  ) -> list[list[tuple[int, Tensor, Tensor, Tensor, Tensor, int]]] | None:
    """Each tensor's slots ``names`` as the low-bit kernel takes them, ``(kind, data,
    absmax, map, table, seed)``: kind 8 or 4 (codes), 16 (bfloat16, rounded stochastically
    with the codec's seed of this step: the chain's bits) or 32 (float32, also where the codec
    keeps a small tensor unquantized); None when a slot is stored otherwise (float16, another
    layout) or a tensor is empty: then the chain runs."""
    bound = ctx.bind(transform, {})
    work = []
    for i, p in enumerate(ctx.params):
        if p.numel() == 0:
            return None
        state = ctx.states[i]
        slots = []
        for name in names:
            key = bound.ensure(i, name)
            data, absmax = state[key], state.get(key + ABSMAX)
            if not (kernels.plain(data) and data.is_contiguous()):
                return None
            if absmax is None:
                kind = _KINDS.get(data.dtype)
                if kind is None:
                    return None
                seed = ctx.codec.seed(key, bound._spec(i, name).shape) if kind == 16 else 0
                slots.append((kind, data, data, data, data, seed))  # map and table unused
                continue
            kind = "int8" if data.numel() == p.numel() else "int4"
            if data.dtype != torch.uint8 or absmax.dtype != torch.float32 \
                    or not absmax.is_contiguous():
                return None
            qmap, table = _tables(kind, bound._spec(i, name).role == "signed")
            if table is None:
                return None
            slots.append((_KINDS[kind], data, absmax, qmap, table, 0))
        work.append(slots)
    return work


def _lowbit(ctx: StepContext, transform: Any, names: tuple[str, ...], mode: int,
            numbers: Callable[[int], tuple[float, ...]]) -> bool:
    """The low-bit kernel (``kernels/lowbit.cpp``) on every tensor of the group: ``mode`` 0
    Adam, 1 Lion; ``numbers(t)``: its six numbers at step ``t``."""
    kernel = _cpu_kernel(ctx, "lowbit")
    work = kernel and _lowbit_slots(ctx, transform, names)
    if not work:
        return False
    lr = float(ctx.group["lr"])
    for i, (p, g, slots, t) in enumerate(zip(ctx.params, ctx.grads, work, ctx.steps)):
        m = slots[0]
        v = slots[1] if len(slots) > 1 else m  # Lion: never read
        rate = lr * ctx.plan.lr_mult[i]
        kernel(p, g, m[1], m[2], m[3], m[4], v[1], v[2], v[3], v[4], p.numel(), m[0], v[0],
               m[5], v[5], *numbers(t), rate, _shrink(ctx, i),
               int(ctx.plan.weight_decay[i] != 0), mode, kernels.threads_for(p.numel()))
    return True


def fused_lowbit_adam(ctx: StepContext) -> bool:
    """AdamW with 8-bit, 4-bit or bfloat16 moments (adamw8bit, adamw4bit; adamw) through
    :mod:`llmvalley.optim.kernels`' CPU kernel, for float32 tensors on CPU (decay ``p *= 1 -
    lr wd``): one pass per tensor decodes each block of the moments, updates them, writes
    the parameter and encodes them again, with the codec's maps and nearest-entry rule (the
    same codes as the chain for the same moments). ``amsgrad`` runs the chain."""
    if ctx.group.get("amsgrad"):
        return False
    return _lowbit(ctx, _ADAM, ("exp_avg", "exp_avg_sq"), 0, _adam_numbers(ctx.group))


def fused_lowbit_lion(ctx: StepContext) -> bool:
    """Lion (float32 or bfloat16 momentum) and lion8bit (8-bit or 4-bit) through the same
    kernel."""
    beta1, beta2 = ctx.group["betas"]
    return _lowbit(ctx, _LION, ("exp_avg",), 1,
                   lambda t: (beta1, 1 - beta1, beta2, 1 - beta2, 0.0, 0.0))


__all__ = ["FUSED_DEVICES", "fused_adafactor", "fused_adagc_adam", "fused_adagrad",
           "fused_adam", "fused_adamp", "fused_adan", "fused_came", "fused_fadam",
           "fused_grams", "fused_lowbit_adam", "fused_lowbit_lion", "fused_mars",
           "fused_schedule_free_adamw", "fused_schedule_free_sgd", "fused_sgd", "fused_sgdp",
           "fused_spam", "fused_stable_spam", "ready"]
