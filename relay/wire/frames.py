"""The frame spec: the tensors a working memory travels as, in wire order, and where each lies in the payload.

:func:`memory_frames` is the one place that lists them, from the memory's dimensions (:class:`MemoryDims`): the
token table (``segment`` int8, ``agent`` int16, ``position`` int64), then per layer ``i`` its key and value, ``k{i}``
and ``v{i}`` in the memory's dtype, or for a KIVI-quantized memory the parts
:func:`latent_relay.relay.quantized.packed_parts` describes: ``k{i}.data``, ``k{i}.scale``, ``k{i}.zero``, then the
value's. :func:`place` puts each frame at the next 64-byte boundary: the one layout encode writes, decode accepts and
a :class:`~latent_relay.relay.wire.arena.PacketArena` builds a memory in; :func:`payload_end` is where it ends, in
integers and without listing the frames (what a decoder holds a header to before it builds anything). A compression
step that builds a memory for a packet (``gather_selection``, :func:`latent_relay.relay.batch.split_items`) asks its
allocator for the frames of the memory it builds (:func:`allocate_frames`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from latent_relay.relay.memory import KVState, TensorAllocator
from latent_relay.relay.quantized import (
    KEY_AXIS,
    PACKED_FIELDS,
    VALUE_AXIS,
    QuantizedMemory,
    QuantizedTensor,
    packed_parts,
)
from latent_relay.relay.wire.format import DTYPE_NAMES, FLOAT_NAMES, align

TABLE_FRAMES = (("segment", torch.int8), ("agent", torch.int16), ("position", torch.int64))


@dataclass(frozen=True)
class QuantSpec:
    """How a quantized memory's keys and values are packed: bit width and group sizes (None: one group per line)."""

    bits: int
    key_group: int | None = None
    value_group: int | None = None


@dataclass(frozen=True)
class MemoryDims:
    """What fixes a memory's frames: its dimensions, key/value dtype, position form and, quantized, its packing
    (``quant`` is None only for a quantized memory without layers)."""

    layers: int
    batch: int
    heads: int
    tokens: int
    head_dim: int
    dtype: torch.dtype
    per_head_positions: bool = False
    quantized: bool = False
    quant: QuantSpec | None = None

    @classmethod
    def of(cls, memory: KVState | QuantizedMemory) -> MemoryDims:
        """The dimensions of a :class:`KVState` or :class:`QuantizedMemory` (whose layers must share one bit width
        and one group size per tensor kind)."""
        quantized = not isinstance(memory, KVState)
        quant = None
        if quantized:
            keys = {(q.bits, q.group_size) for q in memory.keys}
            values = {(q.bits, q.group_size) for q in memory.values}
            if len(keys) > 1 or len(values) > 1 or {b for b, _ in keys} != {b for b, _ in values}:
                raise ValueError("a quantized memory must use one bit width and one group size per tensor kind")
            if memory.keys:
                quant = QuantSpec(memory.keys[0].bits, memory.keys[0].group_size, memory.values[0].group_size)
        return cls(
            memory.num_layers,
            memory.batch_size,
            memory.num_kv_heads,
            memory.num_tokens,
            memory.head_dim,
            memory.dtype,
            memory.per_head_positions,
            quantized,
            quant,
        )


@dataclass(frozen=True)
class Frame:
    """One tensor of a memory on the wire: its name, dtype and shape, and where it sits in the memory: ``part``
    (``segment`` / ``agent`` / ``position`` / ``keys`` / ``values``), ``layer`` (-1 for the token table) and, for a
    quantized tensor, ``field`` (``data`` / ``scale`` / ``zero``)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    part: str
    layer: int = -1
    field: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def of(self, memory: KVState | QuantizedMemory) -> torch.Tensor:
        """This frame's tensor in ``memory``."""
        if self.layer < 0:
            return getattr(memory, self.part)
        tensor = getattr(memory, self.part)[self.layer]
        return getattr(tensor, self.field) if self.field else tensor


