"""Wrappers that run any recipe's chain inside: Lookahead (Zhang et al., arXiv 1907.08610).

Lookahead keeps slow weights ``phi`` (the initial point at first). The inner optimizer takes
its usual ("fast") steps; every ``k`` of them, ``phi += alpha * (theta - phi)`` with ``theta``
the fast weights after that step, and the parameters are reset to ``phi``. The wrapper returns
the inner direction unchanged on other steps; on a synchronisation step it computes the fast
weights as the shell would (the inner plan, learning rate and weight decay) and returns the
move to the new slow weights as an absolute step with no weight decay of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from llmvalley.optim.transforms.base import Shape, SlotSpec, StepContext, Transform
from llmvalley.optim.transforms.combine import Combinator, chain_paths, chain_slots, run_chain

Group = Mapping[str, Any]


class Lookahead(Combinator):
    """Lookahead around ``inner`` (any recipe's chain).

    ``decay_of(group)`` is the inner recipe's :class:`~llmvalley.optim.spec.Decay` (the form the
    shell applies), so that a synchronisation step lands where the fast step would have landed
    before averaging. Hyperparameters ``k`` (steps between synchronisations) and ``alpha``
    (slow step size). State: ``slow_param`` (``"exact"``: weights are never quantised).
    """

    elementwise = True

    slot_names = ("slow_param",)

    def __init__(self, inner: list[Transform], decay_of: Callable[[Group], Any]) -> None:
        self.inner = list(inner)
        self.decay_of = decay_of
        self.needs_loss = any(t.needs_loss for p in self.paths() for t in p[1:])

    def paths(self) -> list[list[Transform]]:
        return [[self, *p] for p in chain_paths(self.inner)]

    def slots(self, shape: Shape, group: Group, name: str = "") -> list[SlotSpec]:
        return [SlotSpec("slow_param", shape, "exact")]

    def inner_slots(self, shape, group, name=""):
        return chain_slots(self.inner, shape, group, name)

    def __call__(self, ctx: StepContext, updates: list[Tensor]) -> list[Tensor]:
        from llmvalley.optim.shell import apply_step

        slow = ctx.slot("slow_param")
        for s, p, fresh in zip(slow, ctx.params, ctx.fresh("slow_param")):
            if fresh:  # the slow weights start at the initial point
                s.copy_(p)
        out = run_chain(self.inner, ctx, updates, ctx.keymap)
        k, alpha = int(ctx.hp("k")), float(ctx.hp("alpha"))
        due = [i for i, t in enumerate(ctx.steps) if t % k == 0]
        if not due:
            return out
        decay = self.decay_of(ctx.group)
        fast = [ctx.params[i].clone() for i in due]
        form = decay.form if decay.form != "coupled" else "none"
        apply_step(fast, [out[i] for i in due], ctx.plan.take(due), float(ctx.hp("lr")),
                   form, decay.scaled(ctx.group))
        out = list(out)
        for j, i in enumerate(due):
            slow[i].lerp_(fast[j], alpha)
            out[i] = ctx.params[i] - slow[i]
            ctx.plan.scale[i], ctx.plan.lr_mult[i] = 1.0, 1.0
            ctx.plan.absolute[i], ctx.plan.weight_decay[i] = True, 0.0
            ctx.plan.decay_rate[i] = None
        return out
