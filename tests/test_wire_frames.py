"""The wire's frames (relay/wire/): one frame spec for gather, arena, encode and decode; packets built in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latent_relay.compression.quant import quantize_memory
from latent_relay.compression.selectors import current_agent_index, gather_selection, prompt_mask, select_headwise
from latent_relay.relay import wire
from latent_relay.relay.batch import split_items
from latent_relay.relay.cli_inspect import describe
from latent_relay.relay.memory import IncompatibleMemoryError
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.wire import (
    HeaderError,
    ModelMismatchError,
    PacketError,
    decode,
    encode,
    encoded_size,
)
from latent_relay.relay.wire.frames import MemoryDims, memory_frames
from tests.fuzz.packets import built_in_arena, make_memory, memory_tensors, seed_packets, split
from tests.test_wire import _same_memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_head", [False, True])
def test_packet_built_in_place_round_trips(dtype, per_head):
    """A memory built inside a PacketArena becomes the packet itself: the frames are not copied, the packet
    decodes to the same memory, and it differs from a copied packet only by the header padding it declares."""
    memory = make_memory(tokens=9, dim=8, layers=3, dtype=dtype, per_head=per_head)
    arena, built = built_in_arena(memory, min_bytes=0)
    message = LatentMessage("planner", built, "h:budget=4", {"seconds": 0.5})
    packet = encode(message, into=arena)
    assert isinstance(packet, bytearray) and packet is arena.buffer and arena.finished
    start = np.frombuffer(packet, dtype=np.uint8).ctypes.data
    assert all(start <= t.data_ptr() < start + len(packet) for t in memory_tensors(built))
    out = decode(packet, expect_fingerprint="model-a")
    _same_memory(memory, out.memory)
    assert out.metrics == {"seconds": 0.5}
    copied = encode(message)
    pad = wire.PREFIX.unpack_from(packet)[4]
    assert pad % wire.ALIGN == 0 and 0 < pad <= arena.head_room + wire.ALIGN
    assert len(packet) == len(copied) + pad
    assert "padding" in describe(packet) and "padding" not in describe(copied)


def test_a_packet_arena_falls_back_to_copying_when_it_cannot_finish_in_place():
    memory = make_memory(tokens=9, dim=8, layers=2)
    message = LatentMessage("planner", memory, "h:budget=4")
    arena, built = built_in_arena(memory, min_bytes=0)
    # a memory that is not in the arena, and zstd: copied as without the arena, which stays unused
    assert encode(message, into=arena) == encode(message) and not arena.finished
    in_arena = LatentMessage("planner", built, "h:budget=4")
    assert encode(in_arena, into=arena, zstd_level=1) == encode(in_arena, zstd_level=1) and not arena.finished
    first = encode(in_arena, into=arena)
    assert first is arena.buffer
    again = encode(in_arena, into=arena)  # an arena makes one packet: the second one is copied
    assert isinstance(again, bytes) and again == encode(in_arena)
    _same_memory(memory, decode(again).memory)
    # a header that outgrows the room the arena kept for it
    arena, built = built_in_arena(memory, min_bytes=0, head_room=0)
    long = LatentMessage("x" * 500, built, "h:budget=4")
    packet = encode(long, into=arena)
    assert isinstance(packet, bytes) and not arena.finished and decode(packet).sender == "x" * 500
    # below min_bytes, off the CPU or a dtype that cannot travel, the arena declines; it is filled once
    shapes = [(tuple(t.shape), t.dtype) for t in memory_tensors(memory)]
    assert wire.PacketArena(min_bytes=1 << 20).allocate(shapes, torch.device("cpu")) is None
    assert wire.PacketArena(min_bytes=0).allocate(shapes, torch.device("meta")) is None
    assert wire.PacketArena(min_bytes=0).allocate([*shapes[:3], ((2, 2), torch.float64)] * 1, "cpu") is None
    with pytest.raises(RuntimeError, match="one packet"):
        arena.allocate(shapes, torch.device("cpu"))
    with pytest.raises(ValueError):
        wire.PacketArena(head_room=-1)


@pytest.mark.parametrize("per_head", [False, True])
def test_one_frame_spec_for_gather_arena_encode_and_decode(per_head):
    """The frame spec lists a memory's tensors in the order written out by hand here (and in
    tests.fuzz.packets.memory_tensors); gather_selection asks its allocator for exactly those frames, the arena builds
    them where encode places them (so the packet is finished in place), and the header lists them."""
    memory = make_memory(batch=2, heads=2, tokens=9, dim=8, layers=3, per_head=per_head)
    spec = memory_frames(MemoryDims.of(memory))
    assert [f.name for f in spec] == ["segment", "agent", "position", "k0", "v0", "k1", "v1", "k2", "v2"]
    assert all(f.of(memory) is t for f, t in zip(spec, memory_tensors(memory), strict=True))
    assert [(f.shape, f.dtype) for f in spec] == [(tuple(t.shape), t.dtype) for t in memory_tensors(memory)]

    prompt = prompt_mask(memory, current_agent_index(memory, None))
    selection = select_headwise(torch.rand(3, 2, 2, 9, generator=torch.Generator().manual_seed(0)), prompt, 3)
    asked = []
    arena = wire.PacketArena(min_bytes=0)

    def allocate(shapes, device):
        asked.extend((tuple(shape), dtype) for shape, dtype in shapes)
        return arena.allocate(shapes, device)

    gathered = gather_selection(memory, selection, allocate).memory
    frames = memory_frames(MemoryDims.of(gathered))
    assert (
        asked == [(f.shape, f.dtype) for f in frames] == [(tuple(t.shape), t.dtype) for t in memory_tensors(gathered)]
    )
    packet = encode(LatentMessage("planner", gathered, "h:budget=3"), into=arena)
    assert packet is arena.buffer
    header, _, _, _ = split(bytes(packet))
    assert [entry[:3] for entry in header["frames"]] == [
        [f.name, wire.DTYPE_NAMES[f.dtype], list(f.shape)] for f in frames
    ]
    _same_memory(gathered, decode(packet).memory)


def test_the_quantized_frames_are_the_packed_parts_in_wire_order():
    q = quantize_memory(make_memory(tokens=11, dim=8, layers=2), 4, key_group_size=4)
    spec = memory_frames(MemoryDims.of(q))
    by_hand = [q.segment, q.agent, q.position]
    for k, v in zip(q.keys, q.values):
        by_hand += [k.data, k.scale, k.zero, v.data, v.scale, v.zero]
    assert [f.name for f in spec][3:9] == ["k0.data", "k0.scale", "k0.zero", "v0.data", "v0.scale", "v0.zero"]
    assert all(f.of(q) is t for f, t in zip(spec, by_hand, strict=True))
    assert [(f.shape, f.dtype) for f in spec] == [(tuple(t.shape), t.dtype) for t in by_hand]
    header, _, _, _ = split(encode(LatentMessage("planner", q, "gen+int4")))
    assert [entry[:3] for entry in header["frames"]] == [
        [f.name, wire.DTYPE_NAMES[f.dtype], list(f.shape)] for f in spec
    ]


def test_packet_size_is_the_length_without_header_padding():
    memory = make_memory(tokens=9, dim=8, layers=3)
    arena, built = built_in_arena(memory, min_bytes=0)
    message = LatentMessage("planner", built, "h:budget=4")
    in_place = encode(message, into=arena)
    copied = encode(message)
    assert len(in_place) > len(copied)
    assert wire.packet_size(in_place) == wire.packet_size(copied) == len(copied) == encoded_size(message)
    text = TextMessage("critic", ["a"])
    assert wire.packet_size(encode(text)) == encoded_size(text)
    with pytest.raises(HeaderError):
        wire.packet_size(b"not a packet at all, but long enough")


def test_open_packet_reports_the_prefix_and_a_model_mismatch_is_both_error_kinds():
    packet = seed_packets()[4]  # built in place: with header padding
    opened = wire.open_packet(packet)
    assert opened.total == len(packet) and opened.header_pad > 0 and opened.header["kind"] == "latent"
    assert wire.decode_packet(opened).sender == decode(packet).sender
    other = encode(LatentMessage("a", make_memory(fingerprint="model-b")))
    with pytest.raises(IncompatibleMemoryError, match="model-b"):
        decode(other, expect_fingerprint="model-a")
    assert issubclass(ModelMismatchError, PacketError)


@pytest.mark.parametrize("per_head", [False, True])
def test_an_item_split_from_a_batch_is_built_in_its_packet(per_head):
    memory = make_memory(batch=2, tokens=9, dim=8, layers=3, per_head=per_head)  # item 0 has a PAD slot
    arena = wire.PacketArena(min_bytes=0)
    item = split_items(memory, [arena.allocate, None])[0]
    packet = encode(LatentMessage("planner", item, "h:budget=4"), into=arena)
    assert packet is arena.buffer and arena.finished
    _same_memory(split_items(memory)[0], decode(packet).memory)
