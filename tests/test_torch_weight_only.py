"""The weight-only linear layers the CPU speed benchmark measures compute what the float layer computes: weights that
already sit on the quantization grid come back exactly (so the packing, the scale layout and the zero point are
right), and the output head of a model is swapped too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latent_relay.benchmarks.torch_weight_only import (
    Int4WeightLinear,
    Int8WeightLinear,
    RowDynamicInt8Linear,
    swap_linears,
)


def grid_linear(levels: int, group: int, out_features: int = 32, in_features: int = 64) -> nn.Linear:
    """A bf16 linear layer whose every ``group`` inputs of a row hold ``levels`` evenly spaced values (with the
    group's lowest and highest level present), so an exact quantizer reproduces it."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, levels, (out_features, in_features), generator=gen)
    q[:, ::group] = 0
    q[:, 1::group] = levels - 1
    scale = torch.rand(out_features, in_features // group, 1, generator=gen) * 0.01 + 0.001
    low = torch.randn(out_features, in_features // group, 1, generator=gen) * 0.05
    weight = (low + scale * q.view(out_features, -1, group).float()).view(out_features, in_features)
    linear = nn.Linear(in_features, out_features, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(torch.randn(out_features, generator=gen))
    return linear


def test_int4_groups_on_the_grid_come_back_exactly():
    linear = grid_linear(levels=16, group=32)
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16)
    expected = x.float() @ linear.weight.float().T + linear.bias.float()
    got = Int4WeightLinear(linear, group=32)(x).float()
    assert got.shape == (5, 3, 32)
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02)  # bf16 scales and products


def test_int8_rows_on_the_grid_come_back_exactly():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (32, 64), generator=gen)
    q[:, 0] = 127
    scale = torch.rand(32, 1, generator=gen) * 0.001 + 1e-4
    linear = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(q * scale)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    expected = x.float() @ linear.weight.float().T
    torch.testing.assert_close(Int8WeightLinear(linear)(x).float(), expected, rtol=0.02, atol=0.02)


def test_row_int8_keeps_each_token_to_its_own_scale():
    """A token 1000x larger than the others (Qwen's first token is) leaves the others' outputs within int8 rounding;
    with one scale per call they would round to almost nothing."""
    gen = torch.Generator().manual_seed(2)
    linear = nn.Linear(64, 32, bias=True)
    x = torch.randn(2, 5, 64, generator=gen)
    x[:, 0] *= 1000
    with torch.no_grad():
        expected = linear(x)
        got = RowDynamicInt8Linear(linear)(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    error = (got - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert float(error.max()) < 0.03


def test_swap_replaces_every_linear_layer_and_refuses_unknown_kinds():
    model = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(torch.bfloat16)
    assert swap_linears(model, "int4") == 2
    assert isinstance(model[1], Int4WeightLinear) and isinstance(model[3], Int4WeightLinear)
    assert isinstance(model[0], nn.Embedding)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 32)
    with pytest.raises(ValueError, match="unknown kind"):
        swap_linears(model, "int2")
