"""Wire format (relay/wire/, issue 4): round trips, integrity, limits, hostile packets, the frame spec, describe()."""

from __future__ import annotations

import resource
import time
import types

import msgpack
import numpy as np
import pytest
import torch
import zstandard

from latent_relay.compression.quant import dequantize_memory, quantize_memory
from latent_relay.relay import wire
from latent_relay.relay.cli_inspect import describe
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.wire import (
    ChecksumError,
    HeaderError,
    LimitExceededError,
    ModelMismatchError,
    PacketError,
    TruncatedPacketError,
    UnsupportedVersionError,
    WireLimits,
    checksum,
    decode,
    encode,
    encoded_size,
)
from latent_relay.relay.wire.format import align
from latent_relay.relay.wire.frames import MemoryDims, frame_tensors, memory_frames
from tests.fuzz.packets import make_memory, seal, seed_packets, split


def _same_memory(a, b) -> None:
    for x, y in zip([*a.keys, *a.values], [*b.keys, *b.values]):
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    assert torch.equal(a.segment, b.segment) and torch.equal(a.agent, b.agent)
    assert torch.equal(a.position, b.position)
    assert a.agents == b.agents and a.fingerprint == b.fingerprint


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zstd_level", [None, 1, 3])
@pytest.mark.parametrize("per_head", [False, True])
def test_kv_round_trip_is_bit_exact(dtype, zstd_level, per_head):
    memory = make_memory(tokens=9, dim=8, layers=3, dtype=dtype, per_head=per_head)
    message = LatentMessage("planner", memory, "h:budget=4", {"retained": 0.5, "n": 3, "t": torch.tensor(1.0)})
    out = decode(encode(message, zstd_level=zstd_level), expect_fingerprint="model-a")
    assert isinstance(out, LatentMessage) and out.sender == "planner" and out.recipe == "h:budget=4"
    assert out.metrics == {"retained": 0.5, "n": 3, "t": 1.0}
    _same_memory(memory, out.memory)


