"""Weight settings (agents/weights.py): the quantized linear layers compute what the float layer computes (weights
already on the quantization grid come back exactly, so the packing, the scale layout and the zero point are right),
a quantized model runs the relay with its own fingerprint, and settings resolve (or fail) as documented."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latent_relay.agents.weights import (
    Int4WeightLinear,
    Int8WeightLinear,
    RowDynamicInt8Linear,
    WeightSettingError,
    linear_weight,
    quantize_linears,
    resolve_setting,
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
    assert quantize_linears(model, "int4") == 2
    assert isinstance(model[1], Int4WeightLinear) and isinstance(model[3], Int4WeightLinear)
    assert isinstance(model[0], nn.Embedding)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 32)
    with pytest.raises(WeightSettingError, match="unknown quantized layer kind"):
        quantize_linears(model, "int2")


@pytest.mark.parametrize("kind", ["int8", "int4", "row-int8"])
def test_float_weight_is_what_the_layer_multiplies_by(kind):
    """``linear_weight`` of a quantized layer (read by the realignment of latent thoughts) is the matrix its forward
    applies, and it is the float weight up to the kind's rounding."""
    from latent_relay.agents.weights import KINDS

    gen = torch.Generator().manual_seed(3)
    dtype = torch.float32 if kind == "row-int8" else torch.bfloat16
    linear = nn.Linear(64, 48, bias=True, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen) * 0.05)
    layer = KINDS[kind](linear)
    x = torch.randn(6, 64, generator=gen, dtype=dtype)
    weight = linear_weight(layer)
    assert weight.shape == (48, 64) and weight.dtype == torch.float32
    if kind != "row-int8":  # row-int8 also rounds the activations, so its forward is not x @ W exactly
        expected = x.float() @ weight.T + linear.bias.float()
        torch.testing.assert_close(layer(x).float(), expected, rtol=0.02, atol=0.02)
    step = {"int8": 1 / 127, "int4": 1 / 15, "row-int8": 1 / 127}[kind]
    spread = float(linear.weight.detach().abs().amax()) * 2
    assert float((weight - linear.weight.detach().float()).abs().max()) <= spread * step
    assert not hasattr(layer, "weight")  # nobody reads packed integers as a float matrix by mistake


def test_linear_weight_of_a_plain_layer_is_its_parameter():
    linear = nn.Linear(4, 3)
    assert linear_weight(linear) is linear.weight


def test_settings_resolve_to_dtype_and_kind(monkeypatch):
    from latent_relay.agents import weights

    assert resolve_setting("int8", "cpu") == ("int8", torch.bfloat16, "int8")
    assert resolve_setting("row-int8", "cpu") == ("row-int8", torch.float32, "row-int8")
    assert resolve_setting(torch.float16, "cpu") == ("float16", torch.float16, None)
    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: False)
    assert resolve_setting("auto", "cpu") == ("float32", torch.float32, None)
    assert resolve_setting(None, "cuda") == ("bfloat16", torch.bfloat16, None)
    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: True)
    assert resolve_setting("auto", "cpu") == ("bfloat16", torch.bfloat16, None)
    with pytest.raises(WeightSettingError, match="unknown weight setting 'int3'; use auto, float32"):
        resolve_setting("int3", "cpu")
    with pytest.raises(WeightSettingError, match="CPU kernels"):
        resolve_setting("int4", "cuda")


def test_cpu_bf16_probe_answers_a_bool():
    from latent_relay.agents.weights import cpu_has_native_bf16

    assert isinstance(cpu_has_native_bf16(), bool)


@pytest.mark.parametrize("setting", ["int8", "int4", "row-int8"])
def test_a_quantized_model_loads_with_its_own_fingerprint_and_runs_a_latent_relay(tmp_path, monkeypatch, setting):
    """Loaded with ``weights=<kind>``, a model has every linear layer quantized, a fingerprint of its own (records of
    the float model never mix with it), logits near the float model's, and it runs latent thoughts (``realign``
    reads the quantized head) and decoding."""
    from latent_relay.agents.latent import LatentInput
    from latent_relay.agents.model_errors import ModelReferenceError
    from latent_relay.agents.models import resolve_model
    from latent_relay.agents.runner import ModelRunner
    from latent_relay.agents.weights import QuantizedLinear
    from latent_relay.relay.decode_config import DecodeConfig
    from tests.model_folders import save_tiny_with_tokenizer

    monkeypatch.setenv("RELAY_CACHE_DIR", str(tmp_path / "cache"))
    tmp_path = tmp_path / "model"
    save_tiny_with_tokenizer(tmp_path)
    base_dtype = "float32" if setting == "row-int8" else "bfloat16"
    plain = resolve_model(str(tmp_path), weights=base_dtype)
    quant = resolve_model(str(tmp_path), weights=setting)
    assert quant.fingerprint != plain.fingerprint
    assert quant.fingerprint == resolve_model(str(tmp_path), weights=setting).fingerprint
    assert quant.config_summary["weights"] == setting
    assert not any(isinstance(m, nn.Linear) for m in quant.model.modules())
    assert any(isinstance(m, QuantizedLinear) for m in quant.model.modules())
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        want = plain.model(ids).logits.float()
        got = quant.model(ids).logits.float()
    assert float((got - want).norm() / want.norm()) < 0.15
    runner = ModelRunner.from_loaded(quant, latent=LatentInput("realign"))
    out = runner.step([None, None], [[1, 2, 3], [4, 5]], "a", thoughts=2, decode=DecodeConfig(max_new_tokens=3))
    assert out.output_tokens == [3, 3] and [m.num_tokens >= n + 2 for m, n in zip(out.memories, (3, 2))] == [True] * 2
    assert len(runner.output_projections()) == runner.num_layers  # value=wo scoring reads the dequantized W_o
    with pytest.raises(ModelReferenceError, match="disagree"):
        resolve_model(str(tmp_path), dtype="float16", weights="int8")
