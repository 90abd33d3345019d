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
adds that dtype's rounding. The packing itself runs in :mod:`kernels` (Triton on CUDA, torch elsewhere); the
containers and their layout are core data (:mod:`latent_relay.relay.quantized`).
"""

from __future__ import annotations

import math

import torch

from latent_relay.kernels.dispatch import quantize_pack, unpack_dequantize
from latent_relay.kernels.reference import check_bits
from latent_relay.relay.memory import KVState, Segment
from latent_relay.relay.messages import LatentMessage
from latent_relay.relay.quantized import (
    FLOAT_DTYPES,
    KEY_AXIS,
    VALUE_AXIS,
    QuantizedMemory,
    QuantizedTensor,
    group_layout,
)


def _lines(t: torch.Tensor, axis: str) -> torch.Tensor:
    """``[..., T, D]`` -> ``[lines, length]`` (a copy for keys, a view for contiguous values)."""
    *lead, tokens, dim = t.shape
    t = t.reshape(math.prod(lead), tokens, dim)
    if axis == KEY_AXIS:
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
    length = tokens if q.axis == KEY_AXIS else dim
    lines = math.prod(lead) * (dim if q.axis == KEY_AXIS else tokens)
    x = x.reshape(lines, per_line * group)[:, :length]
    if q.axis == KEY_AXIS:
        x = x.reshape(math.prod(lead), dim, tokens).transpose(1, 2)
    return x.reshape(q.shape).contiguous()


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
            quantize(k, bits, KEY_AXIS, valid=valid, group_size=key_group_size, backend=backend) for k in memory.keys
        ],
        values=[
            quantize(v, bits, VALUE_AXIS, valid=valid, group_size=value_group_size, backend=backend)
            for v in memory.values
        ],
        segment=memory.segment,
        agent=memory.agent,
        position=memory.position,
        agents=list(memory.agents),
        fingerprint=memory.fingerprint,
    )


def dequantize_memory(memory: QuantizedMemory, *, backend: str | None = None) -> KVState:
    """The working memory a :class:`QuantizedMemory` was made from (padding slots of values come back as 0)."""
    return KVState(
        keys=[dequantize(q, backend=backend) for q in memory.keys],
        values=[dequantize(q, backend=backend) for q in memory.values],
        segment=memory.segment,
        agent=memory.agent,
        position=memory.position,
        agents=list(memory.agents),
        fingerprint=memory.fingerprint,
    )


def unpack(item: LatentMessage | KVState | QuantizedMemory, *, backend: str | None = None) -> KVState:
    """The working memory a receiver prefills on: a message's (or a bare) memory, dequantized where a quantizing
    recipe packed it; a :class:`KVState` passes through unchanged."""
    memory = item.memory if isinstance(item, LatentMessage) else item
    return memory if isinstance(memory, KVState) else dequantize_memory(memory, backend=backend)
