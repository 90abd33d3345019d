"""Structured forgeries of latent packets: several header fields edited at once (dimensions up to and past their
limits, so that their products overflow; quantization bits and group sizes; dtype, memory kind, position form), the
frame table rebuilt to the canonical one of the new header, the raw length set to what it implies (or not), the
payload resized, recompressed or replaced by a hand-made zstd bomb, and the checksum re-sealed. These reach the
checks that byte mutations and one-field edits stop short of: the products of fields, the implied payload against
the declared one before inflating, the frame views and the token table.

Only the library's API as it was before issue 17 is used here, so that this fuzzer also runs against that code."""

from __future__ import annotations

import random
import struct
from dataclasses import replace

import msgpack
import zstandard

from latent_relay.relay import wire
from latent_relay.relay.wire.frames import MemoryDims, QuantSpec, memory_frames, place
from tests.fuzz.packets import seal, split, zstd_rle_frame

DIMS = {"layers": "max_layers", "kv_heads": "max_heads", "head_dim": "max_head_dim", "batch": "max_batch"}
DIMS["tokens"] = "max_tokens"
BIG = [2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1]
GROUPS = [None, 1, 2, 3, 4, 7, 32, 4096, 1 << 20, (1 << 20) + 1, *BIG, 0, -5]
FULL_BOMB = 8 << 20  # a zstd bomb consistent with its header is built whole only up to this size
PAYLOAD = 4 << 20  # a raw payload is resized to the implied length only up to this size


def _dim_value(limit: int, rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice([0, 1, 2, 3, 4, 5, 8, 16, 64])
    if roll < 0.8:
        return rng.choice([limit, limit - 1, limit + 1, limit // 2, limit // 7])
    return rng.choice([*BIG, -1])


def edit_fields(header: dict, rng: random.Random, limits: wire.WireLimits) -> dict:
    """``header`` with two to six fields replaced at once; sometimes every dimension near its limit (so their
    product is far over the decoded-size limit, each of them within its own)."""
    header = dict(header)
    quant: dict | None = dict(header.get("quant") or {"bits": 4, "key_group": None, "value_group": None})
    drop_quant = False
    if rng.random() < 0.25:
        for key, limit in DIMS.items():
            header[key] = rng.choice([getattr(limits, limit), getattr(limits, limit) // 3, 1])
    for _ in range(rng.randint(2, 6)):
        what = rng.choice([*DIMS, "bits", "key_group", "value_group", "dtype", "memory", "per_head", "quant"])
        if what in DIMS:
            header[what] = _dim_value(getattr(limits, DIMS[what]), rng)
        elif what == "bits":
            quant["bits"] = rng.choice([2, 4, 8, 8, 1, 3, 16, 0])
        elif what in ("key_group", "value_group"):
            quant[what] = rng.choice(GROUPS)
        elif what == "dtype":
            header["dtype"] = rng.choice(["float32", "float16", "bfloat16", "int8", "float64"])
        elif what == "memory":
            header["memory"] = rng.choice(["kv", "quantized", "quantized", "raw"])
        elif what == "per_head":
            header["per_head_positions"] = not header.get("per_head_positions")
        else:
            drop_quant = True
    if header.get("memory") == "quantized" or rng.random() < 0.2:
        header["quant"] = None if drop_quant else quant
    return header


def lenient_dims(header: dict) -> MemoryDims | None:
    """The dimensions a header declares, read without any limit (None where they do not make a memory)."""
    try:
        values = [header[key] for key in ("layers", "batch", "kv_heads", "tokens", "head_dim")]
        if not all(type(v) is int and v >= 0 for v in values):
            return None
        dims = MemoryDims(*values, wire.DTYPES[header["dtype"]], header["per_head_positions"] is True)
        if header["memory"] == "quantized":
            q = header["quant"]
            dims = replace(dims, quantized=True, quant=QuantSpec(q["bits"], q["key_group"], q["value_group"]))
        return dims if header["memory"] in ("kv", "quantized") else None
    except (KeyError, TypeError, ValueError):
        return None


def canonical(dims: MemoryDims) -> tuple[list, int] | None:
    """The canonical frame table and payload length of ``dims``, where they can be listed at all (a few thousand
    frames at most, sizes msgpack can carry)."""
    if dims.layers > 2048:
        return None
    try:
        placed = place(memory_frames(dims))
    except (ValueError, OverflowError, TypeError, RuntimeError):
        return None
    return placed.entries, placed.end


def _payload(stored: bytes, flags: int, implied: int, rng: random.Random) -> tuple[bytes, int, int]:
    """``(stored payload, raw length, flags)`` for a header that implies ``implied`` raw bytes."""
    raw = stored if not flags else zstandard.ZstdDecompressor().decompress(stored)
    roll = rng.random()
    if roll < 0.35 and implied <= PAYLOAD:  # the payload resized: raw, or recompressed
        body = (raw + bytes(implied))[:implied] if rng.random() < 0.7 else rng.randbytes(implied)
        if rng.random() < 0.3 and implied:
            return zstandard.ZstdCompressor(level=1).compress(body), implied, wire.FLAG_ZSTD
        return body, implied, 0
    if roll < 0.7:  # a hand-made zstd bomb: whole where it agrees with the header and is small, else truncated
        if implied <= FULL_BOMB and rng.random() < 0.5:
            return zstd_rle_frame(implied, byte=rng.choice([0, 0, 1, 255])), implied, wire.FLAG_ZSTD
        declared = rng.choice([implied, implied + 1, max(0, implied - 64), 16 << 30, 2**40, 2**44])
        if declared == implied and implied > FULL_BOMB:
            declared += 1  # a truncated frame that agrees with its header may be inflated (up to the limit)
        return zstd_rle_frame(declared, blocks=rng.randint(0, 4)), declared, wire.FLAG_ZSTD
    if roll < 0.85:  # the original payload, the prefix declaring the implied length
        return stored, implied, flags
    return stored, rng.choice([0, len(raw), implied + 1, 2**40, 2**64 - 1]), flags


def packed_header(header: dict, deep: int = 0) -> bytes:
    """``header`` as msgpack; with ``deep``, its frame table is one entry nested ``deep`` lists deep (written by
    hand; msgpack's unpacker reads up to 1,024 levels)."""
    if not deep:
        return msgpack.packb(header, use_bin_type=True)
    marker = "\x00deep\x00"
    packed = msgpack.packb({**header, "frames": marker}, use_bin_type=True)
    return packed.replace(msgpack.packb(marker), b"\x91" + b"\x91" * deep + b"\x01")


def forge_fields(packet: bytes, rng: random.Random, limits: wire.WireLimits = wire.DEFAULT_LIMITS) -> bytes:
    """A re-sealed latent packet with several header fields edited at once, its frame table and payload made to
    agree with the new header as far as the roll of the dice says (see the module docstring)."""
    header, stored, raw_len, flags = split(packet)
    header = edit_fields(header, rng, limits)
    dims = lenient_dims(header)
    many = dims is not None and dims.layers > 64 and rng.random() < 0.95  # listing thousands of frames is slow
    listed = canonical(dims) if dims is not None and not many and rng.random() < 0.8 else None
    implied = raw_len
    if listed is not None:
        header["frames"], implied = listed
    deep = rng.choice([300, 1023, 1024, 5000]) if rng.random() < 0.05 else 0
    try:
        head = packed_header(header, deep)
        return seal(head, *_payload(stored, flags, implied, rng))
    except (OverflowError, ValueError, TypeError, struct.error):  # a value msgpack or the prefix cannot carry
        return packet
