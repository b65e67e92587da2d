"""Routing a model's parameters to optimizer groups.

Rules, in order (the first match wins):

1. user ``rules``: ``(match, settings)`` pairs, where ``match`` is a module class (or tuple of
   classes), a regular expression searched in the parameter name, or a callable
   ``(name, param, module) -> bool``; ``settings`` is a dict of group keys (``"optimizer"``
   and hyperparameters) or a recipe name;
2. for a matrix-only method: embeddings, the output head (``lm_head``, ``output``, ``head``,
   ``classifier``, ``score``, or a head tied to the embedding), norm weights, biases and
   every parameter that is not 2-D go to the ``fallback`` recipe with ``fallback_hparams``;
   other 2-D weights (and, with ``matrix_ndim=">=2"``, conv kernels) go to the method;
3. weight decay applies to parameters with two or more dimensions, except norm weights,
   unless ``no_decay`` (same matchers as rules) or a rule says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

Matcher = type | tuple | str | re.Pattern | Callable[[str, nn.Parameter, nn.Module], bool]
Rule = tuple[Matcher, dict[str, Any] | str]

HEAD_PATTERN = re.compile(r"(^|\.)(lm_head|output|head|classifier|score)(\.|$)")
EMBED_PATTERN = re.compile(r"(^|\.)(embed\w*|wte|wpe|tok_embeddings)(\.|$)")
NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
)


def _is_norm(module: nn.Module, name: str) -> bool:
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower() or bool(
        re.search(r"(^|\.)(\w*norm\w*|ln_\w+|ln\d*)\.weight$", name)
    )


def matches(match: Matcher, name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """Whether a rule's matcher selects this parameter."""
    if isinstance(match, type) or (isinstance(match, tuple) and all(
            isinstance(m, type) for m in match)):
        return isinstance(module, match)
    if isinstance(match, (str, re.Pattern)):
        return re.search(match, name) is not None
    return bool(match(name, param, module))


def named_parameters_with_modules(model: nn.Module):
    """``(name, param, owning module)`` for each distinct trainable parameter (tied weights
    appear once, under their first name)."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{mod_name}.{p_name}" if mod_name else p_name), p, module


def is_hidden_matrix(name: str, param: nn.Parameter, module: nn.Module, matrix_ndim: str) -> bool:
    """Hidden weight matrix: 2-D (or >=2-D), not an embedding, head, norm or bias."""
    if matrix_ndim == "2" and param.ndim != 2:
        return False
    if param.ndim < 2:
        return False
    if isinstance(module, nn.Embedding) or EMBED_PATTERN.search(name):
        return False
    if HEAD_PATTERN.search(name) or _is_norm(module, name):
        return False
    return True


def route(
    model: nn.Module,
    optimizer: str,
    hparams: dict[str, Any],
    *,
    applies_to: str,
    decay_keys: Sequence[str],
    fallback: str | None = "adamw",
    fallback_hparams: dict[str, Any] | None = None,
    fallback_decay_keys: Sequence[str] = ("weight_decay",),
    rules: Sequence[Rule] = (),
    no_decay: Sequence[Matcher] | None = None,
    matrix_ndim: str = "2",
) -> list[dict[str, Any]]:
    """Parameter groups for ``model`` (see the module docstring for the rules)."""
    if matrix_ndim not in ("2", ">=2"):
        raise ValueError(f"invalid matrix_ndim={matrix_ndim!r}: expected '2' or '>=2'")
    buckets: dict[tuple, dict[str, Any]] = {}
    for name, param, module in named_parameters_with_modules(model):
        settings: dict[str, Any] | None = None
        from_rule = False
        for match, target in rules:
            if matches(match, name, param, module):
                settings = {"optimizer": target} if isinstance(target, str) else dict(target)
                settings.setdefault("optimizer", optimizer)
                from_rule = True
                break
        if settings is None:
            if applies_to == "matrix" and not is_hidden_matrix(name, param, module, matrix_ndim):
                if fallback is None:
                    raise ValueError(
                        f"{optimizer} applies to hidden weight matrices only, and "
                        f"{name!r} (shape {tuple(param.shape)}) is not one: pass "
                        "fallback='adamw' (or another recipe), or a rule for it"
                    )
                settings = {"optimizer": fallback, **(fallback_hparams or {})}
            else:
                settings = {"optimizer": optimizer, **hparams}
        keys = decay_keys if settings["optimizer"] == optimizer else fallback_decay_keys
        if no_decay is not None:
            decays = not any(matches(m, name, param, module) for m in no_decay)
        else:
            decays = param.ndim >= 2 and not _is_norm(module, name)
        if not decays:
            for k in keys:
                if from_rule:
                    settings.setdefault(k, 0.0)
                else:
                    settings[k] = 0.0
        key = tuple(sorted((k, repr(v)) for k, v in settings.items()))
        group = buckets.setdefault(key, {**settings, "params": [], "param_names": []})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(buckets.values())

