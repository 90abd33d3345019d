"""The buffer of one future packet, for a sender to build a memory in before it is encoded (zero-copy encode)."""

from __future__ import annotations

import ctypes

import msgpack
import torch

from latent_relay.relay.wire.checksum import DIGEST_SIZE, digest
from latent_relay.relay.wire.encode import build_head
from latent_relay.relay.wire.format import PREFIX, WireLimits, align
from latent_relay.relay.wire.frames import Placement, dims_of_shapes, placement

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
        self._placement: Placement | None = None
        self._head_size = self._payload_at = 0

    def allocate(self, shapes, device) -> list[torch.Tensor] | None:
        """Views of the payload for a full-precision memory's tensors ``[(shape, dtype), ...]`` in wire order (the
        frame spec, :func:`latent_relay.relay.wire.frames.memory_frames`), or ``None`` where the arena does not take
        this memory."""
        if self.buffer is not None:
            raise RuntimeError("a PacketArena holds one packet: make a new one for the next memory")
        shapes = list(shapes)
        dims = dims_of_shapes(shapes) if torch.device(device).type == "cpu" else None
        if dims is None:
            return None
        placed = placement(dims)
        if placed.end < self.min_bytes:
            return None
        self._head_size = align(PREFIX.size + len(msgpack.packb(placed.entries, use_bin_type=True)) + self.head_room)
        self.buffer = _new_bytearray(None, self._head_size + placed.end + DIGEST_SIZE)  # uninitialised
        self._placement = placed
        payload = torch.frombuffer(self.buffer, dtype=torch.uint8)[self._head_size : self._head_size + placed.end]
        self._payload_at = payload.data_ptr()
        return [
            payload[offset : offset + size].view(dtype).view(shape) if size else torch.empty(shape, dtype=dtype)
            for (shape, dtype), (_, _, _, offset, size) in zip(shapes, placed.entries)
        ]

    def finish(
        self, header: dict, tensors: list[torch.Tensor], placed: Placement, limits: WireLimits
    ) -> bytearray | None:
        """The packet of a message whose frames all lie in place in this arena (header, gaps and checksum written
        around them), or ``None`` (then :func:`encode` builds the packet by copying)."""
        if self.buffer is None or self.finished or (placed is not self._placement and placed != self._placement):
            return None
        for tensor, (_, _, _, offset, size) in zip(tensors, placed.entries):
            at = self._payload_at + offset
            if size and not (tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.data_ptr() == at):
                return None
        raw_len = placed.end
        with memoryview(self.buffer) as view:
            head = build_head(header, 0, raw_len, raw_len, limits, size=self._head_size)
            if not head:
                return None
            view[: self._head_size] = head
            end = self._head_size
            for _, _, _, offset, size in placed.entries:  # the zero bytes between frames
                view[end : self._head_size + offset] = bytes(self._head_size + offset - end)
                end = self._head_size + offset + size
            stored = view[self._head_size : self._head_size + raw_len]
            view[end:] = digest(view[: self._head_size], stored)
            stored.release()
        self.finished = True
        return self.buffer
