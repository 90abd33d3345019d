"""Crafted, re-sealed packets (issue 17; the checksum is not a signature): products of header fields, huge group
sizes, payload lengths that disagree with the header, zstd bombs; each is a PacketError from decode,
from describe and from ``relay inspect`` (one line, exit 2), found before anything large is allocated. The default
decoded-size limit is what the host can hold, and the packets of valid messages are what they were."""

from __future__ import annotations

import hashlib
import itertools
import os
import tracemalloc

import pytest
import torch

from latent_relay.relay import wire
from latent_relay.relay.cli import main
from latent_relay.relay.cli_inspect import describe
from latent_relay.relay.memory import KVState, Segment
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.quantized import QuantizedMemory, QuantizedTensor, packed_parts
from latent_relay.relay.wire import HeaderError, LimitExceededError, PacketError, WireLimits, decode
from latent_relay.relay.wire import format as wire_format
from latent_relay.relay.wire.frames import MemoryDims, QuantSpec, payload_end, placement
from tests.fuzz.packets import seal, seed_packets, split, zstd_rle_frame

SEEDS = seed_packets()
TEXT, KV, QUANTIZED = SEEDS[0], SEEDS[1], SEEDS[3]  # text; kv float32 1 layer; int4 1 layer
AT_LIMITS = {"layers": 1024, "kv_heads": 1024, "head_dim": 4096, "batch": 4096, "tokens": 1 << 20}


def _forged(packet: bytes, **fields) -> bytes:
    """``packet`` with header fields replaced (``quant_<key>`` edits the quant map), re-sealed."""
    header, stored, raw_len, flags = split(packet)
    for key, value in fields.items():
        if key.startswith("quant_"):
            header["quant"][key.removeprefix("quant_")] = value
        else:
            header[key] = value
    return seal(header, stored, raw_len, flags)


def _refused_everywhere(packet: bytes, error: type[PacketError], match: str, tmp_path, capsys) -> str:
    """Assert that decode, describe and ``relay inspect`` refuse ``packet`` with ``error``; the CLI's one line."""
    with pytest.raises(error, match=match):
        decode(packet)
    with pytest.raises(error, match=match):
        describe(packet)
    path = tmp_path / "crafted.pkt"
    path.write_bytes(packet)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("group", [2**64 - 1, 2**63, 2**62, (1 << 20) + 1])
@pytest.mark.parametrize("which", ["quant_key_group", "quant_value_group"])
def test_a_huge_quantization_group_is_a_limit_error_from_decode_describe_and_inspect(group, which, tmp_path, capsys):
    err = _refused_everywhere(_forged(QUANTIZED, **{which: group}), LimitExceededError, "group", tmp_path, capsys)
    assert "Traceback" not in err and "Overflow" not in err


@pytest.mark.parametrize(
    "fields",
    [
        AT_LIMITS,  # every dimension within its own limit, their product some 2**75 bytes
        {**AT_LIMITS, "per_head_positions": True},
        {"layers": 1, "kv_heads": 1024, "head_dim": 1, "batch": 4096, "tokens": 1 << 20},  # 2**44: fits msgpack
        {"layers": 0, "batch": 4096, "tokens": 1 << 20, "per_head_positions": False},  # the token table alone: 44 GB
    ],
)
def test_products_of_header_fields_over_the_limit_are_limit_errors(fields, tmp_path, capsys):
    _refused_everywhere(_forged(KV, **fields), LimitExceededError, "over the limit", tmp_path, capsys)


def test_rows_times_width_of_a_quantized_frame_is_held_to_the_limit(tmp_path, capsys):
    """A group within its limit, but rows x packed width (keys: batch x heads x head dim rows) far over it."""
    packet = _forged(QUANTIZED, batch=4096, kv_heads=1024, head_dim=4096, quant_key_group=1 << 20)
    _refused_everywhere(packet, LimitExceededError, "over the limit", tmp_path, capsys)


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("packet", [TEXT, KV, QUANTIZED], ids=["text", "kv", "quantized"])
@pytest.mark.parametrize("declared, blocks", [(64 << 20, None), (1 << 30, 1)], ids=["bomb", "truncated"])
def test_a_small_packet_declaring_a_huge_raw_length_is_refused_before_inflating(packet, declared, blocks):
    """A 2 KB zstd frame of 64 MiB (or a truncated one declaring 1 GiB) behind a header that implies a few hundred
    bytes: refused from the sizes alone, without allocating the declared bytes."""
    header, _, _, _ = split(packet)
    bomb = seal(header, zstd_rle_frame(declared, blocks), raw_len=declared, flags=wire.FLAG_ZSTD)
    assert len(bomb) < 4 << 10

    def attempt():
        with pytest.raises(HeaderError, match="declares"):
            decode(bomb)

    assert _traced_peak(attempt) < 1 << 20


