"""Real int8 / int4 (and int2) KV-cache quantization with bit packing, KIVI-style.

KIVI (Liu et al., arXiv 2402.02750) quantizes **keys per channel** (each channel of each (layer, batch item,
KV head) gets its own min/max over the token axis, optionally in groups of ``group_size`` tokens) because key
outliers live in fixed channels, and **values per token** (each token's head vector gets its own min/max over
the channels). Quantization is asymmetric min-max with fp16 scales and zeros; ``8 // bits`` codes are packed
per byte (two int4 per byte). The Orthogonal Backfill paper (arXiv 2604.13349) uses this quantizer as its
baseline but only simulates it; here the bytes really shrink, and :attr:`QuantizedMemory.nbytes` is the real
packed size. Padding slots take no part in any min/max (they are masked), so they cannot widen the range of
real tokens; masked groups dequantize to 0.

Every real entry dequantizes to within half a quantization step (``scale / 2``) in fp32; a fp16 / bf16 result
adds that dtype's rounding. The packing itself runs in :mod:`kernels` (Triton on CUDA, torch elsewhere).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from latent_relay.kernels.dispatch import quantize_pack, unpack_dequantize
from latent_relay.kernels.reference import check_bits, packed_width
from latent_relay.relay.memory import KVState, MemoryShape, Segment

AXES = ("channel", "token")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


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
    lines, length = (_prod(lead) * d, t) if axis == "channel" else (_prod(lead) * t, d)
    group = group_size or length
    per_line = -(-length // group) if group else 0
    return lines * per_line, group, per_line


@functools.lru_cache(maxsize=256)
def _packed_shape(shape: tuple[int, ...], axis: str, group_size: int | None, bits: int) -> tuple[int, int]:
    """``(rows, packed bytes per row)`` of the codes of a ``shape`` tensor (every layer of a memory shares it)."""
    check_bits(bits)
    rows, group, _ = group_layout(shape, axis, group_size)
    return rows, packed_width(group, bits)


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
        rows, width = _packed_shape(tuple(self.shape), self.axis, self.group_size, self.bits)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != (rows, width):
            raise ValueError(
                f"packed data {self.data.dtype} {tuple(self.data.shape)} should be uint8 {(rows, width)} "
                f"for shape {tuple(self.shape)}, axis {self.axis}, {self.bits} bits, group {self.group_size}"
            )
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if t.dtype != torch.float16 or tuple(t.shape) != (rows,):
                raise ValueError(f"{name} {t.dtype} {tuple(t.shape)} should be float16 {(rows,)}")

    def dequantize(self, *, backend: str | None = None) -> torch.Tensor:
        return dequantize(self, backend=backend)


def _lines(t: torch.Tensor, axis: str) -> torch.Tensor:
    """``[..., T, D]`` -> ``[lines, length]`` (a copy for keys, a view for contiguous values)."""
    *lead, tokens, dim = t.shape
    t = t.reshape(_prod(lead), tokens, dim)
    if axis == "channel":
        return t.transpose(1, 2).reshape(t.shape[0] * dim, tokens)
    return t.reshape(t.shape[0] * tokens, dim)


def quantize(
    t: torch.Tensor,
    bits: int,
    axis: str,
    *,
    valid: torch.Tensor | None = None,
    group_size: int | None = None,
    backend: str | None = None,
) -> QuantizedTensor:
    """KIVI-quantize ``t`` ``[..., T, D]``: ``axis="channel"`` for keys, ``"token"`` for values.

    ``valid`` (bool, broadcastable to ``t.shape[:-1]``, e.g. ``[B, 1, T]``) marks real token slots; the others
    are excluded from every min/max. ``group_size`` cuts the reduced axis into groups (KIVI's token groups for
    keys); None means one group over the whole axis.
    """
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"can only quantize {FLOAT_DTYPES}, not {t.dtype}")
    check_bits(bits)
    shape = tuple(int(s) for s in t.shape)
    rows, group, per_line = group_layout(shape, axis, group_size)
    x = _lines(t, axis)
    length = x.shape[1]
    pad = per_line * group - length
    mask = None
    if valid is not None:
        v = valid.to(torch.bool).expand(shape[:-1])
        mask = _lines(v[..., None].expand(shape), axis)
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        if mask is None:
            mask = torch.ones(length, dtype=torch.bool, device=t.device).expand(x.shape[0], length)
        mask = torch.nn.functional.pad(mask, (0, pad), value=False)
    x = x.reshape(rows, group)
    if mask is not None:
        mask = mask.reshape(rows, group)
        if bool(mask.all()):
            mask = None
    data, scale, zero = quantize_pack(x, mask, bits, backend=backend)
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise ValueError("cannot quantize: values are not finite or beyond the fp16 range of the scales")
    return QuantizedTensor(data, scale, zero, bits, axis, shape, t.dtype, group_size)


def dequantize(q: QuantizedTensor, *, backend: str | None = None) -> torch.Tensor:
    """The tensor ``q`` was made from, within half a quantization step per entry (in ``q.dtype``)."""
    rows, group, per_line = group_layout(tuple(q.shape), q.axis, q.group_size)
    x = unpack_dequantize(q.data, q.scale, q.zero, q.bits, group, q.dtype, backend=backend)
    *lead, tokens, dim = q.shape
    length = tokens if q.axis == "channel" else dim
    lines = _prod(lead) * (dim if q.axis == "channel" else tokens)
    x = x.reshape(lines, per_line * group)[:, :length]
    if q.axis == "channel":
        x = x.reshape(_prod(lead), dim, tokens).transpose(1, 2)
    return x.reshape(q.shape).contiguous()


@dataclass
class QuantizedMemory(MemoryShape):
    """A :class:`~latent_relay.relay.memory.KVState` with KIVI-quantized keys (per channel) and values (per token).

    The token table (segment, agent, position, agents, fingerprint) travels unchanged; ``dequantize()`` gives
    the working memory back (padding slots of values come back as 0).
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
            if k.axis != "channel" or v.axis != "token":
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

    def dequantize(self, *, backend: str | None = None) -> KVState:
        return KVState(
            keys=[dequantize(q, backend=backend) for q in self.keys],
            values=[dequantize(q, backend=backend) for q in self.values],
            segment=self.segment,
            agent=self.agent,
            position=self.position,
            agents=list(self.agents),
            fingerprint=self.fingerprint,
        )


def quantize_memory(
    memory: KVState,
    bits: int,
    *,
    key_group_size: int | None = None,
    value_group_size: int | None = None,
    backend: str | None = None,
) -> QuantizedMemory:
    """KIVI-quantize a working memory: keys per channel over tokens (in ``key_group_size`` token groups, or
    the whole token axis), values per token over channels; padding slots are masked out of every group."""
    valid = (memory.segment != Segment.PAD)[:, None, :]  # [B, 1, T], broadcast over heads
    if bool(valid.all()):
        valid = None
    return QuantizedMemory(
        keys=[
            quantize(k, bits, "channel", valid=valid, group_size=key_group_size, backend=backend) for k in memory.keys
        ],
        values=[
            quantize(v, bits, "token", valid=valid, group_size=value_group_size, backend=backend) for v in memory.values
        ],
        segment=memory.segment,
        agent=memory.agent,
        position=memory.position,
        agents=list(memory.agents),
        fingerprint=memory.fingerprint,
    )
