"""How an optimizer behaves: defaults, its transform chain, its weight decay, its checks.

An :class:`OptimizerSpec` is what the shell needs to run a method; the catalogue
(:mod:`llmvalley.optim.catalogue`: paper, reference, notes) is joined to it by the registry. A
spec need not be registered: ``ChainOptimizer(params, spec)`` runs any spec, and
:func:`spec_from_chain` makes one from a list of transforms.

Shell options (:data:`SHELL_DEFAULTS`) are accepted by every spec and reach every group:
``maximize``, ``nonfinite``, ``state_precision`` (alias ``state_dtype``), ``master_weights``,
``cautious``, ``mars`` (with ``mars_gamma``), ``adagc`` (with ``adagc_lambda_rel``,
``adagc_beta``, ``adagc_lambda_abs``, ``adagc_warmup``) and ``implementation`` (the execution
tier, :func:`execution_tier`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmvalley.optim.catalogue import Entry, Paper
from llmvalley.optim.state import check_precision, slot_numel
from llmvalley.optim.transforms.base import Shape, Transform, numel
from llmvalley.optim.transforms.combine import chain_slots
from llmvalley.optim.validation import validate_common

#: options every optimizer accepts, handled by the shell rather than by a recipe
SHELL_DEFAULTS: dict[str, Any] = {
    "maximize": False,
    "nonfinite": "raise",
    "state_dtype": None,
    "state_precision": None,
    "master_weights": None,
    "cautious": False,
    "mars": False,
    "mars_gamma": 0.025,
    # AdaGC (arXiv 2502.11034): per-tensor adaptive clipping in front of the recipe
    "adagc": False,
    "adagc_lambda_rel": 1.04,
    "adagc_beta": 0.99,
    "adagc_lambda_abs": 1.0,
    "adagc_warmup": 100,
    # execution tier (see execution_tier): "auto", "foreach", "compiled" or "fused"
    "implementation": "auto",
}
SHELL_KEYS = tuple(SHELL_DEFAULTS)
IMPLEMENTATIONS = ("auto", "foreach", "compiled", "fused")

DECAY_FORMS = ("none", "coupled", "decoupled", "decoupled_after", "proximal")


@dataclass(frozen=True)
class Decay:
    """How the shell applies ``group[key]`` (the weight decay ``wd``).

    Forms: ``"coupled"`` (L2 in the gradient, ``g += wd p``, before the chain),
    ``"decoupled"`` (``p *= 1 - rate wd`` before the step), ``"decoupled_after"`` (the same
    after the step), ``"proximal"`` (``p /= 1 + lr wd`` after the step), ``"none"`` (the method
    has no weight decay). ``rate`` is the learning rate (times the tensor's multiplier) when
    ``lr_scaled`` (a bool, or a function of the group), else 1, unless the direction supplies
    an adaptive rate (NAMO).
    """

    form: str = "decoupled"
    key: str = "weight_decay"
    lr_scaled: bool | Callable[[Mapping[str, Any]], bool] = True

    def __post_init__(self) -> None:
        if self.form not in DECAY_FORMS:
            raise ValueError(f"decay form must be one of {DECAY_FORMS}, got {self.form!r}")

    def scaled(self, group: Mapping[str, Any]) -> bool:
        return self.lr_scaled(group) if callable(self.lr_scaled) else bool(self.lr_scaled)


@dataclass
class OptimizerSpec:
    """Everything the shell needs to run one optimizer.

    Attributes:
        name: registry name (API).
        defaults: hyperparameter defaults (the reference's).
        build: returns the recipe's transform chain (a direction; no parameter writes).
        decay: the weight-decay form the shell applies (:class:`Decay`); a function of the
            group when a hyperparameter selects it.
        applies_to: ``"any"`` or ``"matrix"`` (hidden 2-D weights only).
        structural: group keys whose value changes the chain (cache key).
        decay_keys: hyperparameters zeroed for parameters that take no weight decay.
        fused: optional fast path ``(ctx) -> bool`` that computes exactly the chain and the
            step (True when it ran); used only when no shell option changes the chain.
        fused_state: the ``state_precision`` values the fused kernel stores itself
            (adamw8bit's ``"int8"``); any other precision runs the chain.
        fused_until_compiled: the fused kernel runs only until ``"auto"`` compiles the group
            (:mod:`llmvalley.optim.auto_tier`): for kernels that bridge the eager phase but
            are not faster than inductor's code in steady state (SPAM's and Grams': 1.10-1.15x
            against 1.03-1.09x fused AdamW at 45M; Adan's level with it).
        fused_options: the shell options the fused kernel computes itself (``"adagc"``:
            the CPU Adam kernel scales each gradient by AdaGC's clipping factor as it reads
            it); any other shell option runs the chain.
        check: optional extra validation of a group (raise ``ValueError``).
        rules: default routing rules, applied after the user's by ``create_optimizer``.
        fallback_hparams: hyperparameters of the ``adamw`` fallback (matrix methods).
        legacy_keys: state keys written by llmvalley 0.1 and the keys they load into.
        legacy_defaults: values of group keys that a loaded 0.1 group lacks, where the current
            default differs from what 0.1 did (so a resumed run keeps its behaviour).
        about: the catalogue entry (paper, reference, notes); None for a user's own spec.
    """

    name: str
    defaults: dict[str, Any]
    build: Callable[[Mapping[str, Any]], list[Transform]]
    decay: Decay | Callable[[Mapping[str, Any]], Decay] = field(default_factory=Decay)
    applies_to: str = "any"
    structural: tuple[str, ...] = ()
    decay_keys: tuple[str, ...] = ("weight_decay",)
    fused: Callable[[Any], bool] | None = None
    fused_state: tuple[str, ...] = ()
    fused_options: tuple[str, ...] = ()
    fused_until_compiled: bool = False
    check: Callable[[dict[str, Any]], None] | None = None
    rules: tuple = ()
    fallback_hparams: dict[str, Any] | None = None
    legacy_keys: dict[str, str] = field(default_factory=dict)
    legacy_defaults: dict[str, Any] = field(default_factory=dict)
    about: Entry | None = None
    #: called as ``attach(optimizer, model)`` when ``create_optimizer`` builds the optimizer
    #: from a model: methods that need more than parameters (AdaFisher's module hooks)
    attach: Callable[[Any, Any], Any] | None = None
    _chains: dict[tuple, list[Transform]] = field(default_factory=dict, repr=False)
    _full_chains: dict[tuple, tuple] = field(default_factory=dict, repr=False)

    # ---- catalogue ------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.about.family if self.about else "custom"

    @property
    def paper(self) -> Paper:
        return self.about.paper if self.about else Paper(self.name, "n/a", 0)

    @property
    def reference(self) -> str:
        return self.about.reference if self.about else "user-defined"

    @property
    def notes(self) -> str:
        return self.about.notes if self.about else ""

    @property
    def weight_decay(self) -> str:
        return self.about.weight_decay if self.about else str(self.decay)

    @property
    def hyperparameter_count(self) -> int:
        return len(self.defaults)

    # ---- behaviour ------------------------------------------------------------------------
    def decay_for(self, group: Mapping[str, Any]) -> Decay:
        return self.decay if isinstance(self.decay, Decay) else self.decay(group)

    def chain(self, group: Mapping[str, Any]) -> list[Transform]:
        """The recipe's (cached) transform chain for a group (without shell options)."""
        key = tuple(_hashable(group.get(k)) for k in self.structural)
        if key not in self._chains:
            self._chains[key] = list(self.build(group))
        return self._chains[key]

    def resolve(self, hparams: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
        """Defaults overlaid with ``hparams``, validated. Unknown keys raise when ``strict``."""
        allowed = {**SHELL_DEFAULTS, **self.defaults}
        if strict:
            unknown = sorted(set(hparams) - set(allowed))
            if unknown:
                raise ValueError(
                    f"{self.name}: unknown hyperparameter(s) {', '.join(unknown)}; "
                    f"accepted: {', '.join(sorted(allowed))}"
                )
        out = {**allowed, **hparams}
        self.validate(out)
        return out

    def validate(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first invalid hyperparameter of ``group``."""
        validate_common(self.name, group)
        validate_shell(self.name, group)
        execution_tier(self, group)  # raises on a tier this spec or group cannot run
        if self.check is not None:
            self.check(group)

    def slots(self, shape: Shape, group: Mapping[str, Any], name: str = "") -> list:
        """The declared state of a parameter of ``shape`` (shell options included)."""
        from llmvalley.optim.options import full_chain

        if numel(shape) == 0:
            return []
        return [s for _, s in chain_slots(full_chain(self, group), shape, group, name)]

    def state_numel(self, shape: Shape, **hparams: Any) -> int:
        """State elements kept for a parameter of ``shape``, from the declarations."""
        shape = tuple(int(s) for s in shape)
        group = {**SHELL_DEFAULTS, **self.defaults, **hparams}
        return slot_numel(self.slots(shape, group))


def validate_shell(name: str, group: Mapping[str, Any]) -> None:
    """Checks of the shell options (raise ValueError naming the option)."""
    for key in ("maximize", "cautious", "mars", "adagc"):
        if key in group and not isinstance(group[key], bool):
            raise ValueError(f"{name}: invalid {key}={group[key]!r}: must be True or False")
    if not any(group.get("master_weights") is v for v in (None, True, False)):
        raise ValueError(f"{name}: invalid master_weights={group['master_weights']!r}: "
                         "None, True or False")
    check_precision(name, group)
    if group.get("mars"):
        gamma = group.get("mars_gamma")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
            raise ValueError(f"{name}: invalid mars_gamma={gamma!r}: a number >= 0")
        if "betas" not in group and "momentum" not in group:
            raise ValueError(f"{name}: invalid mars=True: MARS needs a momentum method "
                             "(betas or momentum)")
    validate_adagc(name, group)


def execution_tier(spec: OptimizerSpec, group: Mapping[str, Any]) -> str:
    """The tier a group runs in: ``"foreach"``, ``"compiled"`` or ``"fused"``.

    ``implementation="auto"`` (default) is the fastest tier that is exact and never makes a long
    compile on first use: ``"fused"`` where the spec has a fused kernel (adam, adamw, sgd, adagrad;
    on CPU adafactor, came, adamp, sgdp, lion, adamw8bit, adamw4bit, lion8bit, schedulefree_sgd,
    schedulefree_adamw, spam, stable_spam, fadam, mars, adan and adagc, whose kernels build once per
    machine in seconds: :mod:`llmvalley.optim.fused`) and no shell option changes the chain or its
    storage (beyond the ``state_precision`` values of the spec's ``fused_state`` and the shell
    options of its ``fused_options``: AdaGC on adamw and adagc), else ``"foreach"`` (on CPU run in
    cache-sized blocks where the chain allows, :mod:`llmvalley.optim.blocked`), which the shell
    moves to the compiled tier once the group has run long enough for the compile to pay
    (:mod:`llmvalley.optim.auto_tier`; this function returns the starting tier). A spec's ``fused``
    hyperparameter (adam, adamw) maps onto the tier: ``fused=False`` is ``"foreach"`` (or
    ``"compiled"`` when asked), ``fused=True`` is ``"fused"``. Raises ``ValueError`` naming
    ``implementation`` for an unknown value, ``"fused"`` on a spec without a fused kernel or with a
    shell option that changes the chain or its storage, and a ``fused`` value that contradicts it.
    """
    impl = group.get("implementation", "auto")
    if not isinstance(impl, str) or impl not in IMPLEMENTATIONS:
        raise ValueError(f"{spec.name}: invalid implementation={impl!r}: one of "
                         f"{', '.join(map(repr, IMPLEMENTATIONS))}")
    fused = group.get("fused")
    if fused is not None and "fused" in spec.defaults:
        if not isinstance(fused, bool):
            raise ValueError(f"{spec.name}: invalid fused={fused!r}: None, True or False")
        wanted = "fused" if fused else "foreach"
        if impl == "auto":
            impl = wanted
        elif (impl == "fused") != fused:
            raise ValueError(f"{spec.name}: invalid implementation={impl!r} with "
                             f"fused={fused}: they contradict; pass one of them")
    from llmvalley.optim.options import is_plain

    if impl == "fused":
        if spec.fused is None:
            from llmvalley.optim.registry import list_optimizers

            have = sorted(s.name for s in list_optimizers() if s.fused is not None)
            raise ValueError(
                f"{spec.name}: invalid implementation='fused': {spec.name} has no fused "
                f"kernel ({', '.join(have)} have one); use 'auto', 'foreach' or 'compiled'")
        if not is_plain(spec, group):
            raise ValueError(
                f"{spec.name}: invalid implementation='fused': the fused kernel computes the "
                "plain method, and a shell option (mars, cautious, adagc, state_precision, "
                "state_dtype or master_weights) changes it; use 'foreach' or 'compiled'")
        return "fused"
    if impl == "auto":
        return "fused" if spec.fused is not None and is_plain(spec, group) else "foreach"
    return impl


def validate_adagc(name: str, group: Mapping[str, Any]) -> None:
    """Checks of the AdaGC options (whenever given, so a typo is not silently ignored)."""
    rules = {"adagc_lambda_rel": ("a number > 0", lambda v: v > 0),
             "adagc_beta": ("a number in [0, 1)", lambda v: 0 <= v < 1),
             "adagc_lambda_abs": ("a number > 0", lambda v: v > 0)}
    for key, (expect, ok) in rules.items():
        if key not in group:
            continue
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name}: invalid {key}={value!r}: {expect}")
    warmup = group.get("adagc_warmup", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"{name}: invalid adagc_warmup={warmup!r}: an integer >= 0")


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(value)
    return value


def spec_from_chain(transforms: list[Transform], defaults: Mapping[str, Any] | None = None,
                    name: str = "custom", decay: Decay | None = None) -> OptimizerSpec:
    """A spec that runs ``transforms`` (a user's own optimizer; see docs/custom-optimizer.md).

    ``defaults`` must include every hyperparameter the transforms read (``lr`` at least);
    weight decay is decoupled when ``weight_decay`` is among them, else none.
    """
    defaults = dict(defaults or {"lr": 1e-3})
    defaults.setdefault("lr", 1e-3)
    if decay is None:
        decay = Decay() if "weight_decay" in defaults else Decay("none")
    chain = list(transforms)
    return OptimizerSpec(name=name, defaults=defaults, build=lambda g: chain, decay=decay)