def test_a_bomb_that_agrees_with_its_header_is_refused_by_the_host_limit():
    """Dimensions that honestly imply more than the default limit (a quarter of this host's memory, up to 16 GiB),
    a frame declaring as much: refused before inflating, whatever the frame holds."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = min(16 << 30, max(256 << 20, memory // 4))  # the rule, worked out here
    assert wire.DEFAULT_LIMITS.max_decoded_bytes == limit
    heads = limit // (2 << 30) + 1  # 2 GiB of float32 keys and values per head
    header, _, _, _ = split(KV)
    header.update(layers=1, batch=1, kv_heads=heads, tokens=1 << 18, head_dim=1024, per_head_positions=False)
    dims = MemoryDims(1, 1, heads, 1 << 18, 1024, torch.float32)
    implied = payload_end(dims)
    assert implied > limit
    bomb = seal(header, zstd_rle_frame(implied, blocks=2), raw_len=implied, flags=wire.FLAG_ZSTD)
    assert len(bomb) < 4 << 10

    def attempt():
        with pytest.raises(LimitExceededError, match="over the limit"):
            decode(bomb)

    assert _traced_peak(attempt) < 1 << 20


def test_the_decoded_size_limit_defaults_to_what_the_host_can_hold(monkeypatch):
    monkeypatch.delenv(wire_format.MAX_DECODED_ENV, raising=False)
    host = wire_format.host_memory_bytes()
    assert WireLimits().max_decoded_bytes == (min(16 << 30, max(256 << 20, host // 4)) if host else 4 << 30)
    for memory, expected in ((8 << 30, 2 << 30), (1 << 40, 16 << 30), (512 << 20, 256 << 20), (0, 4 << 30)):
        monkeypatch.setattr(wire_format, "host_memory_bytes", lambda memory=memory: memory)
        assert wire_format.default_max_decoded_bytes() == expected
        assert WireLimits().max_decoded_bytes == expected
    monkeypatch.setenv(wire_format.MAX_DECODED_ENV, str(40 << 30))
    assert WireLimits().max_decoded_bytes == 40 << 30
    monkeypatch.setenv(wire_format.MAX_DECODED_ENV, "lots")
    with pytest.warns(UserWarning, match=wire_format.MAX_DECODED_ENV):
        assert WireLimits().max_decoded_bytes == 4 << 30


def test_the_payload_length_in_integers_is_the_placements_end():
    for layers, batch, heads, tokens, dim, dtype, per_head, quant in itertools.product(
        [0, 1, 3],
        [1, 2],
        [1, 3],
        [0, 1, 5, 33],
        [1, 8],
        [torch.float32, torch.bfloat16],
        [False, True],
        [None, QuantSpec(8), QuantSpec(4, 2, 3), QuantSpec(2, 64, None)],
    ):
        dims = MemoryDims(layers, batch, heads, tokens, dim, dtype, per_head, quant is not None, quant)
        assert payload_end(dims) == placement(dims).end, dims


def _deterministic_messages() -> list:
    """Messages whose tensors are arithmetic (no random generator, no quantization kernel): their packets are the
    same bytes on every machine and every torch version."""
    b, h, t, d = 2, 2, 5, 4
    count = b * h * t * d
    keys = [torch.arange(count, dtype=torch.float32).reshape(b, h, t, d) / (i + 1) for i in range(2)]
    values = [k.flip(-1) - 3 for k in keys]
    segment = torch.full((b, t), int(Segment.PROMPT), dtype=torch.int8)
    segment[:, 0], segment[1, -1] = int(Segment.SINK), int(Segment.PAD)
    agent = torch.where(segment == Segment.PAD, -1, 0).to(torch.int16)
    position = torch.arange(t).expand(b, t).clone()
    table = {"segment": segment, "agent": agent, "position": position, "agents": ["planner"]}
    kv = KVState(keys=keys, values=values, **table, fingerprint="model-a")
    half = KVState(keys=[k.half() for k in keys], values=[v.half() for v in values], **table)
    shape = (b, h, t, d)

    def packed(axis: str, group: int | None, salt: int) -> QuantizedTensor:
        (_, data_shape, _), (_, rows, _), _ = packed_parts(shape, axis, group, 4)
        n = data_shape[0] * data_shape[1]
        data = ((torch.arange(n) * 7 + salt) % 256).to(torch.uint8).reshape(data_shape)
        scale = torch.linspace(0.5, 1.5, rows[0]).half()
        return QuantizedTensor(data, scale, -scale, 4, axis, shape, torch.float32, group)

    quantized = QuantizedMemory(
        keys=[packed("channel", 2, 1), packed("channel", 2, 2)],
        values=[packed("token", None, 3), packed("token", None, 4)],
        **table,
        fingerprint="model-a",
    )
    return [
        TextMessage("critic", ["x = 3", "ünïcödé ✓"]),
        LatentMessage("planner", kv, "h:budget=4", {"retained": 0.5}),
        LatentMessage("planner", half, ""),
        LatentMessage("planner", quantized, "gen+int4"),
    ]


#: SHA-256 of the packets of :func:`_deterministic_messages` (raw, then zstd level 3) as encoded before issue 17.
GOLDEN = {
    "0:None": "d5814154b404717a",
    "0:3": "48506b052e16c990",
    "1:None": "3a5e401878f995f0",
    "1:3": "f7407c088f489623",
    "2:None": "78eb23d579d7d486",
    "2:3": "3863967ff5fbc5b4",
    "3:None": "c5246d470a345c96",
    "3:3": "d90aa8d060faa837",
}


def test_packets_of_valid_messages_are_byte_identical_to_before():
    digests = {}
    for i, message in enumerate(_deterministic_messages()):
        for level in (None, 3):
            packet = bytes(wire.encode(message, zstd_level=level))
            digests[f"{i}:{level}"] = hashlib.sha256(packet).hexdigest()[:16]
            decode(packet)
    assert digests == GOLDEN
