"""Reading a parsed packet header: typed fields, each within :class:`WireLimits`, the memory dimensions they
declare and the payload length those imply, computed in Python integers and held to the decoded-size limit before
any frame table is built or any payload inflated (so that no product of header fields can overflow or allocate)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from latent_relay.kernels.reference import SUPPORTED_BITS
from latent_relay.relay.wire.format import DTYPES, FLOAT_NAMES, HeaderError, LimitExceededError, WireLimits
from latent_relay.relay.wire.frames import MemoryDims, QuantSpec, payload_end


def field(header: dict, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    """``header[key]``, which must be of type ``kind`` (a bool is not an int); None or absent where ``optional``."""
    if key not in header:
        if optional:
            return None
        raise HeaderError(f"header lacks {key!r}")
    value = header[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise HeaderError(f"header field {key!r} has type {type(value).__name__}")
    return value


def count(header: dict, key: str, limit: int, *, minimum: int = 0) -> int:
    """The integer ``header[key]``, at least ``minimum`` and at most ``limit``."""
    value = field(header, key, int)
    if value < minimum:
        raise HeaderError(f"header field {key!r} = {value} is below {minimum}")
    if value > limit:
        raise LimitExceededError(f"{key} = {value} exceeds the limit of {limit}")
    return value


def strings(header: dict, key: str, limit: int) -> list[str]:
    """The list of at most ``limit`` strings ``header[key]``."""
    values = field(header, key, list)
    if len(values) > limit:
        raise LimitExceededError(f"{len(values)} {key} exceed the limit of {limit}")
    if not all(isinstance(v, str) for v in values):
        raise HeaderError(f"header field {key!r} must be a list of strings")
    return values


def _quant(header: dict, dims: MemoryDims, limits: WireLimits) -> MemoryDims:
    """``dims`` as a quantized memory's, with the packing the header's ``quant`` map declares."""
    quant = field(header, "quant", dict, optional=True)
    if quant is None:
        if dims.layers:
            raise HeaderError("a quantized memory needs quantization parameters")
        return replace(dims, quantized=True)
    bits = field(quant, "bits", int)
    if bits not in SUPPORTED_BITS:
        raise HeaderError(f"quantization bits {bits} not in {SUPPORTED_BITS}")
    groups = field(quant, "key_group", int, optional=True), field(quant, "value_group", int, optional=True)
    for group in groups:
        if group is not None and group < 1:
            raise HeaderError(f"group size {group} must be positive")
        if group is not None and group > limits.max_group_size:
            raise LimitExceededError(f"group size {group} exceeds the limit of {limits.max_group_size}")
    return replace(dims, quantized=True, quant=QuantSpec(bits, *groups))


def memory_dims(header: dict, limits: WireLimits) -> MemoryDims:
    """The memory dimensions a latent header declares, each field and the payload they imply (every product of
    them) within ``limits``: a :class:`LimitExceededError` otherwise."""
    layers = count(header, "layers", limits.max_layers)
    heads = count(header, "kv_heads", limits.max_heads)
    dim = count(header, "head_dim", limits.max_head_dim)
    batch = count(header, "batch", limits.max_batch)
    tokens = count(header, "tokens", limits.max_tokens)
    dtype = field(header, "dtype", str)
    if dtype not in FLOAT_NAMES:
        raise HeaderError(f"memory dtype {dtype!r} is not one of {FLOAT_NAMES}")
    per_head = field(header, "per_head_positions", bool)
    if 3 + 6 * layers > limits.max_frames:
        raise LimitExceededError(f"{layers} layers need more than {limits.max_frames} frames")
    dims = MemoryDims(layers, batch, heads, tokens, dim, DTYPES[dtype], per_head)
    kind = field(header, "memory", str)
    if kind == "quantized":
        dims = _quant(header, dims, limits)
    elif kind != "kv":
        raise HeaderError(f"memory kind {kind!r} is neither 'kv' nor 'quantized'")
    end = payload_end(dims)
    if end > limits.max_decoded_bytes:
        raise LimitExceededError(
            f"a memory of {layers} layers x batch {batch} x {heads} KV heads x {tokens} tokens x head dim {dim} "
            f"({kind}, {dtype}) takes {end:,} bytes, over the limit of {limits.max_decoded_bytes:,}"
        )
    return dims


def implied_payload(header: dict, limits: WireLimits) -> tuple[MemoryDims | None, int]:
    """The memory dimensions of a header (None for a text message) and the raw payload length they imply."""
    kind = field(header, "kind", str)
    if kind == "text":
        return None, 0
    if kind != "latent":
        raise HeaderError(f"unknown message kind {kind!r}")
    dims = memory_dims(header, limits)
    return dims, payload_end(dims)
