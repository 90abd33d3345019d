"""Small memories and packets for the wire tests and fuzzers, and ``seal`` to forge checksummed packets."""

from __future__ import annotations

import msgpack
import torch

from latent_relay.compression.quant import quantize_memory
from latent_relay.relay import wire
from latent_relay.relay.memory import KVState, Segment
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.wire.checksum import digest
from latent_relay.relay.wire.format import align


def make_memory(
    batch: int = 2,
    heads: int = 2,
    tokens: int = 6,
    dim: int = 4,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    per_head: bool = False,
    fingerprint: str = "model-a",
    seed: int = 0,
) -> KVState:
    g = torch.Generator().manual_seed(seed)

    def rnd() -> torch.Tensor:
        return torch.randn(batch, heads, tokens, dim, generator=g).to(dtype)

    segment = torch.full((batch, tokens), int(Segment.PROMPT), dtype=torch.int8)
    if tokens:
        segment[:, 0] = Segment.SINK
        segment[:, -1] = Segment.THOUGHT
        segment[0, 1:2] = Segment.PAD
    agent = torch.zeros(batch, tokens, dtype=torch.int16)
    agent[segment == Segment.PAD] = -1
    position = torch.arange(tokens).expand(batch, tokens).clone()
    if per_head:
        position = position[None, :, None, :].expand(layers, batch, heads, tokens).clone()
    return KVState(
        keys=[rnd() for _ in range(layers)],
        values=[rnd() for _ in range(layers)],
        segment=segment,
        agent=agent,
        position=position,
        agents=["planner"],
        fingerprint=fingerprint,
    )


def memory_tensors(memory: KVState) -> list[torch.Tensor]:
    """A memory's tensors in the order a :data:`latent_relay.relay.memory.TensorAllocator` is asked for them (written
    out here, not taken from the frame spec, so that tests hold the spec to it)."""
    return [memory.segment, memory.agent, memory.position, *(t for kv in zip(memory.keys, memory.values) for t in kv)]


def built_in_arena(memory: KVState, **arena_options) -> tuple[wire.PacketArena, KVState]:
    """``memory`` rebuilt inside a :class:`latent_relay.relay.wire.PacketArena`, as compression builds it for a
    sender."""
    arena = wire.PacketArena(**arena_options)
    sources = memory_tensors(memory)
    made = arena.allocate([(tuple(t.shape), t.dtype) for t in sources], torch.device("cpu"))
    assert made is not None, "the arena declined the memory"
    for target, source in zip(made, sources, strict=True):
        target.copy_(source)
    built = KVState(
        keys=list(made[3::2]),
        values=list(made[4::2]),
        segment=made[0],
        agent=made[1],
        position=made[2],
        agents=list(memory.agents),
        fingerprint=memory.fingerprint,
    )
    return arena, built


def seed_packets() -> list[bytes]:
    """A few small valid packets of every kind (a few hundred bytes to a few KB each): text, full-precision (one
    built in place, with header padding) and quantized ones of several layers (int8 / int4 / int2, with and
    without groups, per-head positions, zstd). The first five are the original seeds, in their order."""
    tiny = make_memory(batch=1, heads=1, tokens=3, dim=2, layers=1)
    small = make_memory(batch=1, heads=1, tokens=4, dim=2, layers=2)
    arena, in_arena = built_in_arena(small, head_room=512, min_bytes=0)
    deep = make_memory(batch=2, heads=2, tokens=7, dim=8, layers=3, dtype=torch.bfloat16, per_head=True, seed=1)
    wide = make_memory(batch=1, heads=2, tokens=9, dim=16, layers=2, dtype=torch.float16, seed=2)
    return [
        wire.encode(TextMessage("critic", ["x = 3", "ok"])),
        wire.encode(LatentMessage("planner", tiny, "h:budget=2")),
        wire.encode(LatentMessage("planner", make_memory(layers=1, dtype=torch.float16), ""), zstd_level=1),
        wire.encode(LatentMessage("planner", quantize_memory(tiny, 4), "gen+int4")),
        bytes(wire.encode(LatentMessage("planner", in_arena, "gen"), into=arena)),
        wire.encode(LatentMessage("planner", quantize_memory(deep, 8), "gen+int8")),
        wire.encode(LatentMessage("planner", quantize_memory(deep, 2, key_group_size=4, value_group_size=4), "q2")),
        wire.encode(LatentMessage("planner", quantize_memory(wide, 4, key_group_size=2, value_group_size=8), "q4")),
        wire.encode(LatentMessage("planner", quantize_memory(deep, 4, key_group_size=32), "q4"), zstd_level=3),
    ]


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_BLOCK = 128 << 10  # the largest block a zstd frame may hold


def zstd_rle_frame(declared: int, blocks: int | None = None, byte: int = 0) -> bytes:
    """A zstd frame that declares ``declared`` content bytes, built by hand from RLE blocks (4 bytes for each 128 KiB
    of ``byte``): all of them (``blocks`` None: a ~32,000:1 bomb; 16 GiB in 512 KB) or only the first ``blocks``
    (a truncated frame, which still makes a decoder that trusts its header allocate ``declared`` bytes)."""
    # frame header: an 8-byte content size, a 128 KiB window (so that zstd inflates any size, as it would a real one)
    head = ZSTD_MAGIC + bytes([0xC0, (17 - 10) << 3]) + declared.to_bytes(8, "little")
    size = min(ZSTD_BLOCK, declared)
    n = -(-declared // ZSTD_BLOCK) if blocks is None else blocks
    if not n:
        return head + (1).to_bytes(3, "little")  # one empty, last raw block

    def block(size: int, last: bool) -> bytes:
        return (int(last) | 1 << 1 | size << 3).to_bytes(3, "little") + bytes([byte])

    if blocks is not None:
        return head + block(size, False) * n
    tail = declared - (n - 1) * ZSTD_BLOCK
    return head + block(size, False) * (n - 1) + block(tail, True)


def split(packet: bytes) -> tuple[dict, bytes, int, int]:
    """``(header, stored payload, raw length, flags)`` of a valid packet."""
    _, _, flags, hlen, pad, slen, rlen = wire.PREFIX.unpack_from(packet)
    off = align(wire.PREFIX.size + hlen) + pad
    header = msgpack.unpackb(packet[wire.PREFIX.size : wire.PREFIX.size + hlen], raw=False)
    return header, packet[off : off + slen], rlen, flags


def seal(
    header: object | bytes,
    stored: bytes = b"",
    raw_len: int | None = None,
    flags: int = 0,
    version: int = wire.FORMAT_VERSION,
    header_pad: int = 0,
    padding: bytes | None = None,
) -> bytes:
    """A packet with a *valid* checksum around arbitrary header / payload bytes (to reach the parser). The prefix
    declares ``header_pad`` bytes of header padding; ``padding`` (default: that many zero bytes) follows the
    header's alignment."""
    head_bytes = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    raw_len = len(stored) if raw_len is None else raw_len
    prefix = wire.PREFIX.pack(wire.MAGIC, version, flags, len(head_bytes), header_pad, len(stored), raw_len)
    head = prefix + head_bytes
    head += bytes(align(len(head)) - len(head)) + (bytes(header_pad) if padding is None else padding)
    return head + stored + digest(head, memoryview(stored))
