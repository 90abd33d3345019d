"""Encoding a message into one packet: the header, the frames at their canonical places, the checksum.

Encoding writes each payload byte once, straight into the new packet, checksumming it while it is in cache
(:func:`_build`). A memory built inside a :class:`~latent_relay.relay.wire.arena.PacketArena` is not copied at all:
the arena writes the header and the checksum around frames already in place.
"""

from __future__ import annotations

import ctypes
import functools
from typing import TYPE_CHECKING, Any

import msgpack
import torch
import zstandard

from latent_relay.relay.memory import KVState
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.wire.checksum import DIGEST_SIZE, digest, hash_step
from latent_relay.relay.wire.format import (
    ALIGN,
    DEFAULT_LIMITS,
    DTYPE_NAMES,
    FLAG_ZSTD,
    FLOAT_NAMES,
    FORMAT_VERSION,
    MAGIC,
    PREFIX,
    HeaderError,
    WireLimits,
    align,
    check_declared,
)
from latent_relay.relay.wire.frames import MemoryDims, Placement, frame_tensors, memory_frames, place, placement
from latent_relay.relay.wire.header import memory_dims

if TYPE_CHECKING:
    from latent_relay.relay.wire.arena import PacketArena

_ZEROS = memoryview(bytes(ALIGN))  # frame padding
_NO_FRAMES = place(())


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is a contiguous CPU tensor, else a contiguous CPU copy."""
    if not (t.is_cpu and t.is_contiguous()) or t.requires_grad:
        t = t.detach().cpu().contiguous()
    return t


def _bytes_view(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor."""
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: look at its bytes
        t = t.reshape(-1).view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


# CPython's own constructor of an uninitialised bytes object and the address of its contents (private prototypes,
# so that nothing else's use of ``ctypes.pythonapi`` is changed).
_new_bytes = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
    ("PyBytes_FromStringAndSize", ctypes.pythonapi)
)
_bytes_address = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object)(("PyBytes_AsString", ctypes.pythonapi))