def _table_shapes(dims: MemoryDims) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The token table's frames ``(part, dtype, shape)``."""
    b, t = dims.batch, dims.tokens
    shapes = {"segment": (b, t), "agent": (b, t)}
    shapes["position"] = (dims.layers, b, dims.heads, t) if dims.per_head_positions else (b, t)
    return [(part, dtype, shapes[part]) for part, dtype in TABLE_FRAMES]


def _layer_columns(dims: MemoryDims) -> list[tuple[str, str, str, tuple[int, ...], torch.dtype]]:
    """One layer's frames ``(name prefix, part, field, shape, dtype)`` (every layer has the same)."""
    shape = (dims.batch, dims.heads, dims.tokens, dims.head_dim)
    if not dims.quantized:
        return [("k", "keys", "", shape, dims.dtype), ("v", "values", "", shape, dims.dtype)]
    if dims.quant is None:
        if dims.layers:
            raise ValueError("a quantized memory needs quantization parameters")
        return []
    q = dims.quant
    kinds = (("k", "keys", KEY_AXIS, q.key_group), ("v", "values", VALUE_AXIS, q.value_group))
    return [
        (prefix, part, name, part_shape, dtype)
        for prefix, part, axis, group in kinds
        for name, part_shape, dtype in packed_parts(shape, axis, group, q.bits)
    ]


@functools.lru_cache(maxsize=64)
def memory_frames(dims: MemoryDims) -> tuple[Frame, ...]:
    """The frames of a memory of dimensions ``dims``, in wire order (see the module docstring)."""
    frames = [Frame(part, dtype, shape, part) for part, dtype, shape in _table_shapes(dims)]
    columns = _layer_columns(dims)
    for i in range(dims.layers):
        frames += [
            Frame(f"{prefix}{i}" + (f".{name}" if name else ""), dtype, part_shape, part, i, name)
            for prefix, part, name, part_shape, dtype in columns
        ]
    return tuple(frames)


def payload_end(dims: MemoryDims) -> int:
    """The payload length of a memory of dimensions ``dims`` (where :func:`place` ends its last frame), in Python
    integers and without listing its frames, so that a decoder can hold any header to its limits first. Every frame
    starts at a 64-byte boundary, so it is the frames' sizes rounded up to 64 bytes, but the last one's as it is."""
    table = [math.prod(shape) * dtype.itemsize for _, dtype, shape in _table_shapes(dims)]
    layer = [math.prod(shape) * dtype.itemsize for *_, shape, dtype in _layer_columns(dims)]
    last = layer[-1] if dims.layers and layer else table[-1]
    return sum(map(align, table)) + dims.layers * sum(map(align, layer)) - align(last) + last


@dataclass(frozen=True)
class Placement:
    """Where frames lie in a payload, each at the next 64-byte boundary: the header's frame table ``entries``
    (``[name, dtype, shape, offset, size]``), its msgpack bytes (a decoder compares a header's table with them in one
    step), each frame's offset and the payload length."""

    entries: list[list]
    packed: bytes
    offsets: tuple[int, ...]
    end: int


def place(frames: Sequence[Frame]) -> Placement:
    """The canonical placement of ``frames`` (the one layout encode writes and decode accepts)."""
    entries, offsets, end = [], [], 0
    for frame in frames:
        start = align(end)
        size = frame.nbytes
        entries.append([frame.name, DTYPE_NAMES[frame.dtype], list(frame.shape), start, size])
        offsets.append(start)
        end = start + size
    return Placement(entries, msgpack.packb(entries), tuple(offsets), end)


@functools.lru_cache(maxsize=64)
def placement(dims: MemoryDims) -> Placement:
    """The placement of a memory's frames (built once per shape: hop after hop sends memories of one shape)."""
    return place(memory_frames(dims))


