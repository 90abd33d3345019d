"""Wire format: messages as self-describing, checksummed, size-limited packets (issue 4).

A packet is one contiguous buffer (all integers little-endian)::

    0   magic  b"LRLY"              4 bytes
    4   format version              u16
    6   flags (bit 0: zstd payload) u16, other bits zero
    8   header length               u32
    12  header padding              u32, a multiple of 64 (zero unless the packet was built in place)
    16  stored payload length       u64
    24  raw payload length          u64 (after decompression)
    32  header                      msgpack map
        zero padding to a 64-byte boundary, then the header padding's zero bytes
    P   payload                     tensor frames, each at the next 64-byte boundary (or one zstd frame of them)
    end checksum                    16 bytes

The header names the message kind, sender, model fingerprint, dtype, layers, KV heads, head dim, the token
table's agents, the applied recipe, quantization parameters and, per frame, dtype / shape / offset / size.
The token table (segment, agent, position) and every key / value tensor (or the packed codes, scales and zeros
of a KIVI-quantized memory, :mod:`latent_relay.compression.quant`) are frames, in a fixed order: the table, then per
layer its key and value frames. The header implies every frame's dtype, shape and offset, so a decoder accepts exactly
one frame table (compared in one step) and builds each per-layer column of frames as one strided view of the
payload. Encoding writes each payload byte once, straight into the new packet, checksumming it while it is in
cache (:func:`_build`). A sender can also build the memory inside the packet in the first place
(:class:`PacketArena`): then encoding writes only the header and the checksum around frames already in place,
and the header padding fills the room it reserved for the header. Decoding is zero-copy where the buffer
alignment allows: tensors are views of the packet (or of the decompressed payload); a misaligned buffer is
copied once.

The checksum is XXH3-128 over the fixed prefix, the header and the XXH3-128 of each 4 MiB chunk of the payload
(a hash tree of depth one, so that large payloads are hashed by parallel threads), so a flipped bit anywhere is
caught before the header is parsed. The header is msgpack read with strict settings (``raw=False``,
``strict_map_key=True``, no ext types, bounded lengths); nothing is unpickled or evaluated. Hard limits
(:class:`WireLimits`) bound the header size, the decoded size (a zstd bomb is refused from its declared sizes
before anything is inflated), layers, heads, tokens and frames. Every problem raises a :class:`PacketError`.
"""

from __future__ import annotations

import ctypes
import functools
import math
import struct
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
import xxhash
import zstandard

from latent_relay.relay.memory import KVState, MemoryError_, Segment
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.threads import available_cpus, shared_pool

MAGIC = b"LRLY"
FORMAT_VERSION = 3  # 2: chunked (tree) checksum; 3: header padding (packets built in place)
FLAG_ZSTD = 1
ALIGN = 64
PREFIX = struct.Struct("<4sHHIIQQ")
DIGEST_SIZE = 16
DIGEST_SEED = 0x4C524C59  # 'LRLY'
DIGEST_CHUNK = 4 << 20  # payload bytes per leaf of the checksum tree
LEAVES_PER_RUN = 2  # a checksum thread is handed at least this many leaves (8 MiB): waking it costs more below

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


# ------------------------------------------------------------------------------------------------ errors
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


class ModelMismatchError(PacketError):
    """The packet's working memory was made by a different model than the receiver's."""


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


# ------------------------------------------------------------------------------------------------ checksum
HASH_STEP = 256 << 10  # bytes hashed per update: small enough to still be in a core's cache after it was written


def _hash_step() -> int:
    """The hashing step: :data:`HASH_STEP`, or one whole leaf where the leaf is not a multiple of it."""
    return HASH_STEP if DIGEST_CHUNK % HASH_STEP == 0 else DIGEST_CHUNK


