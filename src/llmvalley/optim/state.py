"""How optimizer state is stored: one codec per slot, chosen by ``state_precision``.

Precisions (``state_precision=``, for a whole group or as a dict from slot name to
precision; ``state_dtype=`` is an alias for the float ones):

- ``None`` (default): the compute dtype (float32 for bf16/fp16 parameters, else the
  parameter's own dtype);
- ``"fp32"`` / ``"fp64"``: that float dtype;
- ``"bf16"`` / ``"fp16"``: that dtype, written with stochastic rounding (unbiased, so small
  EMA increments are not lost), the compute still in float32;
- ``"int8"``: blockwise dynamic quantization (Dettmers et al., 8-bit Optimizers; the block size
  of bitsandbytes and torchao), a signed map for signed slots (first moments) and an unsigned
  one for second moments. Stored as ``key`` (uint8 codes) and ``key + ".absmax"`` (float32,
  one per block);
- ``"int4"``: the 4-bit state of Li et al. 2023 as torchao's ``AdamW4bit`` (block 128, signed
  dynamic map for first moments, linear map for second moments), two codes a byte.

``Codec(..., compiled=True)`` encodes and decodes the quantized slots with compiled kernels
(:func:`~llmvalley.optim.quantize.quantize_blockwise_compiled` and its siblings): the same bits,
faster (CPU).

Slots with the ``exact`` role (bases, frozen statistics) always keep the compute dtype, and so
do quantized slots under :data:`~llmvalley.optim.quantize.MIN_QUANTIZED_NUMEL` elements (as
bitsandbytes and torchao). The stochastic rounding noise is a function of (step, slot,
tensor), so a resumed run draws the same noise: resume stays bit-exact.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmvalley.optim import quantize as q
from llmvalley.optim.transforms.base import SlotSpec, numel

FLOAT_PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
QUANTIZED = ("int8", "int4")
PRECISIONS = (*FLOAT_PRECISIONS, *QUANTIZED)
DTYPE_NAMES = {v: k for k, v in FLOAT_PRECISIONS.items()}
ABSMAX = ".absmax"
#: key suffix of a bfloat16 slot's stochastic-rounding seed, a 0-d tensor put there before a
#: compiled step's graph (:meth:`Codec.stage_seed`) and removed after it; never in a saved state
SR_SEED = ".sr_seed"
INT8_BLOCK, INT4_BLOCK = q.BLOCK_SIZE_8BIT, q.BLOCK_SIZE_4BIT


def precision_name(value: Any) -> str | None:
    """A precision name from a name, a float dtype (``torch.bfloat16``) or its string
    (``"bfloat16"``, as configs write it); ``ValueError`` otherwise."""
    if value is None or value in PRECISIONS:
        return value
    dtype = value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        dtype = getattr(torch, value)
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"invalid state precision {value!r}: one of {PRECISIONS}, a float dtype, "
                     "or None")


def group_precision(group: Mapping[str, Any]) -> Any:
    """The precision a group's state is stored in, as :class:`Codec` reads the group:
    ``state_precision`` (a name, or a per-slot dict as given), else ``state_dtype``'s name;
    None for the compute dtype."""
    precision = group.get("state_precision")
    return precision if precision is not None else precision_name(group.get("state_dtype"))


def check_precision(name: str, group: Mapping[str, Any]) -> None:
    """Validate ``state_precision`` / ``state_dtype`` of a group, naming the key."""
    for key in ("state_dtype", "state_precision"):
        value = group.get(key)
        items = value.items() if isinstance(value, Mapping) and key == "state_precision" \
            else [(None, value)]
        for slot, v in items:
            try:
                precision_name(v)
            except ValueError as err:
                where = f"[{slot!r}]" if slot is not None else ""
                raise ValueError(f"{name}: invalid {key}{where}={v!r}: {err}") from None


class Codec:
    """Creates, loads and stores the slots of one parameter group.

    Args:
        precision: the group's ``state_precision`` (a name, a dtype, a dict from slot name
            or key to one of those, or None) with ``state_dtype`` as the fallback.
        step: the step being taken (seeds the stochastic rounding).
        compiled: encode and decode ``int8`` / ``int4`` slots with the compiled kernels of
            :mod:`~llmvalley.optim.quantize` (``quantize_blockwise_compiled`` and the others):
            the same codes, scales and decoded values bit for bit, about 10x faster to encode
            on a CPU; the first use of each kernel compiles it (seconds), once for all
            sizes. CPU only (other devices, and slots too small to quantize, run eagerly).
    """

    def __init__(self, precision: Any = None, state_dtype: Any = None, step: int = 0,
                 compiled: bool = False) -> None:
        self.by_slot: dict[str, str | None] = {}
        if isinstance(precision, Mapping):
            self.by_slot = {k: precision_name(v) for k, v in precision.items()}
            precision = None
        self.default = precision_name(precision) if precision is not None \
            else precision_name(state_dtype)
        self.step = step
        self.compiled = bool(compiled)

    # ---- choosing -------------------------------------------------------------------------
    def precision(self, key: str, spec: SlotSpec) -> str | None:
        """The precision slot ``spec`` (stored under ``key``) uses, None for compute."""
        if spec.role == "exact" or spec.shape is None:
            return None
        p = self.by_slot.get(key, self.by_slot.get(spec.name, self.default))
        if p in QUANTIZED and spec.numel < q.MIN_QUANTIZED_NUMEL:
            return None
        return p

    def stored_dtype(self, key: str, spec: SlotSpec, compute: torch.dtype) -> torch.dtype:
        p = self.precision(key, spec)
        return FLOAT_PRECISIONS[p] if p in FLOAT_PRECISIONS else compute

    def nbytes(self, key: str, spec: SlotSpec, compute: torch.dtype) -> int:
        """Bytes slot ``spec`` occupies when stored (scales included)."""
        if spec.shape is None:
            return 0
        n = spec.numel
        p = self.precision(key, spec)
        if p == "int8":
            return n + 4 * math.ceil(n / INT8_BLOCK)
        if p == "int4":
            return (n + 1) // 2 + 4 * math.ceil(n / INT4_BLOCK)
        return n * self.stored_dtype(key, spec, compute).itemsize

    # ---- create / load / store ------------------------------------------------------------
    def create(self, st: dict[str, Any], key: str, spec: SlotSpec, compute: torch.dtype,
               device: torch.device) -> None:
        if spec.shape is None:
            st[key] = spec.init
            return
        p = self.precision(key, spec)
        if p in QUANTIZED:
            q = _quantizer(p, spec.role == "signed", device, self.compiled)
            st[key], st[key + ABSMAX] = q.encode(torch.zeros(spec.shape, device=device))
            return
        st[key] = torch.zeros(spec.shape, dtype=self.stored_dtype(key, spec, compute),
                              device=device)

    def load(self, st: dict[str, Any], key: str, spec: SlotSpec,
             compute: torch.dtype) -> tuple[Tensor, bool]:
        """The slot as a compute-dtype tensor, and whether it is a decoded copy."""
        value = st[key]
        if key + ABSMAX in st:  # the stored form says how to decode it
            q = _quantizer(_stored_kind(value, spec), spec.role == "signed", value.device,
                           self.compiled)
            return q.decode(value, st[key + ABSMAX], spec.shape, compute), True
        if value.dtype == compute:
            return value, False
        return value.to(compute), True

    def store(self, st: dict[str, Any], key: str, spec: SlotSpec, value: Tensor) -> None:
        old = st[key]
        if key + ABSMAX in st:
            codes = _quantizer(_stored_kind(old, spec), spec.role == "signed", value.device,
                               self.compiled)
            st[key], st[key + ABSMAX] = codes.encode(value)
            return
        if old.dtype == torch.bfloat16 and value.dtype == torch.float32:
            seed = st.get(key + SR_SEED)
            if seed is not None:  # a compiled step's graph: the seed as a 0-d tensor
                old.copy_(q.bf16_round_with_seed(value, seed))
            else:
                old.copy_(stochastic_round(value, old.dtype, self.seed(key, spec.shape)))
        else:
            old.copy_(value)  # float16 state rounds to nearest (no SR kernel for its layout)

    def convert(self, st: dict[str, Any], key: str, spec: SlotSpec,
                compute: torch.dtype) -> None:
        """Re-store slot ``key`` in this codec's form when it is stored in another (state
        loaded from a checkpoint written with another ``state_precision``)."""
        want = self.precision(key, spec)
        if key + ABSMAX in st:
            if want == _stored_kind(st[key], spec):
                return
        elif want not in QUANTIZED and st[key].dtype == self.stored_dtype(key, spec, compute):
            return
        value = self.load(st, key, spec, compute)[0].clone()
        st.pop(key + ABSMAX, None)
        self.create(st, key, spec, compute, value.device)
        self.store(st, key, spec, value)

    def stage_seed(self, st: dict[str, Any], key: str, spec: SlotSpec) -> None:
        """Put bfloat16 slot ``key``'s stochastic-rounding seed of this step (the one
        :meth:`store` would use: the same bits) under ``key + SR_SEED`` as a 0-d int64 tensor,
        so that a compiled step rounds inside its graph, the seed changing every step without
        a recompile (a seed string formatted from the symbolic step would break the graph).
        The caller removes it after the step."""
        st[key + SR_SEED] = torch.tensor(self.seed(key, spec.shape), dtype=torch.int64,
                                         device=st[key].device)

    def seed(self, key: str, shape: Any) -> int:
        """The stochastic-rounding seed of one write (a function of step, key and shape), in
        [0, 2^32)."""
        return (zlib.crc32(f"{self.step}/{key}/{shape}".encode()) + self.step) & 0xFFFFFFFF


def stochastic_round(x: Tensor, dtype: torch.dtype, seed: int) -> Tensor:
    """``x`` (float32) rounded stochastically to ``dtype`` with the noise of ``seed``
    (:func:`~llmvalley.optim.quantize.bf16_round_with_seed`)."""
    if dtype != torch.bfloat16:
        return x.to(dtype)  # fp16 state: round to nearest (no SR kernel for its layout)
    return q.bf16_round_with_seed(x, seed & 0xFFFFFFFF)


def _stored_kind(codes: Tensor, spec: SlotSpec) -> str:
    return "int8" if codes.numel() == spec.numel else "int4"


class _Quantizer:
    """Encode / decode with one map and block size, eagerly or with the compiled kernels."""

    def __init__(self, kind: str, signed: bool, device: torch.device,
                 compiled: bool = False) -> None:
        self.kind = kind
        self.compiled = compiled
        if kind == "int8":
            self.qmap = q.dynamic_map(signed).to(device)
            self.block = INT8_BLOCK
            self._enc, self._dec = (
                (q.quantize_blockwise_compiled, q.dequantize_blockwise_compiled) if compiled
                else (q.quantize_blockwise, q.dequantize_blockwise))
        else:
            self.qmap = q.map_4bit(signed).to(device)
            self.block = INT4_BLOCK
            self._enc, self._dec = (
                (q.quantize_4bit_compiled, q.dequantize_4bit_compiled) if compiled
                else (q.quantize_4bit, q.dequantize_4bit))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._enc(x.float(), self.qmap, self.block)

    def decode(self, codes: Tensor, absmax: Tensor, shape: tuple, dtype: torch.dtype) -> Tensor:
        return self._dec(codes, absmax, self.qmap, self.block, shape, dtype)


_QUANTIZERS: dict[tuple, _Quantizer] = {}


def _quantizer(kind: str, signed: bool, device: torch.device,
               compiled: bool = False) -> _Quantizer:
    key = (kind, signed, str(device), compiled)
    if key not in _QUANTIZERS:
        _QUANTIZERS[key] = _Quantizer(kind, signed, device, compiled)
    return _QUANTIZERS[key]


def slot_numel(specs: list[SlotSpec]) -> int:
    """Tensor elements of a list of slots."""
    return sum(numel(s.shape) for s in specs if s.shape is not None)
