"""The packet format's constants: magic, version, flags, alignment, the fixed prefix, the dtypes that travel, the
hard limits a decoder enforces, and the errors it raises (see :mod:`latent_relay.relay.wire` for the layout)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

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


@dataclass(frozen=True)
class WireLimits:
    """Hard limits checked before anything large is allocated; defaults fit a Qwen3-8B-sized batch."""

    max_header_bytes: int = 8 << 20
    max_decoded_bytes: int = 16 << 30
    max_layers: int = 1024
    max_heads: int = 1024
    max_head_dim: int = 4096
    max_tokens: int = 1 << 20
    max_batch: int = 4096
    max_frames: int = 16384
    max_agents: int = 4096
    max_texts: int = 1 << 16
    max_string_bytes: int = 4 << 20


DEFAULT_LIMITS = WireLimits()


def check_declared(header_len: int, raw_len: int, limits: WireLimits) -> None:
    """Raise :class:`LimitExceededError` where a header or a decoded payload is over ``limits``."""
    if header_len > limits.max_header_bytes:
        raise LimitExceededError(f"header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}")
    if raw_len > limits.max_decoded_bytes:
        raise LimitExceededError(f"payload decodes to {raw_len} bytes, over the limit of {limits.max_decoded_bytes}")
