"""torch's own weight-only quantized CPU matmuls as drop-ins for ``nn.Linear``: a module swap for measuring them in
:mod:`latent_relay.benchmarks.cpu_speed`, not a product option.

- int8: ``torch._weight_int8pack_mm``; each weight row (output channel) rounded to int8 with its own symmetric
  scale ``max|w_row| / 127``.
- int4: ``torch._weight_int4pack_mm_for_cpu``; asymmetric 4-bit groups of ``group`` input channels (scale and
  offset per group, as in torch's own tests of the kernel). A Q4_K GGUF block is 32 inputs on a 16-level grid, so
  32-wide groups can hold such a block's levels again; Q5_0 / Q6_K tensors are rounded further.

- dynamic int8: ``torch.ao.quantization.quantize_dynamic`` on a float32 model; int8 weights per row and each
  input's activations quantized to int8 on the fly (one scale per call), so the matmul itself runs on int8 dot
  products (fbgemm: AVX512-VNNI, AVX-VNNI or AVX2).

In the weight-only kinds activations stay in the model's dtype, and their kernels are fast only with bfloat16 (or
float16) activations: with float32 ones they were 2-40x slower than a float32 ``nn.Linear`` on this benchmark's
machine, so the benchmark builds those settings from a bfloat16 model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Int8WeightLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as int8 rows and per-row scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # ``weight`` keeps its name so code that only reads the attribute (e.g. ``lm_head.weight`` passed to the
        # soft latent input, which does not use it) still finds one; it is int8, not a drop-in float weight.
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scale.dtype).contiguous()
        out = torch._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Int4WeightLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` in 4-bit groups of ``group`` inputs (an offset and a scale per group)."""

    def __init__(self, linear: nn.Linear, group: int = 32):
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        blocks = weight.reshape(-1, group)
        low, high = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
        scale = (high - low).clamp_min(1e-6) / 15
        levels = torch.round((blocks - low) / scale).clamp(0, 15).to(torch.int32).reshape(weight.shape)
        zero = low + 8 * scale  # the kernel computes (level - 8) * scale + zero
        pairs = torch.cat([scale, zero], 1).reshape(self.out_features, -1, 2).transpose(0, 1).contiguous()
        self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(levels, 1))
        self.register_buffer("scale_and_zero", pairs.to(linear.weight.dtype))  # [in / group, out, 2]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scale_and_zero.dtype).contiguous()
        out = torch._weight_int4pack_mm_for_cpu(flat, self.weight, self.group, self.scale_and_zero)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class RowDynamicInt8Linear(nn.Module):
    """``y = x W^T + b`` on int8 dot products (``torch._int_mm``): ``W`` int8 per output row as in
    :class:`Int8WeightLinear`, and each input row (token) quantized to int8 on the fly with its own scale, so one
    token's outlier does not flatten the others (as one scale per call does)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        rows = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", rows.T.contiguous())  # [in, out], as torch._int_mm takes it
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        row = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        out = torch._int_mm(torch.round(flat / row).to(torch.int8), self.weight).float() * row * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """``model`` (float32) with every ``nn.Linear`` swapped for torch's dynamic int8 linear, in place."""
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


#: Setting name -> how one ``nn.Linear`` becomes its quantized replacement.
KINDS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "int8": Int8WeightLinear,
    "int4": Int4WeightLinear,
    "row-int8": RowDynamicInt8Linear,
}


def swap_linears(model: nn.Module, kind: str, skip: tuple[str, ...] = ()) -> int:
    """Replace every ``nn.Linear`` of ``model`` (the decoder's projections and the output head) whose name holds
    none of ``skip`` with the ``kind`` of :data:`KINDS`, in place; embeddings stay as they are. Returns how many
    were replaced."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(part in name for part in skip)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, KINDS[kind](module))
    return len(targets)
