"""``llmvalley.optim``: LLM optimizers built from composable transforms.

Public entry points: :func:`create_optimizer`, :func:`list_optimizers`, :func:`get_spec`,
:func:`state_bytes` and the :class:`ChainOptimizer` shell.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from llmvalley.optim.catalogue import Paper
from llmvalley.optim.memory import global_state_bytes, state_bytes
from llmvalley.optim.registry import get_spec, list_optimizers, register
from llmvalley.optim.routing import Matcher, Rule, route
from llmvalley.optim.shell import ChainOptimizer
from llmvalley.optim.spec import Decay, OptimizerSpec, spec_from_chain


def create_optimizer(
    name: str,
    model_or_params: torch.nn.Module | Iterable[Any],
    *,
    fallback: str | None = "adamw",
    fallback_hparams: dict[str, Any] | None = None,
    rules: Sequence[Rule] = (),
    no_decay: Sequence[Matcher] | None = None,
    matrix_ndim: str = "2",
    **hparams: Any,
) -> ChainOptimizer:
    """Create a registered optimizer.

    Given parameters or param-group dicts it behaves like any torch optimizer (a matrix-only
    method then rejects non-matrix parameters, naming them). Given an ``nn.Module`` it
    routes (see :mod:`llmvalley.optim.routing`): hidden 2-D weights go to ``name``;
    embeddings, output head, norms and biases go to ``fallback`` with ``fallback_hparams``
    when ``name`` is matrix-only; weight decay applies to >= 2-D weights only unless
    ``no_decay`` or a rule says otherwise.

    Args:
        name: a registry name (see :func:`list_optimizers`).
        model_or_params: an ``nn.Module``, an iterable of tensors, or param-group dicts.
        fallback: recipe for parameters a matrix-only method cannot take (None: error).
        fallback_hparams: hyperparameters of the fallback recipe (default: the spec's
            ``fallback_hparams`` when the fallback is ``adamw``, else the recipe's defaults).
        rules: ``(matcher, settings)`` overrides, first match wins (module type, name regex,
            or callable ``(name, param, module) -> bool``); the spec's own ``rules`` follow.
        no_decay: matchers of parameters that take no weight decay (replaces the default).
        matrix_ndim: ``"2"`` (default) or ``">=2"`` (also route conv kernels to the method).
        **hparams: hyperparameters of ``name`` (validated; unknown names raise ValueError).
    """
    spec = get_spec(name)
    spec.resolve(hparams)  # validate early, naming the bad hyperparameter
    if fallback_hparams is None and fallback == "adamw":
        fallback_hparams = spec.fallback_hparams
    if fallback is not None:
        fb_spec = get_spec(fallback)
        fb_spec.resolve(dict(fallback_hparams or {}))
    if isinstance(model_or_params, torch.nn.Module):
        groups = route(
            model_or_params, spec.name, hparams,
            applies_to=spec.applies_to, decay_keys=spec.decay_keys,
            fallback=fallback, fallback_hparams=fallback_hparams,
            fallback_decay_keys=get_spec(fallback).decay_keys if fallback else (),
            rules=(*rules, *spec.rules), no_decay=no_decay, matrix_ndim=matrix_ndim,
        )
        optimizer = ChainOptimizer(groups, spec, **hparams)
        attached = {id(optimizer.spec(g)): optimizer.spec(g) for g in optimizer.param_groups}
        for group_spec in attached.values():  # methods that hook the model (AdaFisher)
            if group_spec.attach is not None:
                group_spec.attach(optimizer, model_or_params)
        return optimizer
    return ChainOptimizer(model_or_params, spec, **hparams)


__all__ = [
    "ChainOptimizer",
    "Decay",
    "OptimizerSpec",
    "Paper",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "register",
    "spec_from_chain",
    "global_state_bytes",
    "state_bytes",
]