def test_zstd_shrinks_compressible_payload_and_keeps_it_exact():
    memory = make_memory(tokens=64, dim=32, layers=2)
    for k in memory.keys:
        k.zero_()
    raw, packed = encode(LatentMessage("a", memory)), encode(LatentMessage("a", memory), zstd_level=3)
    assert len(packed) < len(raw) // 2
    _same_memory(memory, decode(packed).memory)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_round_trip(bits, dtype):
    memory = make_memory(tokens=11, dim=8, layers=2, dtype=dtype)
    q = quantize_memory(memory, bits, key_group_size=4)
    out = decode(encode(LatentMessage("planner", q, f"gen+int{bits}"), zstd_level=1)).memory
    assert type(out).__name__ == "QuantizedMemory" and out.nbytes == q.nbytes
    for a, b in zip([*q.keys, *q.values], [*out.keys, *out.values]):
        assert (a.bits, a.axis, a.shape, a.dtype, a.group_size) == (
            b.bits,
            b.axis,
            b.shape,
            b.dtype,
            b.group_size,
        )
        for name in ("data", "scale", "zero"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    restored, expected = dequantize_memory(out), dequantize_memory(q)
    for x, y, orig in zip(restored.keys, expected.keys, memory.keys):
        assert torch.equal(x, y)
        real = memory.valid[:, None, :, None].expand_as(orig)
        step = (orig.float().amax() - orig.float().amin()) / (2**bits - 1)
        assert float((x.float() - orig.float()).abs()[real].max()) <= float(step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoded_size_is_the_packet_length(dtype):
    memory = make_memory(tokens=9, dim=8, layers=3, dtype=dtype, per_head=True)
    for message in (
        TextMessage("critic", ["The answer is 42.", "ünïcödé ✓"]),
        LatentMessage("planner", memory, "h:budget=4", {"seconds": 0.5}),
        LatentMessage("planner", quantize_memory(memory, 4), "h:budget=4+int4"),
        LatentMessage("planner", make_memory(layers=0)),
    ):
        assert encoded_size(message) == len(encode(message))


def test_a_memory_without_layers_round_trips():
    memory = make_memory(layers=0)
    for packed in (memory, quantize_memory(memory, 8)):
        out = decode(encode(LatentMessage("a", packed))).memory
        assert out.num_layers == 0 and torch.equal(out.position, memory.position)


def test_text_round_trip():
    msg = TextMessage("critic", ["The answer is 42.", "", "ünïcödé ✓"])
    for level in (None, 5):
        assert decode(encode(msg, zstd_level=level)) == msg


@pytest.mark.parametrize("form", ["bytearray", "numpy"])
def test_decode_is_zero_copy_when_aligned(form):
    """Also from a read-only numpy view, the form in which the Ray runtime's packets leave the object store."""
    packet = encode(LatentMessage("a", make_memory(tokens=16, dim=16)))
    buf = bytearray(packet) if form == "bytearray" else np.frombuffer(packet, dtype=np.uint8)
    out = decode(buf)
    start = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    for t in (*out.memory.keys, *out.memory.values, out.memory.position):
        assert start <= t.data_ptr() < start + len(buf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_of_a_misaligned_buffer_copies_and_is_still_exact(dtype):
    memory = make_memory(tokens=16, dim=16, dtype=dtype)
    packet = encode(LatentMessage("a", memory))
    backing = bytearray(len(packet) + 1)
    backing[1:] = packet
    view = memoryview(backing)[1:]  # an odd address: no frame can be a view of it
    out = decode(view).memory
    for got, want in zip((*out.keys, *out.values), (*memory.keys, *memory.values), strict=True):
        assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(out.position, memory.position)


def test_every_single_bit_flip_is_rejected():
    # text (144 B), a tiny latent packet (~700 B) and one built in place (~1.1 KB, with header padding)
    for packet in (*seed_packets()[:2], seed_packets()[4]):
        buf = bytearray(packet)
        for i in range(len(buf) * 8):
            buf[i // 8] ^= 1 << (i % 8)
            with pytest.raises(PacketError):
                decode(buf)
            buf[i // 8] ^= 1 << (i % 8)
        decode(buf)  # restored


def test_payload_flip_is_a_checksum_error():
    packet = bytearray(encode(LatentMessage("a", make_memory())))
    packet[-40] ^= 0x10
    with pytest.raises(ChecksumError):
        decode(packet)


@pytest.mark.parametrize("chunk,step", [(500, checksum.HASH_STEP), (512, 64), (576, 192)])
def test_checksum_tree_over_chunks(monkeypatch, chunk, step):
    """The checksum is XXH3-128(header block + XXH3-128 of each DIGEST_CHUNK of the payload), the leaves hashed by
    the thread pool; chunk edges (and the edges of the steps in which the encoder copies and hashes) fall inside
    frames, the packet is the frames and their zero padding, and a flip in any chunk is caught."""
    import xxhash

    monkeypatch.setattr(checksum, "DIGEST_CHUNK", chunk)
    monkeypatch.setattr(checksum, "HASH_STEP", step)
    memory = make_memory()
    packet = encode(LatentMessage("a", memory))
    assert type(packet) is bytes
    header_len = wire.PREFIX.unpack_from(packet)[3]
    start = align(wire.PREFIX.size + header_len)
    payload = packet[start : -wire.DIGEST_SIZE]
    assert len(payload) > 3 * chunk
    frames = msgpack.unpackb(packet[wire.PREFIX.size : wire.PREFIX.size + header_len])
    expected, end = bytearray(), 0
    tensors = frame_tensors(memory, memory_frames(MemoryDims.of(memory)))
    for tensor, (_, _, _, offset, size) in zip(tensors, frames["frames"], strict=True):
        expected += bytes(offset - end) + tensor.contiguous().numpy().tobytes()
        end = offset + size
    assert payload == bytes(expected)
    ref = xxhash.xxh3_128(seed=wire.DIGEST_SEED)
    ref.update(packet[:start])
    for i in range(0, len(payload), chunk):
        ref.update(xxhash.xxh3_128(payload[i : i + chunk], seed=wire.DIGEST_SEED).digest())
    assert packet[-wire.DIGEST_SIZE :] == ref.digest()
    out = decode(packet).memory
    assert all(torch.equal(a, b) for a, b in zip(out.values, memory.values, strict=True))
    for at in (start + 10, start + 777, len(packet) - wire.DIGEST_SIZE - 1):
        bad = bytearray(packet)
        bad[at] ^= 0x01
        with pytest.raises(ChecksumError):
            decode(bad)


@pytest.mark.parametrize("leaves,runs", [(1, 1), (3, 1), (4, 2), (6, 3), (16, 4)])
def test_checksum_threads_get_at_least_two_leaves(monkeypatch, leaves, runs):
    """A payload is hashed in one run per LEAVES_PER_RUN leaves at most (one per CPU, at most four); the caller
    hashes the first run itself, and the digest does not depend on the split."""
    submitted = []

    class Pool:
        def submit(self, fn, lo, hi):
            submitted.append((lo, hi))
            fn(lo, hi)
            return types.SimpleNamespace(result=lambda: None)

    monkeypatch.setattr(checksum, "DIGEST_CHUNK", 64)
    payload = memoryview(bytes(range(256)) * (leaves // 4 + 1))[: leaves * 64]
    single = checksum.digest(b"head", payload)
    monkeypatch.setattr(checksum, "available_cpus", lambda: 8)
    monkeypatch.setattr(checksum, "hash_pool", Pool)
    assert checksum.digest(b"head", payload) == single
    assert len(submitted) == runs - 1
    assert all(hi - lo >= checksum.LEAVES_PER_RUN for lo, hi in submitted)


def test_message_fields_that_cannot_travel_are_refused_on_encode():
    with pytest.raises(TypeError, match="recipe"):
        encode(LatentMessage("a", make_memory(), recipe=None))


def test_other_model_is_rejected_naming_both():
    packet = encode(LatentMessage("a", make_memory(fingerprint="qwen2.5-0.5b@abc123")))
    with pytest.raises(ModelMismatchError) as err:
        decode(packet, expect_fingerprint="qwen3-4b@def456")
    assert "qwen2.5-0.5b@abc123" in str(err.value) and "qwen3-4b@def456" in str(err.value)


def test_truncated_packets_are_rejected():
    packet = seed_packets()[1]
    for n in range(len(packet)):
        with pytest.raises(PacketError):
            decode(packet[:n])
    with pytest.raises(TruncatedPacketError):
        decode(packet[: len(packet) // 2])
    with pytest.raises(HeaderError, match="unexpected bytes"):
        decode(packet + b"\0")


@pytest.mark.parametrize(
    "limits, match",
    [
        (WireLimits(max_layers=2), "layers"),
        (WireLimits(max_heads=1), "kv_heads"),
        (WireLimits(max_tokens=5), "tokens"),
        (WireLimits(max_batch=1), "batch"),
        (WireLimits(max_header_bytes=100), "header"),
        (WireLimits(max_decoded_bytes=1000), "decodes to"),
        (WireLimits(max_frames=8), "frames"),
    ],
)
def test_limits_are_enforced(limits, match):
    packet = encode(LatentMessage("a", make_memory(tokens=6, layers=3)))
    with pytest.raises(LimitExceededError, match=match):
        decode(packet, limits=limits)


def test_encode_refuses_what_decode_would_refuse():
    with pytest.raises(LimitExceededError):
        encode(LatentMessage("a", make_memory()), limits=WireLimits(max_decoded_bytes=64))


def _low_rss_growth(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def test_zstd_bomb_is_refused_before_inflating():
    giant = 4 << 30  # 4 GiB of zeros in a ~130 KB zstd frame
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=giant)
    zeros = bytes(64 << 20)
    bomb = b"".join([*(cobj.compress(zeros) for _ in range(giant // len(zeros))), cobj.flush()])
    header, _, _, _ = split(encode(LatentMessage("a", make_memory())))
    limits = WireLimits(max_decoded_bytes=256 << 20)

    def attempts():
        # honest sizes over the limit
        with pytest.raises(LimitExceededError):
            decode(seal(header, bomb, raw_len=giant, flags=wire.FLAG_ZSTD), limits=limits)
        # the prefix lies about the raw size: the frame's own content size gives it away
        with pytest.raises(HeaderError, match="declares"):
            decode(seal(header, bomb, raw_len=4096, flags=wire.FLAG_ZSTD), limits=limits)
        # a frame that hides its content size
        hidden = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(1 << 20))
        with pytest.raises(HeaderError):
            decode(seal(header, hidden, raw_len=4096, flags=wire.FLAG_ZSTD), limits=limits)

    start = time.perf_counter()
    assert _low_rss_growth(attempts) < 64 << 20
    assert time.perf_counter() - start < 5


def test_unsupported_version_and_flags():
    header, stored, raw_len, flags = split(seed_packets()[1])
    with pytest.raises(UnsupportedVersionError, match=f"version {wire.FORMAT_VERSION + 1}"):
        decode(seal(header, stored, raw_len, flags, version=wire.FORMAT_VERSION + 1))
    with pytest.raises(HeaderError, match="flags"):
        decode(seal(header, stored, raw_len, flags=4))


def test_header_padding_is_bounded_aligned_and_zero():
    header, stored, raw_len, flags = split(seed_packets()[1])
    assert decode(seal(header, stored, raw_len, flags, header_pad=128)).sender == "planner"
    for pad in (1, 100, wire.DEFAULT_LIMITS.max_header_bytes + 64):
        with pytest.raises(HeaderError, match="header padding"):
            decode(seal(header, stored, raw_len, flags, header_pad=pad, padding=bytes(pad % 4096)))
    with pytest.raises(HeaderError, match="non-zero header padding"):
        decode(seal(header, stored, raw_len, flags, header_pad=64, padding=bytes(63) + b"\x01"))


def _forged(edit) -> bytes:
    header, stored, raw_len, flags = split(seed_packets()[1])
    edit(header)
    return seal(header, stored, raw_len, flags)


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.pop("kind"),
        lambda h: h.update(kind="pickle"),
        lambda h: h.update(layers="1"),
        lambda h: h.update(layers=True),
        lambda h: h.update(layers=-1),
        lambda h: h.update(tokens=4),
        lambda h: h.update(dtype="float64"),
        lambda h: h.update(memory="raw"),
        lambda h: h.update(agents=[1]),
        lambda h: h.update(fingerprint=None),
        lambda h: h["frames"][3].__setitem__(3, 1),
        lambda h: h["frames"][3].__setitem__(3, h["frames"][3][3] + 64),  # a gap: not the canonical layout
        lambda h: h["frames"][0].__setitem__(3, False),  # 0 as a bool
        lambda h: h["frames"][0].__setitem__(4, float(h["frames"][0][4])),
        lambda h: h["frames"][3].__setitem__(4, 2**63),
        lambda h: h["frames"][0].__setitem__(1, "float32"),
        lambda h: h["frames"].pop(),
        lambda h: h.update(per_head_positions=1),
    ],
)
def test_forged_headers_are_header_errors(edit):
    with pytest.raises(HeaderError):
        decode(_forged(edit))


def test_header_must_be_a_strict_msgpack_map():
    for head in (
        msgpack.packb([1, 2, 3]),
        msgpack.packb({1: "int key"}),
        msgpack.packb(msgpack.ExtType(1, b"code")),
        msgpack.packb({"kind": b"bytes"}, use_bin_type=True),
        b"\xc1",  # never-used msgpack byte
        msgpack.packb({"kind": "text"}) + b"\x00",  # trailing data
    ):
        with pytest.raises(HeaderError):
            decode(seal(head))


def test_token_table_contents_are_checked():
    header, stored, raw_len, flags = split(seed_packets()[1])
    payload = bytearray(stored)
    payload[0] = 9  # first segment code
    with pytest.raises(HeaderError, match="segment"):
        decode(seal(header, bytes(payload), raw_len, flags))


def test_not_bytes_and_garbage():
    for junk in (b"", b"LRLY", b"hello world" * 5, bytes(100), 42):
        with pytest.raises(PacketError):
            decode(junk)


def test_describe_names_the_essentials():
    memory = make_memory(tokens=8, layers=2, fingerprint="qwen2.5-0.5b@abc")
    text = describe(
        encode(LatentMessage("planner", quantize_memory(memory, 4), "h-obf:budget=32,rank=2+int4"), zstd_level=3)
    )
    for needle in ("latent", "planner", "qwen2.5-0.5b@abc", "int4", "2 layers", "prompt", "sink", "pad",
                   "h-obf:budget=32,rank=2+int4", "x)", "float32"):  # fmt: skip
        assert needle in text, needle
    assert "texts      2" in describe(encode(TextMessage("critic", ["a", "b"])))
    with pytest.raises(ChecksumError):
        describe(bytes(seed_packets()[1][:-1]) + b"\0")


def _table_of(frames) -> list[list]:
    return [[f.name, wire.DTYPE_NAMES[f.dtype], list(f.shape)] for f in frames]
