"""kernels/: the torch reference twins, the dispatch, and the Triton kernels under the interpreter."""

from __future__ import annotations

import pytest
import torch

from latent_relay.kernels import dispatch, reference
from tests.triton_subprocess import ROOT, run_interpreted


def test_fp16_directed_rounding_brackets_the_input():
    x = torch.cat([torch.randn(10_000) * 100, torch.tensor([0.0, -0.0, 1e-9, -1e-9, 65504.0, 1 / 3])])
    down, up = reference.fp16_round_down(x), reference.fp16_round_up(x.abs())
    assert bool((down.float() <= x).all()) and bool((up.float() >= x.abs()).all())
    # tight: the next fp16 value is on the other side
    nxt = torch.nextafter(down.float().to(torch.float16), torch.tensor(float("inf"), dtype=torch.float16))
    assert bool((nxt.float() > x).all())


def test_reference_packs_and_round_trips():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 2.0]])
    packed, scale, zero = reference.quantize_pack_ref(x, None, 2)
    assert packed.tolist() == [[0b11100100, 0b10]] and scale.item() == 1.0 and zero.item() == 0.0
    assert torch.equal(reference.unpack_dequantize_ref(packed, scale, zero, 2, 5, torch.float32), x)


def test_masked_entries_are_ignored_and_clamped():
    x = torch.tensor([[0.0, 1.0, 100.0, -50.0]])
    valid = torch.tensor([[True, True, False, False]])
    packed, scale, zero = reference.quantize_pack_ref(x, valid, 8)
    y = reference.unpack_dequantize_ref(packed, scale, zero, 8, 4, torch.float32)
    assert zero.item() == 0.0 and abs(scale.item() - 1 / 255) < 1e-5
    assert y[0, :2].tolist() == pytest.approx([0.0, 1.0], abs=1e-3) and 0 <= float(y.min()) <= float(y.max()) <= 1.01


def test_dispatch_picks_torch_on_cpu_and_honours_overrides(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.choose_backend(x) == "torch"
    assert dispatch.choose_backend(x, "torch") == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.choose_backend(x) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match="backend"):
        dispatch.choose_backend(x)


def test_dispatch_validates_shapes():
    with pytest.raises(ValueError):
        dispatch.quantize_pack(torch.zeros(3), None, 8)
    with pytest.raises(ValueError):
        dispatch.quantize_pack(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool), 8)
    with pytest.raises(ValueError):
        dispatch.unpack_dequantize(
            torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(3), torch.zeros(3), 8, 3, torch.float32
        )


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
def test_triton_kernels_match_torch_twins_under_the_interpreter():
    run_interpreted(ROOT / "tests" / "triton_interp_check.py")