@functools.lru_cache(maxsize=64)
def _copy_plan(extents: tuple[tuple[int, int], ...], payload_len: int, step: int) -> tuple[tuple, ...]:
    """Per hashing step ``j`` of a payload (bytes ``[j * step, (j + 1) * step)``), the writes that fill it:
    ``(source, offset in the source, payload offset, size)``, ``source`` indexing ``extents`` (the payload
    ``(offset, size)`` of each source, in payload order) or -1 for zero padding. Cached: hop after hop sends
    memories of the same shape."""
    cells: list[list[tuple[int, int, int, int]]] = [[] for _ in range(-(-payload_len // step))]

    def put(source: int, offset: int, n: int) -> None:
        done = 0
        while done < n:
            j = (offset + done) // step
            take = min(n - done, (j + 1) * step - offset - done)
            cells[j].append((source, done, offset + done, take))
            done += take

    end = 0
    for i, (offset, n) in enumerate(extents):
        put(-1, end, offset - end)
        put(i, offset, n)
        end = offset + n
    if end != payload_len:
        raise AssertionError(f"frames end at {end}, not at the payload length {payload_len}")
    return tuple(tuple(cell) for cell in cells)


def _build(head: bytes, addresses: list[int], extents: tuple[tuple[int, int], ...], payload_len: int) -> bytes:
    """The packet ``head + payload + checksum`` as one new bytes object, the payload filled from the sources at
    ``addresses`` (payload ``(offset, size)`` in ``extents``, zeros between them) while it is checksummed
    (:func:`~latent_relay.relay.wire.checksum.digest`, :func:`_copy_plan`).

    The object is made the way C code makes a bytes object, uninitialised by ``PyBytes_FromStringAndSize(NULL, n)``
    and filled before anything else can see it: the payload is written once, by every CPU, and the checksum reads
    it from cache, instead of hashing the sources and then joining them into a packet (a second read of each)."""
    size = len(head) + payload_len + DIGEST_SIZE  # > 1: never CPython's shared empty or one-byte object
    plan = _copy_plan(extents, payload_len, hash_step())
    packet = _new_bytes(None, size)
    base = _bytes_address(packet)
    payload_at = base + len(head)
    ctypes.memmove(base, head, len(head))

    def write(j: int) -> None:
        for source, offset, at, n in plan[j]:
            if source < 0:
                ctypes.memset(payload_at + at, 0, n)
            else:
                ctypes.memmove(payload_at + at, addresses[source] + offset, n)

    with memoryview(packet) as view:
        check = digest(head, view[len(head) : len(head) + payload_len], write)
    ctypes.memmove(base + size - DIGEST_SIZE, check, DIGEST_SIZE)
    return packet


def _plain(value: Any, depth: int = 0) -> Any:
    """Metrics as msgpack-safe plain data: numbers, strings, lists and str-keyed maps (others dropped)."""
    if depth > 8:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return None


def _memory_fields(memory: Any) -> tuple[dict[str, Any], MemoryDims]:
    """The header fields that describe a KVState or QuantizedMemory, and its dimensions."""
    if not isinstance(memory, KVState):
        memory.validate()
    dtype = DTYPE_NAMES.get(memory.dtype, str(memory.dtype))
    if dtype not in FLOAT_NAMES:
        raise ValueError(f"cannot encode a memory of dtype {memory.dtype}")
    dims = MemoryDims.of(memory)
    quant = dims.quant
    fields = {
        "memory": "quantized" if dims.quantized else "kv",
        "fingerprint": memory.fingerprint,
        "dtype": dtype,
        "layers": dims.layers,
        "kv_heads": dims.heads,
        "head_dim": dims.head_dim,
        "batch": dims.batch,
        "tokens": dims.tokens,
        "per_head_positions": dims.per_head_positions,
        "agents": list(memory.agents),
        "quant": None
        if quant is None
        else {"bits": quant.bits, "key_group": quant.key_group, "value_group": quant.value_group},
    }
    return fields, dims


def message_header(
    message: TextMessage | LatentMessage, zstd_level: int | None = None
) -> tuple[dict[str, Any], list[torch.Tensor], Placement]:
    """A message's header (frame table included), its frame tensors in wire order and their placement."""
    if zstd_level is not None and not (-100 <= zstd_level <= zstandard.MAX_COMPRESSION_LEVEL):
        raise ValueError(f"zstd level must be in [-100, {zstandard.MAX_COMPRESSION_LEVEL}], got {zstd_level}")
    if isinstance(message, TextMessage):
        header = {"kind": "text", "sender": message.sender, "texts": list(message.texts)}
        tensors, placed = [], _NO_FRAMES
    elif isinstance(message, LatentMessage):
        if not isinstance(message.sender, str) or not isinstance(message.recipe, str):
            raise TypeError("a LatentMessage's sender and recipe must be strings (recipe '' for full relay)")
        fields, dims = _memory_fields(message.memory)
        header = {"kind": "latent", "sender": message.sender, "recipe": message.recipe, **fields}
        header["metrics"] = _plain(message.metrics)
        tensors, placed = frame_tensors(message.memory, memory_frames(dims)), placement(dims)
    else:
        raise TypeError(f"cannot encode {type(message).__name__}; expected TextMessage or LatentMessage")
    header["frames"] = placed.entries
    header["zstd_level"] = zstd_level
    return header, tensors, placed


def build_head(
    header: dict, flags: int, stored_len: int, raw_len: int, limits: WireLimits, size: int | None = None
) -> bytes:
    """Prefix + msgpack header + zero padding to the payload's 64-byte boundary; with ``size`` (a multiple of 64),
    exactly ``size`` bytes, the rest being header padding, or ``b""`` where the header does not fit in them."""
    head_bytes = msgpack.packb(header, use_bin_type=True)
    check_declared(len(head_bytes), raw_len, limits)
    if header.get("kind") == "latent":
        memory_dims(header, limits)  # what a decoder would refuse (a group size over its limit...) is refused here
    used = align(PREFIX.size + len(head_bytes))
    pad = 0 if size is None else size - used
    if pad < 0:
        return b""
    head = PREFIX.pack(MAGIC, FORMAT_VERSION, flags, len(head_bytes), pad, stored_len, raw_len) + head_bytes
    return head + bytes(used + pad - len(head))


def _zstd_payload(tensors: list[torch.Tensor], placed: Placement, zstd_level: int | None) -> bytes | None:
    """The payload of CPU-contiguous frame ``tensors`` at their ``placed`` offsets as one zstd frame at
    ``zstd_level``, or ``None`` (no level, an empty payload, or one that zstd does not shrink: it stays raw)."""
    raw_len = placed.end
    if zstd_level is None or not raw_len:
        return None
    pieces: list[memoryview] = []
    end = 0
    for tensor, (_, _, _, start, size) in zip(tensors, placed.entries):
        pieces += [_ZEROS[: start - end], _bytes_view(tensor)]
        end = start + size
    cobj = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compressobj(size=raw_len)
    packed = b"".join([*(cobj.compress(p) for p in pieces), cobj.flush()])
    return packed if len(packed) < raw_len else None


def encode(
    message: TextMessage | LatentMessage,
    *,
    zstd_level: int | None = None,
    limits: WireLimits = DEFAULT_LIMITS,
    into: PacketArena | None = None,
) -> bytes | bytearray:
    """Pack a message into one packet (see :mod:`latent_relay.relay.wire`): a new ``bytes`` object. ``zstd_level``
    compresses the payload (kept raw when compression does not shrink it). :func:`packet_size` gives its size as
    relay bytes count it.

    ``into``: the :class:`PacketArena` the message's memory was built in. Where every frame lies in place there,
    the packet is the arena's ``bytearray``, finished around the frames instead of copied (and the message's
    tensors see its bytes from then on); otherwise (another memory, a quantized one, zstd, an arena already
    used) the packet is built as without it."""
    header, tensors, placed = message_header(message, zstd_level)
    raw_len = placed.end
    if into is not None and zstd_level is None:
        packet = into.finish(header, tensors, placed, limits)
        if packet is not None:
            return packet
    tensors = [_cpu_contiguous(tensor) for tensor in tensors]  # alive until the packet is built
    packed = _zstd_payload(tensors, placed, zstd_level)
    if packed is not None:
        head = build_head(header, FLAG_ZSTD, len(packed), raw_len, limits)
        return _build(head, [_bytes_address(packed)], ((0, len(packed)),), len(packed))
    head = build_head(header, 0, raw_len, raw_len, limits)
    extents = tuple((start, size) for _, _, _, start, size in placed.entries)
    return _build(head, [t.data_ptr() for t in tensors], extents, raw_len)


def encoded_size(
    message: TextMessage | LatentMessage, *, zstd_level: int | None = None, limits: WireLimits = DEFAULT_LIMITS
) -> int:
    """``packet_size(encode(message, zstd_level=zstd_level))`` without building the packet, for messages that are
    measured but never sent (a same-host hand-off). With a raw payload: no copy, no checksum and no transfer of
    device tensors. With ``zstd_level`` the payload is compressed (that is the only way to know its size), but
    not checksummed or framed."""
    header, tensors, placed = message_header(message, zstd_level)
    raw_len = placed.end
    if zstd_level is not None:
        packed = _zstd_payload([_cpu_contiguous(t) for t in tensors], placed, zstd_level)
        if packed is not None:
            return len(build_head(header, FLAG_ZSTD, len(packed), raw_len, limits)) + len(packed) + DIGEST_SIZE
    return len(build_head(header, 0, raw_len, raw_len, limits)) + raw_len + DIGEST_SIZE


def packet_size(packet: bytes | bytearray | memoryview) -> int:
    """A packet's size as relay bytes count it: its length less the header padding of a packet built in place
    (read from the prefix), so that the count does not depend on where the memory was built."""
    if len(packet) < PREFIX.size or bytes(packet[:4]) != MAGIC:
        raise HeaderError("not a latent-relay packet (bad magic)")
    return len(packet) - PREFIX.unpack_from(packet)[4]
