"""Decoding a packet: open and verify it (framing, limits, checksum, strict msgpack header), check its frame table
against the one canonical layout its header implies, and view the payload as the message's tensors (zero-copy where
the buffer is aligned; a misaligned buffer is copied once). Every problem raises a :class:`PacketError`."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import msgpack
import torch
import zstandard

from latent_relay.relay.memory import IncompatibleMemoryError, MemoryError_, Segment, check_same_model
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.wire.checksum import DIGEST_SIZE, digest
from latent_relay.relay.wire.format import (
    ALIGN,
    DEFAULT_LIMITS,
    FLAG_ZSTD,
    FORMAT_VERSION,
    MAGIC,
    PREFIX,
    ChecksumError,
    HeaderError,
    LimitExceededError,
    ModelMismatchError,
    PacketError,
    TruncatedPacketError,
    UnsupportedVersionError,
    WireLimits,
    align,
    check_declared,
)
from latent_relay.relay.wire.frames import Frame, MemoryDims, build_memory, memory_frames, payload_end, placement
from latent_relay.relay.wire.header import field, implied_payload, memory_dims, strings


@dataclass
class Packet:
    """A packet whose framing and checksum are verified and whose header is parsed: the facts its prefix declares
    (flags, total size, stored payload, header length and padding), the header and the raw (decompressed) payload."""

    header: dict
    payload: memoryview
    flags: int
    total: int
    stored_len: int
    header_len: int
    header_pad: int = 0


def open_packet(data: bytes | bytearray | memoryview, *, limits: WireLimits = DEFAULT_LIMITS) -> Packet:
    """Verify a packet's framing, limits and checksum, parse its header and check the raw payload length it
    declares against the one its header implies (:func:`~latent_relay.relay.wire.header.implied_payload`), before a
    zstd payload is inflated. The payload is not yet read as tensors: :func:`decode_packet` does that."""
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError) as e:
        raise PacketError(f"a packet must be a contiguous bytes-like object, not {type(data).__name__}") from e
    if len(view) < PREFIX.size + DIGEST_SIZE:
        if bytes(view[:4]) != MAGIC[: len(view[:4])]:
            raise HeaderError("not a latent-relay packet (bad magic)")
        raise TruncatedPacketError(f"packet of {len(view)} bytes is shorter than the minimum {PREFIX.size + 16}")
    magic, version, flags, header_len, header_pad, stored_len, raw_len = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise HeaderError(f"not a latent-relay packet (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"wire format version {version}; this build reads version {FORMAT_VERSION}")
    if flags & ~FLAG_ZSTD:
        raise HeaderError(f"unknown flags {flags:#x}")
    if header_pad % ALIGN or header_pad > limits.max_header_bytes:
        raise HeaderError(f"header padding of {header_pad} bytes is not a multiple of {ALIGN} within the header limit")
    check_declared(header_len, raw_len, limits)
    if not flags & FLAG_ZSTD and stored_len != raw_len:
        raise HeaderError(f"uncompressed payload declares {stored_len} stored but {raw_len} raw bytes")
    if stored_len > limits.max_decoded_bytes:
        raise LimitExceededError(f"stored payload of {stored_len} bytes exceeds {limits.max_decoded_bytes}")
    payload_off = align(PREFIX.size + header_len) + header_pad
    total = payload_off + stored_len + DIGEST_SIZE
    if len(view) < total:
        raise TruncatedPacketError(f"packet is {len(view)} bytes but its prefix declares {total}")
    if len(view) > total:
        raise HeaderError(f"{len(view) - total} unexpected bytes after the end of the packet")
    head, stored = view[:payload_off], view[payload_off : payload_off + stored_len]
    if digest(head, stored) != bytes(view[total - DIGEST_SIZE :]):
        raise ChecksumError("checksum mismatch: the packet is corrupted or was altered")
    if any(view[PREFIX.size + header_len : payload_off]):
        raise HeaderError("non-zero header padding")
    header = _parse_header(view[PREFIX.size : PREFIX.size + header_len], limits)
    _, implied = implied_payload(header, limits)  # in Python integers, held to the limits, before inflating
    if implied != raw_len:
        raise HeaderError(
            f"the prefix declares a raw payload of {raw_len:,} bytes; the header's frames end at {implied:,}"
        )
    payload = _inflate(stored, raw_len) if flags & FLAG_ZSTD else stored
    return Packet(header, payload, flags, total, stored_len, header_len, header_pad)


def _parse_header(raw: memoryview, limits: WireLimits) -> dict:
    cap = limits.max_string_bytes
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=cap,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=max(limits.max_frames, limits.max_texts, limits.max_agents, 64),
            max_map_len=4096,
        )
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise HeaderError(f"malformed msgpack header: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise HeaderError(f"header must be a map, got {type(header).__name__}")
    return header


def _inflate(stored: memoryview, raw_len: int) -> memoryview:
    """Decompress one zstd frame whose declared content size must equal ``raw_len`` (checked first)."""
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as e:
        raise HeaderError(f"payload is not a zstd frame: {e}") from None
    if declared != raw_len:
        raise HeaderError(f"zstd frame declares {declared} content bytes but the prefix says {raw_len}")
    try:
        out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_len)
    except zstandard.ZstdError as e:
        raise HeaderError(f"zstd payload does not decompress: {e}") from None
    if len(out) != raw_len:
        raise HeaderError(f"zstd payload inflated to {len(out)} bytes, expected {raw_len}")
    return memoryview(out)


@dataclass(frozen=True)
class _Columns:
    """A memory's frames as a decoder views them: the token table's frames and their offsets, layer 0's frames and
    their offsets, and the bytes from one layer's frames to the next's (every layer has the same frames, so frame
    ``c`` of layer ``i`` sits at ``offset of c in layer 0 + i * span``)."""

    table: tuple[tuple[Frame, int], ...]
    columns: tuple[tuple[Frame, int], ...]
    span: int


@functools.lru_cache(maxsize=64)
def _columns(dims: MemoryDims) -> _Columns:
    frames = list(zip(memory_frames(dims), placement(dims).offsets))
    first = tuple((f, offset) for f, offset in frames if f.layer == 0)
    second = [offset for f, offset in frames if f.layer == 1]
    span = second[0] - first[0][1] if second else 0
    return _Columns(tuple((f, offset) for f, offset in frames if f.layer < 0), first, span)


def _tensors(packet: Packet, dims: MemoryDims, limits: WireLimits) -> tuple[dict[str, torch.Tensor], dict]:
    """Check the header's frame table against the canonical one ``dims`` implies; return the token table's
    tensors by part and, per ``(part, field)`` of a layer's frames, its per-layer tensors: zero-copy views of the
    payload (a copy of it when the buffer's address is not aligned for the frame dtypes)."""
    table = field(packet.header, "frames", list)
    if len(table) > limits.max_frames:
        raise LimitExceededError(f"{len(table)} frames exceed the limit of {limits.max_frames}")
    payload = packet.payload
    end = payload_end(dims)  # Python integers: the layout is only built for a payload of its length
    if len(payload) != end:
        raise HeaderError(f"payload has {len(payload)} bytes; its frames end at {end}")
    canonical = placement(dims)
    # msgpack bytes compare values *and* types (1 vs True vs 1.0) in one C call, whatever the frame count
    if msgpack.packb(table) != canonical.packed:
        _explain_frame_mismatch(table, canonical.entries, len(payload))
    with warnings.catch_warnings():  # read-only buffers: the tensors alias the packet
        warnings.simplefilter("ignore")
        whole = torch.frombuffer(payload, dtype=torch.uint8) if len(payload) else torch.empty(0, dtype=torch.uint8)
    if whole.data_ptr() % 8:  # offsets are multiples of 64: only the buffer's own address can be misaligned
        whole = whole.clone()  # fresh allocations are aligned
    typed: dict[torch.dtype, torch.Tensor] = {}
    layout = _columns(dims)
    named = {f.part: _view(whole, typed, f.dtype, (), f.shape, offset) for f, offset in layout.table}
    columns = {
        (f.part, f.field): _view(whole, typed, f.dtype, (dims.layers,), f.shape, offset, layout.span).unbind(0)
        for f, offset in layout.columns
    }
    return named, columns


def _explain_frame_mismatch(table: list, expected: list[list], payload_len: int) -> None:
    """Raise a :class:`HeaderError` naming the first frame entry that differs from the canonical table."""
    if len(table) != len(expected):
        raise HeaderError(f"header lists {len(table)} frames; its shapes imply {len(expected)}")
    for entry, (name, dtype, shape, offset, size) in zip(table, expected):
        if not (isinstance(entry, list) and len(entry) == 5):
            raise HeaderError(f"frame entry for {name!r} must be [name, dtype, shape, offset, size]")
        got_name, got_dtype, got_shape, got_offset, got_size = entry
        if got_name != name or got_dtype != dtype or got_shape != shape:
            raise HeaderError(f"frame {got_name!r} {got_dtype} {got_shape}; expected {name!r} {dtype} {shape}")
        if not all(type(v) is int for v in (got_offset, got_size, *got_shape)):
            raise HeaderError(f"frame {name!r}: shape, offset and size must be integers")
        if got_size != size:
            raise HeaderError(f"frame {name!r} declares {got_size} bytes; {dtype} {shape} needs {size}")
        if got_offset != offset:
            raise HeaderError(
                f"frame {name!r} at [{got_offset}, {got_offset + got_size}) in a {payload_len}-byte payload; "
                f"the canonical layout puts it at {offset}"
            )
    raise HeaderError("frame table is not in canonical form")


def _view(
    whole: torch.Tensor,
    typed: dict,
    dtype: torch.dtype,
    lead: tuple[int, ...],
    shape: tuple[int, ...],
    offset: int,
    span: int = 0,
) -> torch.Tensor:
    """The ``dtype`` tensor ``lead + shape`` of the payload ``whole`` (uint8, aligned) whose first element is at
    byte ``offset``, C-contiguous within ``shape``, each leading index ``span`` bytes further: a strided view of
    the payload seen as ``dtype`` (kept in ``typed``, one per dtype)."""
    if not math.prod(shape):
        return torch.empty(lead + tuple(shape), dtype=dtype)
    item = dtype.itemsize
    base = typed.get(dtype)
    if base is None:
        base = typed[dtype] = whole[: len(whole) - len(whole) % item].view(dtype)
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    strides += [span // item] * len(lead)
    return base.as_strided(lead + tuple(shape), tuple(reversed(strides)), offset // item)


def _latent(packet: Packet, limits: WireLimits, expect_fingerprint: str | None) -> LatentMessage:
    h = packet.header
    fingerprint = field(h, "fingerprint", str)
    try:
        check_same_model(expect_fingerprint or "", fingerprint, "packet memory")
    except IncompatibleMemoryError as e:
        raise ModelMismatchError(str(e)) from None
    agents = strings(h, "agents", limits.max_agents)
    dims = memory_dims(h, limits)
    named, columns = _tensors(packet, dims, limits)
    segment, agent = named["segment"], named["agent"]
    if segment.numel() and (int(segment.min()) < 0 or int(segment.max()) > max(Segment)):
        raise HeaderError("token table holds an unknown segment code")
    if agent.numel() and (int(agent.min()) < -1 or int(agent.max()) >= len(agents)):
        raise HeaderError(f"token table names an agent outside the {len(agents)} listed")
    try:
        memory = build_memory(dims, named, columns, agents, fingerprint)
    except (MemoryError_, ValueError) as e:
        raise HeaderError(f"memory does not fit its token table: {e}") from None
    metrics = field(h, "metrics", dict, optional=True) or {}
    return LatentMessage(field(h, "sender", str), memory, field(h, "recipe", str), metrics)


def decode_packet(
    packet: Packet, *, expect_fingerprint: str | None = None, limits: WireLimits = DEFAULT_LIMITS
) -> TextMessage | LatentMessage:
    """The message of an opened packet (:func:`open_packet`); see :func:`decode`."""
    kind = field(packet.header, "kind", str)
    if kind == "text":
        texts = strings(packet.header, "texts", limits.max_texts)
        if packet.payload.nbytes or field(packet.header, "frames", list):
            raise HeaderError("a text packet carries no frames")
        return TextMessage(field(packet.header, "sender", str), texts)
    if kind == "latent":
        return _latent(packet, limits, expect_fingerprint)
    raise HeaderError(f"unknown message kind {kind!r}")


def decode(
    data: bytes | bytearray | memoryview,
    *,
    expect_fingerprint: str | None = None,
    limits: WireLimits = DEFAULT_LIMITS,
) -> TextMessage | LatentMessage:
    """Unpack and verify a packet (any contiguous bytes-like object, e.g. a numpy ``uint8`` array).
    ``expect_fingerprint`` rejects working memory of another model
    (:func:`latent_relay.relay.memory.check_same_model`).

    Tensors of the result are views of ``data`` (or of the decompressed payload) where alignment allows: do
    not mutate ``data`` while the message is in use. Every problem raises a :class:`PacketError`.
    """
    return decode_packet(open_packet(data, limits=limits), expect_fingerprint=expect_fingerprint, limits=limits)