def frame_tensors(memory: KVState | QuantizedMemory, frames: Sequence[Frame]) -> list[torch.Tensor]:
    """``memory``'s tensor for each frame, the token table cast to the frame dtypes; raises ``ValueError`` where a
    tensor is not what its frame says (a memory whose layers differ cannot travel)."""
    tensors = []
    for frame in frames:
        tensor = frame.of(memory)
        if frame.layer < 0:
            tensor = tensor.to(frame.dtype)
        if tensor.dtype != frame.dtype or tensor.shape != frame.shape:
            raise ValueError(
                f"frame {frame.name}: the memory holds {tensor.dtype} {tuple(tensor.shape)}, its layout says "
                f"{frame.dtype} {frame.shape}"
            )
        tensors.append(tensor)
    return tensors


def uniform(memory: KVState) -> bool:
    """Every key and value tensor has layer 0's head dim and dtype: :func:`memory_frames` describes the memory."""
    dim, dtype = memory.head_dim, memory.dtype
    return all(t.shape[-1] == dim and t.dtype == dtype for t in (*memory.keys, *memory.values))


def allocate_frames(
    allocate: TensorAllocator | None, frames: Sequence[Frame], device: torch.device
) -> list[torch.Tensor | None]:
    """``allocate``'s tensors for ``frames`` (checked), or ``None`` per frame where there is no allocator or it
    declined."""
    shapes = [(frame.shape, frame.dtype) for frame in frames]
    made = allocate(shapes, device) if allocate is not None else None
    if made is None:
        return [None] * len(frames)
    made = list(made)
    if len(made) != len(shapes) or any(
        t.shape != shape or t.dtype != dtype or t.device != device or not t.is_contiguous()
        for t, (shape, dtype) in zip(made, shapes)
    ):
        raise ValueError("the tensor allocator returned tensors that do not match the shapes it was asked for")
    return made


def dims_of_shapes(shapes: Sequence[tuple[Sequence[int], torch.dtype]]) -> MemoryDims | None:
    """The full-precision memory whose frames have exactly these ``(shape, dtype)`` in wire order, or None."""
    if len(shapes) < 3 or len(shapes) % 2 == 0:
        return None
    table, position = tuple(shapes[0][0]), tuple(shapes[2][0])
    layers = (len(shapes) - 3) // 2
    key, dtype = (tuple(shapes[3][0]), shapes[3][1]) if layers else ((0, 0, 0, 0), torch.float32)
    if len(table) != 2 or len(key) != 4 or DTYPE_NAMES.get(dtype) not in FLOAT_NAMES:
        return None
    dims = MemoryDims(layers, table[0], key[1], table[1], key[3], dtype, len(position) == 4)
    expected = [(frame.shape, frame.dtype) for frame in memory_frames(dims)]
    return dims if expected == [(tuple(shape), dtype) for shape, dtype in shapes] else None


def build_memory(
    dims: MemoryDims,
    table: Mapping[str, torch.Tensor],
    columns: Mapping[tuple[str, str], Sequence[torch.Tensor]],
    agents: list[str],
    fingerprint: str,
) -> Any:
    """The memory of frame tensors: ``table`` by part, ``columns`` the per-layer tensors by ``(part, field)``;
    a :class:`KVState` or a validated :class:`QuantizedMemory`, as ``dims`` says."""
    if not dims.quantized:
        keys, values = list(columns.get(("keys", ""), ())), list(columns.get(("values", ""), ()))
        return KVState(keys, values, **table, agents=agents, fingerprint=fingerprint)
    shape = (dims.batch, dims.heads, dims.tokens, dims.head_dim)
    quant = dims.quant or QuantSpec(0)

    def tensors(part: str, axis: str, group: int | None) -> list[QuantizedTensor]:
        parts = [columns.get((part, name), ()) for name in PACKED_FIELDS]  # QuantizedTensor's first fields, in order
        return [QuantizedTensor(*stored, quant.bits, axis, shape, dims.dtype, group) for stored in zip(*parts)]

    memory = QuantizedMemory(
        keys=tensors("keys", KEY_AXIS, quant.key_group),
        values=tensors("values", VALUE_AXIS, quant.value_group),
        **table,
        agents=agents,
        fingerprint=fingerprint,
    )
    memory.validate()
    return memory
