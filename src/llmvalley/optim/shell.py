"""The one ``torch.optim.Optimizer`` that runs every llmvalley recipe.

Each parameter group names its recipe under ``"optimizer"``, so a single optimizer can hold,
say, Muon for hidden matrices and AdamW for the rest, with standard ``param_groups``, LR
schedulers and ``state_dict()`` / ``load_state_dict()``.

Precision: low-precision (bf16/fp16) parameters are updated through a float32 working copy
and float32 state unless ``state_dtype`` says otherwise, so each step rounds once.

Non-finite gradients (``nonfinite``): ``"raise"`` (default) raises ``FloatingPointError``
naming the parameter before any state changes; ``"skip"`` skips the whole step (every group,
nothing touched) and counts it in ``optimizer.skipped_steps``; ``"ignore"`` does no check
(no host sync, for speed when the training loop checks already).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim.registry import OptimizerSpec, get_spec
from llmvalley.optim.transforms.base import StepContext

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a parameter's update is computed and its state stored in."""
    if state_dtype is not None:
        return state_dtype
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


class ChainOptimizer(torch.optim.Optimizer):
    """Runs the transform chain of each group's recipe.

    Args:
        params: parameters or parameter-group dicts, as for any torch optimizer. A group may
            name another recipe under ``"optimizer"``; missing keys come from that recipe's
            defaults.
        optimizer: the default recipe name (or spec).
        **hparams: hyperparameters of the default recipe, plus the shell options
            ``maximize``, ``nonfinite`` and ``state_dtype``.
    """

    def __init__(
        self, params: Iterable[Any], optimizer: str | OptimizerSpec, **hparams: Any
    ) -> None:
        spec = get_spec(optimizer)
        defaults = spec.resolve(hparams)
        defaults["optimizer"] = spec.name
        self.skipped_steps = 0
        self._names: dict[int, str] = {}
        super().__init__(params, defaults)

    # ---- groups -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = param_group.get("optimizer", self.defaults["optimizer"])
        spec = get_spec(name)
        if spec.name == self.defaults["optimizer"]:
            base = dict(self.defaults)
        else:
            base = {**spec.resolve({}), "optimizer": spec.name}
        param_group["optimizer"] = spec.name
        saved, self.defaults = self.defaults, base
        try:
            super().add_param_group(param_group)
        finally:
            self.defaults = saved
        group = self.param_groups[-1]
        spec.validate(group)
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            label = names[i] if names else f"group {len(self.param_groups) - 1} param {i}"
            self._names[id(p)] = f"{label} (shape {tuple(p.shape)})"
        if spec.applies_to == "matrix":
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"{spec.name} applies to weight matrices only, and "
                        f"{self.param_name(p)} has {p.ndim} dimension(s): put it in a group "
                        "with another optimizer (e.g. {'params': [...], 'optimizer': 'adamw'}), "
                        f"or pass the model itself to create_optimizer('{spec.name}', model) "
                        "to route embeddings, head, norms and biases to a fallback"
                    )

    # ---- checkpoints ----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, but keep each state tensor's saved dtype.

        ``torch.optim.Optimizer`` casts floating state to the parameter's dtype, which would
        round the float32 state of bf16 parameters to bf16 and break bit-exact resume.
        Tensors are moved to their parameter's device (so a checkpoint moves across devices).
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, params))
        for pid, st in saved_state.items():
            p = id_to_param.get(pid)
            if p is None:
                continue
            self.state[p] = {
                k: v.detach().to(device=p.device, copy=True) if isinstance(v, Tensor) else v
                for k, v in st.items()
            }

    def param_name(self, p: Tensor) -> str:
        return self._names.get(id(p), f"parameter of shape {tuple(p.shape)}")

    # ---- step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step (see the class docstring for the NaN policy)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{group['optimizer']}: sparse gradients are not supported "
                        f"({self.param_name(p)})"
                    )
            if params:
                work.append((group, params))
        for group, params in work:
            if group["nonfinite"] == "ignore":
                continue
            bad = first_nonfinite([p.grad for p in params])
            if bad is None:
                continue
            if group["nonfinite"] == "skip":
                self.skipped_steps += 1
                return loss
            raise FloatingPointError(
                f"{group['optimizer']}: non-finite gradient in {self.param_name(params[bad])}; "
                "no parameter or state was changed. Pass nonfinite='skip' to skip such steps."
            )
        for group, params in work:
            self._step_group(group, params)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        spec = get_spec(group["optimizer"])
        state_dtype = group["state_dtype"]
        if isinstance(state_dtype, str):
            state_dtype = getattr(torch, state_dtype)
        working, grads, states, steps = [], [], [], []
        for p in params:
            dtype = compute_dtype(p, state_dtype)
            working.append(p if p.dtype == dtype else p.detach().to(dtype))
            g = p.grad if p.grad.dtype == dtype else p.grad.to(dtype)
            grads.append(g)
            st = self.state[p]
            st["step"] = st.get("step", 0) + 1
            states.append(st)
            steps.append(st["step"])
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        ctx = StepContext(
            params=working, grads=grads, states=states, steps=steps, group=group,
            names=[self.param_name(p) for p in params],
        )
        if spec.fused is None or not spec.fused(ctx):
            updates = grads
            for transform in spec.chain(group):
                updates = transform(ctx, updates)
        for p, w in zip(params, working):
            if w is not p:
                p.copy_(w)


def first_nonfinite(tensors: list[Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or inf (one host sync), or None."""
    if not tensors:
        return None
    maxima = torch._foreach_norm(tensors, ord=float("inf"))
    finite = torch.stack([m.float() for m in maxima]).isfinite()
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0])