def _digest(head: memoryview | bytes, payload: memoryview, write: Callable[[int], None] | None = None) -> bytes:
    """XXH3-128 over the header block and the XXH3-128 of each :data:`DIGEST_CHUNK` chunk of ``payload``. A
    non-cryptographic checksum: it detects corruption, not tampering. A large payload's chunks are hashed in
    contiguous runs, at most one per available CPU, the caller taking the first (xxhash releases the GIL), so the
    checksum never dominates a hop. A payload is split into at most one run per :data:`LEAVES_PER_RUN` leaves: handing a
    thread less costs more than it saves (waking it, and, in a hop, sharing a CPU with torch's OpenMP workers, which
    spin for milliseconds after the compression's last op). So a 7.6 MB packet is copied and hashed by the caller
    alone, a 22.6 MB one by two threads.

    Each chunk is hashed in steps of :func:`_hash_step` bytes; ``write(j)``, when given, is called just before
    step ``j`` (payload bytes ``[j * step, (j + 1) * step)``) is hashed and must fill them: the encoder copies a
    step's frames into the packet there, so the copy and the checksum read the source once, the checksum reading
    the copy from cache, and both run on the checksum's threads."""
    total, step = len(payload), _hash_step()
    n_leaves = -(-total // DIGEST_CHUNK)
    leaves: list[bytes] = [b""] * n_leaves

    def hash_run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            h = xxhash.xxh3_128(seed=DIGEST_SEED)
            for start in range(i * DIGEST_CHUNK, min(total, (i + 1) * DIGEST_CHUNK), step):
                if write is not None:
                    write(start // step)
                h.update(payload[start : start + step])
            leaves[i] = h.digest()

    runs = min(n_leaves, max(1, n_leaves // LEAVES_PER_RUN), available_cpus(), 4)
    bounds = [n_leaves * i // max(1, runs) for i in range(runs + 1)]
    pending = [_hash_pool().submit(hash_run, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    try:
        if runs:
            hash_run(bounds[0], bounds[1])
    finally:
        for future in pending:
            future.result()
    h = xxhash.xxh3_128(seed=DIGEST_SEED)
    h.update(head)
    for leaf in leaves:
        h.update(leaf)
    return h.digest()


def _hash_pool() -> ThreadPoolExecutor:
    """The checksum threads (the caller hashes one run itself, so one fewer than the runs)."""
    return shared_pool("wire-digest", 3)


# ------------------------------------------------------------------------------------------------ encode
_ZEROS = memoryview(bytes(ALIGN))  # frame padding


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


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

    def place(source: int, offset: int, n: int) -> None:
        done = 0
        while done < n:
            j = (offset + done) // step
            take = min(n - done, (j + 1) * step - offset - done)
            cells[j].append((source, done, offset + done, take))
            done += take

    end = 0
    for i, (offset, n) in enumerate(extents):
        place(-1, end, offset - end)
        place(i, offset, n)
        end = offset + n
    if end != payload_len:
        raise AssertionError(f"frames end at {end}, not at the payload length {payload_len}")
    return tuple(tuple(cell) for cell in cells)


def _build(head: bytes, addresses: list[int], extents: tuple[tuple[int, int], ...], payload_len: int) -> bytes:
    """The packet ``head + payload + checksum`` as one new bytes object, the payload filled from the sources at
    ``addresses`` (payload ``(offset, size)`` in ``extents``, zeros between them) while it is checksummed
    (:func:`_digest`, :func:`_copy_plan`).

    The object is made the way C code makes a bytes object, uninitialised by ``PyBytes_FromStringAndSize(NULL, n)``
    and filled before anything else can see it: the payload is written once, by every CPU, and the checksum reads
    it from cache, instead of hashing the sources and then joining them into a packet (a second read of each)."""
    size = len(head) + payload_len + DIGEST_SIZE  # > 1: never CPython's shared empty or one-byte object
    plan = _copy_plan(extents, payload_len, _hash_step())
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
        digest = _digest(head, view[len(head) : len(head) + payload_len], write)
    ctypes.memmove(base + size - DIGEST_SIZE, digest, DIGEST_SIZE)
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


def _kv_names(layers: int) -> list[str]:
    """The per-layer frame names in payload order: ``k0, v0, k1, v1, ...``."""
    return [f"{kv}{i}" for i in range(layers) for kv in "kv"]


def _memory_frames(memory: Any) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """Header fields and named frames of a KVState or QuantizedMemory."""
    quantized = not isinstance(memory, KVState)
    if quantized:
        memory.validate()
    table = [
        ("segment", memory.segment.to(torch.int8)),
        ("agent", memory.agent.to(torch.int16)),
        ("position", memory.position.to(torch.int64)),
    ]
    fields = {
        "memory": "quantized" if quantized else "kv",
        "fingerprint": memory.fingerprint,
        "dtype": DTYPE_NAMES.get(memory.dtype, str(memory.dtype)),
        "layers": memory.num_layers,
        "kv_heads": memory.num_kv_heads,
        "head_dim": memory.head_dim,
        "batch": memory.batch_size,
        "tokens": memory.num_tokens,
        "per_head_positions": memory.per_head_positions,
        "agents": list(memory.agents),
        "quant": None,
    }
    if fields["dtype"] not in FLOAT_NAMES:
        raise ValueError(f"cannot encode a memory of dtype {memory.dtype}")
    frames = list(table)
    per_layer = [t for kv in zip(memory.keys, memory.values) for t in kv]
    names = _kv_names(len(memory.keys))
    if not quantized:
        return fields, frames + list(zip(names, per_layer))
    layouts = {(q.bits, q.group_size) for q in memory.keys}, {(q.bits, q.group_size) for q in memory.values}
    if len(layouts[0]) > 1 or len(layouts[1]) > 1 or {b for b, _ in layouts[0]} != {b for b, _ in layouts[1]}:
        raise ValueError("a quantized memory must use one bit width and one group size per tensor kind")
    if memory.keys:
        fields["quant"] = {
            "bits": memory.keys[0].bits,
            "key_group": memory.keys[0].group_size,
            "value_group": memory.values[0].group_size,
        }
    for name, q in zip(names, per_layer):
        frames += [(f"{name}.data", q.data), (f"{name}.scale", q.scale), (f"{name}.zero", q.zero)]
    return fields, frames


def _message_header(message: TextMessage | LatentMessage) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """The header fields of a message (all but the frame table) and its named frames."""
    if isinstance(message, TextMessage):
        return {"kind": "text", "sender": message.sender, "texts": list(message.texts)}, []
    if isinstance(message, LatentMessage):
        if not isinstance(message.sender, str) or not isinstance(message.recipe, str):
            raise TypeError("a LatentMessage's sender and recipe must be strings (recipe '' for full relay)")
        fields, frames = _memory_frames(message.memory)
        header = {"kind": "latent", "sender": message.sender, "recipe": message.recipe, **fields}
        header["metrics"] = _plain(message.metrics)
        return header, frames
    raise TypeError(f"cannot encode {type(message).__name__}; expected TextMessage or LatentMessage")


def _placed(frames) -> tuple[list[list], int]:
    """The frame table ``[name, dtype, shape, offset, size]`` of ``(name, dtype, shape, size)`` frames, each frame
    at the next 64-byte boundary (the one layout :func:`encode` writes and :func:`decode` accepts), and the
    payload length."""
    table, end = [], 0
    for name, dtype, shape, size in frames:
        start = _align(end)
        table.append([name, dtype, list(shape), start, size])
        end = start + size
    return table, end


def _frame_table(frames: list[tuple[str, torch.Tensor]]) -> tuple[list[list], int]:
    """The frame table of named tensors and the payload length (see :func:`_placed`)."""
    return _frame_table_of(tuple((name, tensor.dtype, tensor.shape) for name, tensor in frames))


@functools.lru_cache(maxsize=64)
def _frame_table_of(frames: tuple[tuple[str, torch.dtype, torch.Size], ...]) -> tuple[list[list], int]:
    for name, dtype, _ in frames:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"frame {name}: dtype {dtype} cannot travel")
    return _placed((n, DTYPE_NAMES[dt], shape, math.prod(shape) * dt.itemsize) for n, dt, shape in frames)


def _head(
    header: dict, flags: int, stored_len: int, raw_len: int, limits: WireLimits, size: int | None = None
) -> bytes:
    """Prefix + msgpack header + zero padding to the payload's 64-byte boundary; with ``size`` (a multiple of 64),
    exactly ``size`` bytes, the rest being header padding, or ``b""`` where the header does not fit in them."""
    head_bytes = msgpack.packb(header, use_bin_type=True)
    _check_declared(len(head_bytes), raw_len, limits)
    used = _align(PREFIX.size + len(head_bytes))
    pad = 0 if size is None else size - used
    if pad < 0:
        return b""
    head = PREFIX.pack(MAGIC, FORMAT_VERSION, flags, len(head_bytes), pad, stored_len, raw_len) + head_bytes
    return head + bytes(used + pad - len(head))


def encode(
    message: TextMessage | LatentMessage,
    *,
    zstd_level: int | None = None,
    limits: WireLimits = DEFAULT_LIMITS,
    into: PacketArena | None = None,
) -> bytes | bytearray:
    """Pack a message into one packet (see the module docstring): a new ``bytes`` object. ``zstd_level``
    compresses the payload (kept raw when compression does not shrink it).

    ``into``: the :class:`PacketArena` the message's memory was built in. Where every frame lies in place there,
    the packet is the arena's ``bytearray``, finished around the frames instead of copied (and the message's
    tensors see its bytes from then on); otherwise (another memory, a quantized one, zstd, an arena already
    used) the packet is built as without it."""
    if zstd_level is not None and not (-100 <= zstd_level <= zstandard.MAX_COMPRESSION_LEVEL):
        raise ValueError(f"zstd level must be in [-100, {zstandard.MAX_COMPRESSION_LEVEL}], got {zstd_level}")
    header, frames = _message_header(message)
    table, raw_len = _frame_table(frames)
    header["frames"] = table
    header["zstd_level"] = zstd_level
    if into is not None and zstd_level is None:
        packet = into.finish(header, frames, table, raw_len, limits)
        if packet is not None:
            return packet
    tensors = [_cpu_contiguous(tensor) for _, tensor in frames]  # alive until the packet is built
    if zstd_level is not None and raw_len:
        pieces: list[memoryview] = []
        end = 0
        for tensor, (_, _, _, start, size) in zip(tensors, table):
            pieces += [_ZEROS[: start - end], _bytes_view(tensor)]
            end = start + size
        cobj = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compressobj(size=raw_len)
        packed = b"".join([*(cobj.compress(p) for p in pieces), cobj.flush()])
        if len(packed) < raw_len:
            head = _head(header, FLAG_ZSTD, len(packed), raw_len, limits)
            return _build(head, [_bytes_address(packed)], ((0, len(packed)),), len(packed))
    head = _head(header, 0, raw_len, raw_len, limits)
    extents = tuple((start, size) for _, _, _, start, size in table)
    return _build(head, [t.data_ptr() for t in tensors], extents, raw_len)


_new_bytearray = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
    ("PyByteArray_FromStringAndSize", ctypes.pythonapi)
)


class PacketArena:
    """The buffer of one future packet, for a memory to be built in before it is encoded (zero-copy encode).

    Copying the frames into a new packet is about half of what :func:`encode` costs (``benchmarks/codec.py``). A
    sender instead hands :meth:`allocate` to :func:`compression.compress` (a
    :data:`latent_relay.relay.memory.TensorAllocator`): the packed memory's tensors are then views of this arena's
    payload, placed as :func:`encode` places frames, and ``encode(message, into=arena)`` only writes the header, the
    zero bytes between frames and the checksum around them. The arena reserves the frame table's share of the header
    plus ``head_room`` bytes; the header's unused part travels as header padding (zero bytes, at most ``head_room`` + 63
    per packet). Memories under ``min_bytes`` of frames, or not on the CPU, are left to the caller to allocate: their
    copy is cheap.

    The views start uninitialised: the builder writes every element of them (``gather_selection`` does), or the
    packet would carry stale heap bytes. One arena makes one packet. After it the packet is the memory's storage:
    the message's tensors see the packet's bytes, so the sender must not change them.
    """

    def __init__(self, *, head_room: int = 2048, min_bytes: int = 1 << 20):
        if head_room < 0 or min_bytes < 0:
            raise ValueError(f"head_room and min_bytes must be >= 0, got {head_room} and {min_bytes}")
        self.head_room, self.min_bytes = head_room, min_bytes
        self.buffer: bytearray | None = None
        self.finished = False
        self._table: list[list] = []
        self._head_size = self._payload_at = 0

    def allocate(self, shapes, device) -> list[torch.Tensor] | None:
        """Views of the payload for a memory's tensors ``[(shape, dtype), ...]`` (segment, agent, position, then
        each layer's keys and values), or ``None`` where the arena does not take this memory."""
        if self.buffer is not None:
            raise RuntimeError("a PacketArena holds one packet: make a new one for the next memory")
        shapes = list(shapes)
        if torch.device(device).type != "cpu" or len(shapes) < 3 or len(shapes) % 2 == 0:
            return None
        names = ["segment", "agent", "position", *_kv_names((len(shapes) - 3) // 2)]
        if any(dtype not in DTYPE_NAMES for _, dtype in shapes):
            return None
        table, raw_len = _frame_table_of(tuple((n, dt, torch.Size(shape)) for n, (shape, dt) in zip(names, shapes)))
        if raw_len < self.min_bytes:
            return None
        self._head_size = _align(PREFIX.size + len(msgpack.packb(table, use_bin_type=True)) + self.head_room)
        self.buffer = _new_bytearray(None, self._head_size + raw_len + DIGEST_SIZE)  # uninitialised
        self._table = table
        payload = torch.frombuffer(self.buffer, dtype=torch.uint8)[self._head_size : self._head_size + raw_len]
        self._payload_at = payload.data_ptr()
        return [
            payload[offset : offset + size].view(dtype).view(shape) if size else torch.empty(shape, dtype=dtype)
            for (shape, dtype), (_, _, _, offset, size) in zip(shapes, table)
        ]

    def finish(
        self, header: dict, frames: list[tuple[str, torch.Tensor]], table: list[list], raw_len: int, limits: WireLimits
    ) -> bytearray | None:
        """The packet of a message whose frames all lie in place in this arena (header, gaps and checksum written
        around them), or ``None`` (then :func:`encode` builds the packet by copying)."""
        if self.buffer is None or self.finished or table != self._table:
            return None
        for (_, tensor), (_, _, _, offset, size) in zip(frames, table):
            at = self._payload_at + offset
            if size and not (tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.data_ptr() == at):
                return None
        with memoryview(self.buffer) as view:
            head = _head(header, 0, raw_len, raw_len, limits, size=self._head_size)
            if not head:
                return None
            view[: self._head_size] = head
            end = self._head_size
            for _, _, _, offset, size in table:  # the zero bytes between frames
                view[end : self._head_size + offset] = bytes(self._head_size + offset - end)
                end = self._head_size + offset + size
            stored = view[self._head_size : self._head_size + raw_len]
            view[end:] = _digest(view[: self._head_size], stored)
            stored.release()
        self.finished = True
        return self.buffer


def encoded_size(message: TextMessage | LatentMessage, *, limits: WireLimits = DEFAULT_LIMITS) -> int:
    """``len(encode(message))`` (raw payload) without building the packet: no copy, no checksum, and no transfer
    of device tensors, for messages that are measured but never sent (a same-host hand-off)."""
    header, frames = _message_header(message)
    table, raw_len = _frame_table(frames)
    header["frames"] = table
    header["zstd_level"] = None
    return len(_head(header, 0, raw_len, raw_len, limits)) + raw_len + DIGEST_SIZE


# ------------------------------------------------------------------------------------------------ decode
def _check_declared(header_len: int, raw_len: int, limits: WireLimits) -> None:
    if header_len > limits.max_header_bytes:
        raise LimitExceededError(f"header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}")
    if raw_len > limits.max_decoded_bytes:
        raise LimitExceededError(f"payload decodes to {raw_len} bytes, over the limit of {limits.max_decoded_bytes}")


@dataclass
class _Packet:
    """A packet whose framing and checksum are verified and whose header is parsed."""

    header: dict
    payload: memoryview  # raw (decompressed) payload
    flags: int
    total: int
    stored_len: int
    header_len: int
    header_pad: int = 0


def _open(data: bytes | bytearray | memoryview, limits: WireLimits) -> _Packet:
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
    _check_declared(header_len, raw_len, limits)
    if not flags & FLAG_ZSTD and stored_len != raw_len:
        raise HeaderError(f"uncompressed payload declares {stored_len} stored but {raw_len} raw bytes")
    if stored_len > limits.max_decoded_bytes:
        raise LimitExceededError(f"stored payload of {stored_len} bytes exceeds {limits.max_decoded_bytes}")
    payload_off = _align(PREFIX.size + header_len) + header_pad
    total = payload_off + stored_len + DIGEST_SIZE
    if len(view) < total:
        raise TruncatedPacketError(f"packet is {len(view)} bytes but its prefix declares {total}")
    if len(view) > total:
        raise HeaderError(f"{len(view) - total} unexpected bytes after the end of the packet")
    head, stored = view[:payload_off], view[payload_off : payload_off + stored_len]
    if _digest(head, stored) != bytes(view[total - DIGEST_SIZE :]):
        raise ChecksumError("checksum mismatch: the packet is corrupted or was altered")
    if any(view[PREFIX.size + header_len : payload_off]):
        raise HeaderError("non-zero header padding")
    header = _parse_header(view[PREFIX.size : PREFIX.size + header_len], limits)
    payload = _inflate(stored, raw_len) if flags & FLAG_ZSTD else stored
    return _Packet(header, payload, flags, total, stored_len, header_len, header_pad)


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


def _field(header: dict, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
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


def _count(header: dict, key: str, limit: int, *, minimum: int = 0) -> int:
    value = _field(header, key, int)
    if value < minimum:
        raise HeaderError(f"header field {key!r} = {value} is below {minimum}")
    if value > limit:
        raise LimitExceededError(f"{key} = {value} exceeds the limit of {limit}")
    return value


def _strings(header: dict, key: str, limit: int) -> list[str]:
    values = _field(header, key, list)
    if len(values) > limit:
        raise LimitExceededError(f"{len(values)} {key} exceed the limit of {limit}")
    if not all(isinstance(v, str) for v in values):
        raise HeaderError(f"header field {key!r} must be a list of strings")
    return values


@dataclass(frozen=True)
class _Layout:
    """The frames a latent header implies, in payload order: the token table's frames, then ``layers`` repeats of
    the per-layer ``columns`` (``k{i}``, ``v{i}`` or, quantized, their ``.data`` / ``.scale`` / ``.zero``).
    Every layer has the same shapes, so column ``c`` of layer ``i`` sits at ``column_offsets[c] + i * span``.
    Hashable: the canonical frame table of a layout is built once (:func:`_canonical`), as hop after hop sends
    memories of the same shape."""

    table: tuple[tuple[str, str, tuple[int, ...]], ...]
    columns: tuple[tuple[str, str, str, tuple[int, ...]], ...]  # (prefix, suffix, dtype, shape): prefix{i}suffix
    layers: int


@dataclass(frozen=True)
class _Canonical:
    """A layout's canonical frame table (see :func:`_placed`) and its msgpack bytes, the column offsets in layer
    0, the span of one layer in bytes and the payload length."""

    entries: list[list]
    packed: bytes
    column_offsets: list[int]
    span: int
    end: int


@functools.lru_cache(maxsize=64)
def _canonical(layout: _Layout) -> _Canonical:
    def frame(name: str, dtype: str, shape: tuple[int, ...]):
        return name, dtype, shape, math.prod(shape) * DTYPES[dtype].itemsize

    frames = [frame(*t) for t in layout.table]
    for i in range(layout.layers):
        frames += [frame(f"{prefix}{i}{suffix}", dtype, shape) for prefix, suffix, dtype, shape in layout.columns]
    entries, end = _placed(frames)
    first = len(layout.table)
    column_offsets = [entry[3] for entry in entries[first : first + len(layout.columns)]]
    span = entries[first + len(layout.columns)][3] - entries[first][3] if layout.layers > 1 else 0
    return _Canonical(entries, msgpack.packb(entries), column_offsets, span, end)


def _layout(header: dict, limits: WireLimits) -> _Layout:
    """The frames a latent header implies (checked against :class:`WireLimits` first)."""
    layers = _count(header, "layers", limits.max_layers)
    heads = _count(header, "kv_heads", limits.max_heads)
    dim = _count(header, "head_dim", limits.max_head_dim)
    batch = _count(header, "batch", limits.max_batch)
    tokens = _count(header, "tokens", limits.max_tokens)
    dtype = _field(header, "dtype", str)
    if dtype not in FLOAT_NAMES:
        raise HeaderError(f"memory dtype {dtype!r} is not one of {FLOAT_NAMES}")
    per_head = _field(header, "per_head_positions", bool)
    if 3 + 6 * layers > limits.max_frames:
        raise LimitExceededError(f"{layers} layers need more than {limits.max_frames} frames")
    pos_shape = (layers, batch, heads, tokens) if per_head else (batch, tokens)
    table = (
        ("segment", "int8", (batch, tokens)),
        ("agent", "int16", (batch, tokens)),
        ("position", "int64", pos_shape),
    )
    shape = (batch, heads, tokens, dim)
    kind = _field(header, "memory", str)
    if kind == "kv":
        return _Layout(table, (("k", "", dtype, shape), ("v", "", dtype, shape)), layers)
    if kind != "quantized":
        raise HeaderError(f"memory kind {kind!r} is neither 'kv' nor 'quantized'")
    from latent_relay.compression.quant import group_layout
    from latent_relay.kernels.reference import SUPPORTED_BITS, packed_width

    quant = _field(header, "quant", dict, optional=True)
    if quant is None:
        if layers:
            raise HeaderError("a quantized memory needs quantization parameters")
        return _Layout(table, (), 0)
    bits = _field(quant, "bits", int)
    if bits not in SUPPORTED_BITS:
        raise HeaderError(f"quantization bits {bits} not in {SUPPORTED_BITS}")
    columns = []
    for prefix, axis, group in (
        ("k", "channel", _field(quant, "key_group", int, optional=True)),
        ("v", "token", _field(quant, "value_group", int, optional=True)),
    ):
        if group is not None and group < 1:
            raise HeaderError(f"group size {group} must be positive")
        rows, width, _ = group_layout(shape, axis, group)
        columns += [
            (prefix, ".data", "uint8", (rows, packed_width(width, bits))),
            (prefix, ".scale", "float16", (rows,)),
            (prefix, ".zero", "float16", (rows,)),
        ]
    return _Layout(table, tuple(columns), layers)


def _tensors(
    packet: _Packet, layout: _Layout, limits: WireLimits
) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """Check the header's frame table against the canonical one ``layout`` implies; return the token table's
    tensors by name and, per column of the layout, its per-layer tensors: zero-copy views of the payload (a copy
    of it when the buffer's address is not aligned for the frame dtypes)."""
    table = _field(packet.header, "frames", list)
    if len(table) > limits.max_frames:
        raise LimitExceededError(f"{len(table)} frames exceed the limit of {limits.max_frames}")
    canonical = _canonical(layout)
    expected, column_offsets, span, end = canonical.entries, canonical.column_offsets, canonical.span, canonical.end
    # msgpack bytes compare values *and* types (1 vs True vs 1.0) in one C call, whatever the frame count
    if msgpack.packb(table) != canonical.packed:
        _explain_frame_mismatch(table, expected, len(packet.payload))
    payload = packet.payload
    if len(payload) != end:
        raise HeaderError(f"payload has {len(payload)} bytes; its frames end at {end}")
    with warnings.catch_warnings():  # read-only buffers: the tensors alias the packet
        warnings.simplefilter("ignore")
        whole = torch.frombuffer(payload, dtype=torch.uint8) if len(payload) else torch.empty(0, dtype=torch.uint8)
    if whole.data_ptr() % 8:  # offsets are multiples of 64: only the buffer's own address can be misaligned
        whole = whole.clone()  # fresh allocations are aligned
    typed: dict[torch.dtype, torch.Tensor] = {}
    named = {
        name: _view(whole, typed, DTYPES[dtype], (), shape, entry[3])
        for (name, dtype, shape), entry in zip(layout.table, expected)
    }
    if not layout.layers:
        return named, [()] * len(layout.columns)
    columns = [
        _view(whole, typed, DTYPES[dtype], (layout.layers,), shape, first, span).unbind(0)
        for (_, _, dtype, shape), first in zip(layout.columns, column_offsets, strict=True)
    ]
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


def _latent(packet: _Packet, limits: WireLimits, expect_fingerprint: str | None) -> LatentMessage:
    h = packet.header
    fingerprint = _field(h, "fingerprint", str)
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        raise ModelMismatchError(
            f"packet memory was made by model {fingerprint or '(unknown)'!r} but this receiver runs model "
            f"{expect_fingerprint!r}"
        )
    agents = _strings(h, "agents", limits.max_agents)
    named, columns = _tensors(packet, _layout(h, limits), limits)
    segment, agent = named["segment"], named["agent"]
    if segment.numel() and (int(segment.min()) < 0 or int(segment.max()) > max(Segment)):
        raise HeaderError("token table holds an unknown segment code")
    if agent.numel() and (int(agent.min()) < -1 or int(agent.max()) >= len(agents)):
        raise HeaderError(f"token table names an agent outside the {len(agents)} listed")
    table = {"segment": segment, "agent": agent, "position": named["position"]}
    try:
        if h["memory"] == "kv":
            keys, values = columns
            memory: Any = KVState(list(keys), list(values), **table, agents=agents, fingerprint=fingerprint)
        else:
            memory = _quantized(h, columns, table, agents, fingerprint)
    except (MemoryError_, ValueError) as e:
        raise HeaderError(f"memory does not fit its token table: {e}") from None
    metrics = _field(h, "metrics", dict, optional=True) or {}
    return LatentMessage(_field(h, "sender", str), memory, _field(h, "recipe", str), metrics)


def _quantized(h: dict, columns: list, table: dict[str, torch.Tensor], agents: list[str], fingerprint: str):
    """A QuantizedMemory from the six per-layer columns (key data / scale / zero, then the value's)."""
    from latent_relay.compression.quant import QuantizedMemory, QuantizedTensor

    shape = (h["batch"], h["kv_heads"], h["tokens"], h["head_dim"])
    quant = h.get("quant") or {}
    dtype = DTYPES[h["dtype"]]
    if not columns:  # no layers
        columns = [()] * 6

    def tensors(parts, axis: str, group: int | None) -> list[QuantizedTensor]:
        return [QuantizedTensor(*frames, quant["bits"], axis, shape, dtype, group) for frames in zip(*parts)]

    memory = QuantizedMemory(
        keys=tensors(columns[:3], "channel", quant.get("key_group")),
        values=tensors(columns[3:], "token", quant.get("value_group")),
        **table,
        agents=agents,
        fingerprint=fingerprint,
    )
    memory.validate()
    return memory


def _message(packet: _Packet, limits: WireLimits, expect_fingerprint: str | None):
    kind = _field(packet.header, "kind", str)
    if kind == "text":
        texts = _strings(packet.header, "texts", limits.max_texts)
        if packet.payload.nbytes or _field(packet.header, "frames", list):
            raise HeaderError("a text packet carries no frames")
        return TextMessage(_field(packet.header, "sender", str), texts)
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
    ``expect_fingerprint`` rejects working memory of another model.

    Tensors of the result are views of ``data`` (or of the decompressed payload) where alignment allows: do
    not mutate ``data`` while the message is in use. Every problem raises a :class:`PacketError`.
    """
    packet = _open(data, limits)
    return _message(packet, limits, expect_fingerprint)


# ------------------------------------------------------------------------------------------------ describe
def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def describe(data: bytes | bytearray | memoryview, *, limits: WireLimits = DEFAULT_LIMITS) -> str:
    """A packet's header in human terms (what ``relay inspect FILE`` prints). Verifies the packet first."""
    packet = _open(data, limits)
    message = _message(packet, limits, None)
    h = packet.header
    level = h.get("zstd_level")
    stored = "zstd" if packet.flags & FLAG_ZSTD else "raw"
    if level is not None and not packet.flags & FLAG_ZSTD:
        stored = f"raw (zstd level {level} did not shrink it)"
    elif level is not None:
        stored = f"zstd level {level}"
    lines = [
        f"latent-relay packet, format v{FORMAT_VERSION}: {_size(packet.total)} ({packet.total:,} bytes)",
        f"  kind       {h['kind']}",
        f"  sender     {h['sender']}",
        f"  payload    {stored}; header {_size(packet.header_len)}"
        + (f" + {_size(packet.header_pad)} padding (built in place)" if packet.header_pad else "")
        + f", payload {_size(packet.stored_len)} "
        f"stored / {_size(len(packet.payload))} raw, {len(h.get('frames', []))} frames",
    ]
    if isinstance(message, TextMessage):
        lines.append(f"  texts      {len(message.texts)} ({_size(message.nbytes)} of UTF-8)")
        return "\n".join(lines)
    memory = message.memory
    quant = h.get("quant")
    form = "full-precision KV"
    if h["memory"] == "quantized":
        form = f"int{quant['bits'] if quant else '?'} KIVI (keys per channel, values per token)"
        if quant and quant.get("key_group"):
            form += f", key groups of {quant['key_group']} tokens"
        if quant and quant.get("value_group"):
            form += f", value groups of {quant['value_group']} channels"
    seg = memory.segment.long()
    counts = ", ".join(f"{s.name.lower()} {int((seg == s).sum())}" for s in Segment)
    logical = 2 * h["layers"] * h["batch"] * h["kv_heads"] * h["tokens"] * h["head_dim"]
    logical *= DTYPES[h["dtype"]].itemsize
    lines += [
        f"  model      {h['fingerprint'] or '(no fingerprint)'}",
        f"  memory     {form}; dtype {h['dtype']}",
        f"  shape      {h['layers']} layers x {h['kv_heads']} KV heads x head dim {h['head_dim']}; batch "
        f"{h['batch']}, {h['tokens']} token slots" + (" (per-head positions)" if h["per_head_positions"] else ""),
        f"  tokens     {counts} (over the batch)",
        f"  agents     {', '.join(h['agents']) or '(none)'}",
        f"  recipe     {h['recipe'] or '(full relay)'}",
        f"  size       {_size(logical)} as {h['dtype']} K/V -> {_size(packet.total)} on the wire "
        f"({logical / max(packet.total, 1):.2f}x)",
    ]
    return "\n".join(lines)
