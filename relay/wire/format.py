"""The packet format's constants: magic, version, flags, alignment, the fixed prefix, the dtypes that travel, the
hard limits a decoder enforces, and the errors it raises (see :mod:`latent_relay.relay.wire` for the layout)."""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass, field

import torch

from latent_relay.relay.memory import IncompatibleMemoryError

MAGIC = b"LRLY"
FORMAT_VERSION = 3  # 2: chunked (tree) checksum; 3: header padding (packets built in place)
FLAG_ZSTD = 1
ALIGN = 64
#: magic, version, flags, header length, header padding, stored payload length, raw payload length
PREFIX = struct.Struct("<4sHHIIQQ")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_NAMES = ("float32", "float16", "bfloat16")


def align(n: int) -> int:
    """``n`` rounded up to the next multiple of :data:`ALIGN` (where every frame and the payload start)."""
    return -(-n // ALIGN) * ALIGN


class PacketError(ValueError):
    """A byte string is not a valid packet (or breaks a limit); the message says why."""


class TruncatedPacketError(PacketError):
    """The packet is shorter than its prefix or header says."""


class ChecksumError(PacketError):
    """The checksum does not match: the packet was corrupted or altered."""


class HeaderError(PacketError):
    """The prefix or msgpack header is malformed or disagrees with the payload."""


class UnsupportedVersionError(PacketError):
    """The packet uses a wire-format version this code does not read."""


class LimitExceededError(PacketError):
    """The packet declares more than :class:`WireLimits` allows (size, layers, heads, tokens, frames...)."""


class ModelMismatchError(PacketError, IncompatibleMemoryError):
    """The packet's working memory was made by a different model than the receiver's (a :class:`PacketError` and
    an :class:`~latent_relay.relay.memory.IncompatibleMemoryError` alike)."""


#: The environment variable that sets the default :attr:`WireLimits.max_decoded_bytes` (a byte count).
MAX_DECODED_ENV = "RELAY_MAX_DECODED_BYTES"
MAX_DECODED_CAP = 16 << 30  # the default never exceeds this, however much memory the host has
MAX_DECODED_FLOOR = 256 << 20  # ...nor goes below this (a host whose memory cannot be read gets 4 GiB)


def host_memory_bytes() -> int:
    """The host's physical memory in bytes, or 0 where the platform does not say."""
    try:
        return max(0, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def default_max_decoded_bytes() -> int:
    """The default decoded-size limit: ``$RELAY_MAX_DECODED_BYTES`` where set, else a quarter of the host's
    physical memory, between 256 MiB and 16 GiB (4 GiB where the memory size cannot be read). A packet decodes
    into memory of its raw payload's size, so this is the most one packet can make a host allocate."""
    value = os.environ.get(MAX_DECODED_ENV, "").strip()
    if value:
        try:
            limit = int(value)
            if limit > 0:
                return limit
        except ValueError:
            pass
        warnings.warn(f"{MAX_DECODED_ENV}={value!r} is not a positive byte count; using the default", stacklevel=2)
    memory = host_memory_bytes()
    return min(MAX_DECODED_CAP, max(MAX_DECODED_FLOOR, memory // 4)) if memory else 4 << 30


@dataclass(frozen=True)
class WireLimits:
    """Hard limits checked before anything large is allocated. The per-field defaults fit a Qwen3-8B-sized batch;
    ``max_decoded_bytes`` (the raw payload, which a packet decodes into) defaults to what the host can hold
    (:func:`default_max_decoded_bytes`); every product of header fields is held to it."""

    max_header_bytes: int = 8 << 20
    max_decoded_bytes: int = field(default_factory=default_max_decoded_bytes)
    max_layers: int = 1024
    max_heads: int = 1024
    max_head_dim: int = 4096
    max_tokens: int = 1 << 20
    max_batch: int = 4096
    max_frames: int = 16384
    max_agents: int = 4096
    max_texts: int = 1 << 16
    max_string_bytes: int = 4 << 20
    max_group_size: int = 1 << 20  # a quantization group (tokens for keys, channels for values)


DEFAULT_LIMITS = WireLimits()


def check_declared(header_len: int, raw_len: int, limits: WireLimits) -> None:
    """Raise :class:`LimitExceededError` where a header or a decoded payload is over ``limits``."""
    if header_len > limits.max_header_bytes:
        raise LimitExceededError(f"header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}")
    if raw_len > limits.max_decoded_bytes:
        raise LimitExceededError(f"payload decodes to {raw_len} bytes, over the limit of {limits.max_decoded_bytes}")
