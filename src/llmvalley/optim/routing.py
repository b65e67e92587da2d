"""Routing a model's parameters to optimizer groups.

Rules, in order (the first match wins):

1. user ``rules``: ``(match, settings)`` pairs, where ``match`` is a module class (or tuple of
   classes), a regular expression searched in the parameter name, or a callable
   ``(name, param, module) -> bool``; ``settings`` is a dict of group keys (``"optimizer"``
   and hyperparameters) or a recipe name;
2. for a matrix-only method: embeddings, the output head, norm weights, biases and every
   parameter that is not 2-D go to the ``fallback`` recipe with ``fallback_hparams``; other
   2-D weights (and, with ``matrix_ndim=">=2"``, conv kernels) go to the method. The output
   head is found by name (``lm_head``, ``output``, ``head``, ``classifier``, ``score``), as a
   head tied to the embedding, or, when neither exists, by shape (see below);
3. weight decay applies to parameters with two or more dimensions, except norm weights,
   unless ``no_decay`` (same matchers as rules) or a rule says otherwise.

Finding an unnamed head by shape (matrix-only methods only; nothing else depends on the head).
The vocabulary sizes of a model are the ``num_embeddings`` of its ``nn.Embedding`` modules and
the first dimension of 2-D parameters named like embeddings (``EMBED_PATTERN``), leaving out
position, token-type and segment embeddings (``POSITION_PATTERN``: their size is a context
length, not a vocabulary). When no parameter is named like a head and no module shares the
embedding's weight, a hidden matrix whose output dimension (``shape[0]``, as ``nn.Linear``
stores ``(out, in)``) is a vocabulary size is a head candidate, so that
``nn.Sequential(nn.Embedding(V, d), ..., nn.Linear(d, V))`` keeps its head off the matrix
method. The last candidate in registration order (where models put their head) is taken as
the head; the others stay hidden matrices. This is a guess, so :func:`route` warns
(``UserWarning``), naming the head it took, the other candidates and the rules that settle
it, unless a rule already routes that parameter.

When the model names a head (or ties it), the names are trusted: a hidden matrix whose output
dimension merely equals the vocabulary size (a 256-token byte model with ``d_model=256``) stays
a hidden matrix, without a warning, since the named head makes the model's layout clear.
A model with no embedding (or no candidate) is routed by name alone, as before.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

Matcher = type | tuple | str | re.Pattern | Callable[[str, nn.Parameter, nn.Module], bool]
Rule = tuple[Matcher, dict[str, Any] | str]

HEAD_PATTERN = re.compile(r"(^|\.)(lm_head|output|head|classifier|score)(\.|$)")
EMBED_PATTERN = re.compile(r"(^|\.)(embed\w*|wte|wpe|tok_embeddings)(\.|$)")
#: embeddings whose size is not a vocabulary (positions, token types, segments)
POSITION_PATTERN = re.compile(r"(^|\.)\w*(wpe|pos|token_type|segment)\w*(\.|$)")
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


def _all_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, nn.Module]]:
    """``(name, param, owning module)`` for every parameter, frozen and tied ones included,
    under each of its names."""
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            yield (f"{mod_name}.{p_name}" if mod_name else p_name), p, module


def _is_embedding(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """A token-embedding table: an ``nn.Embedding``'s weight, or a 2-D parameter named like an
    embedding; position, token-type and segment embeddings excluded."""
    if param.ndim != 2 or POSITION_PATTERN.search(name):
        return False
    return isinstance(module, nn.Embedding) or (
        bool(EMBED_PATTERN.search(name)) and not _is_norm(module, name))


def vocab_sizes(model: nn.Module) -> set[int]:
    """The vocabulary sizes of ``model``: the first dimension of each token embedding."""
    return {int(p.shape[0]) for name, p, module in _all_parameters(model)
            if _is_embedding(name, p, module)}


def names_head(model: nn.Module) -> bool:
    """Whether ``model`` identifies its output head: a >= 2-D parameter named like one
    (``HEAD_PATTERN``), or an embedding weight also held by another module (a tied head)."""
    params = list(_all_parameters(model))
    if any(p.ndim >= 2 and HEAD_PATTERN.search(name) for name, p, _ in params):
        return True
    embeddings = {id(p) for name, p, module in params if _is_embedding(name, p, module)}
    return any(id(p) in embeddings and not _is_embedding(name, p, module)
               for name, p, module in params)


def head_candidates(model: nn.Module, matrix_ndim: str = "2") -> list[str]:
    """Trainable hidden matrices that may be an unnamed output head, in registration order.

    These are the matrices whose output dimension (``shape[0]``) is a vocabulary size of the
    model; none when the model names or ties its head (see the module docstring).
    """
    if names_head(model):
        return []
    sizes = vocab_sizes(model)
    return [name for name, p, module in named_parameters_with_modules(model)
            if p.shape[0] in sizes and is_hidden_matrix(name, p, module, matrix_ndim)]


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised in the caller at the first frame
    outside llmvalley (the user's call)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _guessed_head_warning(optimizer: str, head: str, shape: tuple[int, ...],
                          others: list[str], fallback_settings: dict[str, Any]) -> str:
    """The warning for a head found by shape: which, why, and the rules that settle it."""
    pattern = f"r'^{re.escape(head)}$'"
    text = (
        f"{optimizer}: no parameter is named like an output head (lm_head, output, head, "
        f"classifier, score), so {head!r} (shape {shape}) is taken as the head because its "
        f"output dimension {shape[0]} is the vocabulary size of an embedding; it goes to "
        f"{fallback_settings['optimizer']!r} instead of {optimizer!r}."
    )
    if others:
        text += (f" Other matrices with a vocabulary-sized output dimension stay on "
                 f"{optimizer!r}: {', '.join(map(repr, others))}.")
    return text + (
        f" To settle it, name the head module lm_head, or pass a rule: "
        f"rules=[({pattern}, {fallback_settings!r})] confirms this choice, "
        f"rules=[({pattern}, {{'optimizer': {optimizer!r}}})] keeps it on {optimizer!r}."
    )


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
    """Parameter groups for ``model`` (see the module docstring for the rules).

    Warns (``UserWarning``) when a matrix-only method's output head is found by shape rather
    than by name, unless a rule routes that parameter.
    """
    if matrix_ndim not in ("2", ">=2"):
        raise ValueError(f"invalid matrix_ndim={matrix_ndim!r}: expected '2' or '>=2'")
    # only a matrix-only method treats the head differently from other matrices
    candidates = head_candidates(model, matrix_ndim) if applies_to == "matrix" else []
    guessed_head = candidates[-1] if candidates else None
    warn_head: tuple[int, ...] | None = None  # the guessed head's shape, once routed by us
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
            is_head = name == guessed_head
            if applies_to == "matrix" and (
                    is_head or not is_hidden_matrix(name, param, module, matrix_ndim)):
                if fallback is None:
                    why = (" (it is taken as the output head: its output dimension is the "
                           "vocabulary size of an embedding)") if is_head else ""
                    raise ValueError(
                        f"{optimizer} applies to hidden weight matrices only, and "
                        f"{name!r} (shape {tuple(param.shape)}) is not one{why}: pass "
                        "fallback='adamw' (or another recipe), or a rule for it"
                    )
                settings = {"optimizer": fallback, **(fallback_hparams or {})}
                if is_head:
                    warn_head = tuple(param.shape)
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
    if guessed_head is not None and warn_head is not None:  # routed by us, not by a rule
        warnings.warn(
            _guessed_head_warning(optimizer, guessed_head, warn_head, candidates[:-1],
                                  {"optimizer": fallback, **(fallback_hparams or {})}),
            UserWarning, stacklevel=_caller_stacklevel(),
        )
    return list(buckets.values())

