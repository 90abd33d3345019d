"""KIVI-quantized working memory as data: packed codes, fp16 scales and zeros, and their layout (described once).

KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750) quantizes
**keys per channel** (each channel of each (layer, batch item, KV head) gets its own min/max over the token axis,
optionally in groups of ``group_size`` tokens) and **values per token** (each token's head vector gets its own
min/max over the channels). A tensor ``[..., T, D]`` becomes a ``[rows, group]`` matrix (:func:`group_layout`),
each row one group, stored as ``8 // bits`` codes per byte plus an fp16 scale and zero per row
(:func:`packed_layout`, :func:`packed_parts`). This module holds only the containers and that layout; quantizing
and dequantizing (kernel calls) live in :mod:`latent_relay.compression.quant`, and the wire format lists the packed
parts as frames (:mod:`latent_relay.relay.wire.frames`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from latent_relay.kernels.reference import check_bits, packed_width
from latent_relay.relay.memory import KVState, MemoryShape

AXES = ("channel", "token")
KEY_AXIS, VALUE_AXIS = AXES  # keys are quantized per channel (over tokens), values per token (over channels)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALE_DTYPE = torch.float16
PACKED_FIELDS = ("data", "scale", "zero")  # a quantized tensor's stored parts, in wire order


def group_layout(shape: tuple[int, ...], axis: str, group_size: int | None) -> tuple[int, int, int]:
    """``(rows, group, groups_per_line)`` of the ``[rows, group]`` matrix a ``[..., T, D]`` tensor becomes.

    ``axis="channel"``: one line per (leading index, channel) over the T tokens; ``axis="token"``: one line
    per (leading index, token) over the D channels. A line is cut into ``groups_per_line`` groups of
    ``group`` entries (the last one padded and masked).
    """
    if len(shape) < 2:
        raise ValueError(f"quantization needs a [..., tokens, channels] tensor, got shape {shape}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    *lead, t, d = shape
    lines, length = (math.prod(lead) * d, t) if axis == "channel" else (math.prod(lead) * t, d)
    group = group_size or length
    per_line = -(-length // group) if group else 0
    return lines * per_line, group, per_line


@functools.lru_cache(maxsize=256)
def packed_layout(shape: tuple[int, ...], axis: str, group_size: int | None, bits: int) -> tuple[int, int]:
    """``(rows, packed bytes per row)`` of the codes of a ``shape`` tensor (every layer of a memory shares it)."""
    check_bits(bits)
    rows, group, _ = group_layout(tuple(shape), axis, group_size)
    return rows, packed_width(group, bits)


@functools.lru_cache(maxsize=256)
def packed_parts(
    shape: tuple[int, ...], axis: str, group_size: int | None, bits: int
) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    """The stored parts of a quantized ``shape`` tensor, ``(name, shape, dtype)`` in wire order: the packed codes
    ``data`` uint8 ``[rows, bytes per row]``, then ``scale`` and ``zero``, fp16 ``[rows]``."""
    rows, width = packed_layout(shape, axis, group_size, bits)
    return tuple(zip(PACKED_FIELDS, ((rows, width), (rows,), (rows,)), (torch.uint8, SCALE_DTYPE, SCALE_DTYPE)))


@dataclass
class QuantizedTensor:
    """A tensor ``[..., T, D]`` quantized in groups along ``axis`` (see the module docstring).

    ``data`` is uint8 ``[rows, packed bytes per group]``, ``scale`` / ``zero`` fp16 ``[rows]``; ``shape`` and
    ``dtype`` are the original tensor's.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    axis: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    group_size: int | None = None

    @property
    def nbytes(self) -> int:
        """Real size: packed codes + fp16 scales + fp16 zeros."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))

    def validate(self) -> None:
        """Raise ``ValueError`` unless the packed tensors agree with bits, axis, shape and group size."""
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"quantized tensors must come from {FLOAT_DTYPES}, not {self.dtype}")
        (_, (rows, width), _), *scales = packed_parts(tuple(self.shape), self.axis, self.group_size, self.bits)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != (rows, width):
            raise ValueError(
                f"packed data {self.data.dtype} {tuple(self.data.shape)} should be uint8 {(rows, width)} "
                f"for shape {tuple(self.shape)}, axis {self.axis}, {self.bits} bits, group {self.group_size}"
            )
        for name, shape, dtype in scales:
            t = getattr(self, name)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"{name} {t.dtype} {tuple(t.shape)} should be float16 {shape}")


@dataclass
class QuantizedMemory(MemoryShape):
    """A :class:`~latent_relay.relay.memory.KVState` with KIVI-quantized keys (per channel) and values (per token).

    The token table (segment, agent, position, agents, fingerprint) travels unchanged;
    :func:`latent_relay.compression.quant.dequantize_memory` gives the working memory back (padding slots of values
    come back as 0).
    """

    keys: list[QuantizedTensor]
    values: list[QuantizedTensor]
    segment: torch.Tensor
    agent: torch.Tensor
    position: torch.Tensor
    agents: list[str] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def bits(self) -> int:
        return self.keys[0].bits if self.keys else 8

    @property
    def nbytes(self) -> int:
        """Real packed size: codes + scales + zeros of every layer, plus the token table."""
        table = sum(t.numel() * t.element_size() for t in (self.segment, self.agent, self.position))
        return table + sum(q.nbytes for q in (*self.keys, *self.values))

    def validate(self) -> None:
        """Raise ``ValueError`` unless every quantized tensor is well formed and matches the token table."""
        if len(self.keys) != len(self.values):
            raise ValueError(f"{len(self.keys)} key layers but {len(self.values)} value layers")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            k.validate()
            v.validate()
            if k.axis != KEY_AXIS or v.axis != VALUE_AXIS:
                raise ValueError(f"layer {i}: keys must be quantized per channel and values per token")
            if len(k.shape) != 4 or tuple(k.shape) != tuple(v.shape):
                raise ValueError(f"layer {i}: key shape {k.shape} and value shape {v.shape} differ")
        self.dequantize_meta()

    def dequantize_meta(self) -> KVState:
        """A KVState of empty "meta" tensors with this memory's shapes (validates the layout cheaply)."""
        kinds = {(tuple(q.shape), q.dtype) for q in (*self.keys, *self.values)}  # every layer shares one
        meta = {(shape, dtype): torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in kinds}
        keys = [meta[tuple(q.shape), q.dtype] for q in self.keys]
        values = [meta[tuple(q.shape), q.dtype] for q in self.values]
        table = (self.segment, self.agent, self.position)
        return KVState(keys, values, *table, agents=list(self.agents), fingerprint=self.fingerprint)
