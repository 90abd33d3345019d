"""KIVI quantization (compression/quant.py, arXiv 2402.02750): packing, error bound, masking, memories."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latent_relay.compression.quant import dequantize, dequantize_memory, quantize, quantize_memory, unpack
from latent_relay.relay.memory import Segment
from latent_relay.relay.messages import LatentMessage
from latent_relay.relay.quantized import QuantizedTensor
from tests.fuzz.packets import make_memory

EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def step_of(q: QuantizedTensor) -> torch.Tensor:
    """Per-entry quantization step: dequantize all-ones codes with zero offsets (the scale of each entry)."""
    ones = sum(1 << (k * q.bits) for k in range(8 // q.bits))
    data = torch.full_like(q.data, ones)
    unit = QuantizedTensor(
        data, q.scale, torch.zeros_like(q.zero), q.bits, q.axis, q.shape, torch.float32, q.group_size
    )
    return dequantize(unit)


def assert_within_half_step(x: torch.Tensor, q: QuantizedTensor, real: torch.Tensor | None = None) -> None:
    y = dequantize(q)
    assert y.dtype == x.dtype and y.shape == x.shape
    err = (y.float() - x.float()).abs()
    half = step_of(q) / 2  # plus the output dtype's rounding of the dequantized value (|y| <= |x| + half)
    bound = half + (x.float().abs() + half) * EPS[x.dtype] + 1e-6 * (x.float().abs() + half)
    bad = err > bound
    if real is not None:
        bad &= real
    assert not bool(bad.any()), f"max excess {float((err - bound)[bad].max())}"


@settings(max_examples=300, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(0, 9), st.integers(1, 9)),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    bits=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from(["channel", "token"]),
    group=st.one_of(st.none(), st.integers(1, 5)),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    offset=st.sampled_from([0.0, 5.0, -1000.0]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_half_a_step(shape, dtype, bits, axis, group, magnitude, offset, masked, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * magnitude + offset).to(dtype)
    valid = torch.rand(shape[0], 1, shape[2], generator=g) > 0.3 if masked else None
    q = quantize(x, bits, axis, valid=valid, group_size=group)
    q.validate()
    real = None if valid is None else valid[..., None].expand(shape)
    assert_within_half_step(x, q, real)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 1, 16)  # one token, codes 0..15 per channel
    q = quantize(x, 4, "token")
    assert q.data.tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]
    assert q.scale.item() == 1.0 and q.zero.item() == 0.0
    assert torch.equal(dequantize(q), x)
    q8 = quantize(x, 8, "token")
    assert q8.data.numel() == 16 and q.data.numel() == 8 and q.nbytes == 8 + 2 + 2


def test_keys_per_channel_values_per_token():
    x = torch.zeros(1, 1, 4, 3)
    x[0, 0, :, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # channel 0 ranges over tokens
    x[0, 0, 2, :] = torch.tensor([2.0, 10.0, -10.0])  # token 2 ranges over channels
    k, v = quantize(x, 8, "channel"), quantize(x, 8, "token")
    assert k.scale.shape == (3,) and v.scale.shape == (4,)
    assert k.zero.tolist() == [0.0, 0.0, -10.0] and v.zero.tolist() == [0.0, 0.0, -10.0, 0.0]


def test_padding_does_not_widen_the_range():
    memory = make_memory(tokens=8, layers=1, dim=4)
    pad = memory.segment == Segment.PAD
    assert bool(pad.any())
    for k in (*memory.keys, *memory.values):
        k[pad[:, None, :].expand(k.shape[:3])] = 1e4
    q = quantize_memory(memory, 8)
    assert float(q.keys[0].scale.float().max()) < 0.1  # N(0,1) range / 255, not 1e4 / 255
    out = dequantize_memory(q)
    real = (~pad)[:, None, :, None].expand_as(memory.keys[0])
    assert float((out.keys[0] - memory.keys[0]).abs()[real].max()) < 0.05
    assert float(out.values[0][~real].abs().max()) == 0.0  # masked value groups come back as 0


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_head", [False, True])
def test_memory_round_trip_and_real_size(bits, per_head):
    memory = make_memory(batch=2, heads=2, tokens=10, dim=8, layers=3, per_head=per_head)
    q = quantize_memory(memory, bits, key_group_size=4)
    q.validate()
    out = dequantize_memory(q)
    assert torch.equal(out.position, memory.position) and torch.equal(out.segment, memory.segment)
    assert out.agents == memory.agents and out.fingerprint == memory.fingerprint
    real = memory.valid[:, None, :, None]
    for a, b, qa in zip(memory.keys, out.keys, q.keys):
        assert_within_half_step(a, qa, real.expand_as(a))
        assert b.shape == a.shape
    codes = 3 * (2 * 2 * 12 * 8 + 2 * 2 * 10 * 8) * bits // 8  # key token axis padded 10 -> 12 for groups of 4
    key_groups = 3 * 2 * 2 * 8 * 3  # layers x batch x heads x channels x token groups (10 -> 4+4+2)
    value_groups = 3 * 2 * 2 * 10  # layers x batch x heads x tokens
    table = memory.segment.nbytes + memory.agent.nbytes + memory.position.nbytes
    assert q.nbytes == codes + 4 * (key_groups + value_groups) + table


def test_errors_are_clear():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="bits"):
        quantize(x, 3, "token")
    with pytest.raises(ValueError, match="axis"):
        quantize(x, 8, "head")
    with pytest.raises(ValueError, match="group_size"):
        quantize(x, 8, "token", group_size=0)
    with pytest.raises(ValueError, match="quantize"):
        quantize(x.long(), 8, "token")
    with pytest.raises(ValueError, match="fp16 range"):
        quantize(x * 1e6, 8, "token")
    q = quantize(x, 4, "channel")
    q.data = q.data[:, :1]
    with pytest.raises(ValueError, match="packed data"):
        q.validate()


def test_empty_memory():
    memory = make_memory(tokens=0, layers=2)
    out = dequantize_memory(quantize_memory(memory, 4))
    assert out.num_tokens == 0 and out.keys[0].shape == memory.keys[0].shape


def test_unpack_dequantizes_a_quantized_memory_and_passes_a_full_one():
    memory = make_memory(tokens=6, layers=2)
    q = quantize_memory(memory, 8)
    for item in (q, LatentMessage("planner", q, "gen+int8")):
        out = unpack(item)
        assert all(torch.equal(a, b) for a, b in zip(out.keys, dequantize_memory(q).keys, strict=True))
    assert unpack(memory) is memory and unpack(LatentMessage("planner", memory)) is memory
