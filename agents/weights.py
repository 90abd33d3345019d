"""Weight settings: the dtype a model runs in, and optionally its linear layers on torch's quantized CPU matmuls.

A setting is one of :data:`SETTINGS` (``relay run --weights``):

- ``float32``, ``bfloat16``, ``float16``: the model loaded in that dtype.
- ``int8``: bfloat16, every linear layer (output head included) on ``torch._weight_int8pack_mm``; each weight row
  (output channel) rounded to int8 with its own symmetric scale ``max|w_row| / 127``. Weight-only: activations
  stay bfloat16.
- ``int4``: bfloat16, every linear layer on ``torch._weight_int4pack_mm_for_cpu``; asymmetric 4-bit groups of 32
  inputs (a scale and an offset per group). A Q4_K GGUF block is 32 inputs on a 16-level grid, so such a block's
  levels can come back; Q5_0 / Q6_K tensors are rounded further.
- ``row-int8``: float32, every linear layer on int8 dot products (``torch._int_mm``): int8 weights per output row,
  and each token's activations quantized on the fly with its own scale (LLM.int8()-style vector-wise quantization,
  Dettmers et al. 2022, without the outlier split), so one outlier token does not flatten the others as torch.ao's
  one-scale-per-call dynamic quantization does.
- ``auto``: :func:`default_setting`, the plain dtype that is fastest here without a measurable loss.

The quantized kernels are CPU kernels; the weight-only ones are fast only with bfloat16 activations (with float32
ones they were 2-40x slower than float32 on the build machine). Speed and fidelity of each setting per model:
``benchmarks/cpu_speed.py`` and its results in ``benchmarks/results/``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

#: Setting -> (the dtype its model loads in, the kind of quantized linear layer, or None for plain layers).
SETTINGS: dict[str, tuple[torch.dtype, str | None]] = {
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "float16": (torch.float16, None),
    "int8": (torch.bfloat16, "int8"),
    "int4": (torch.bfloat16, "int4"),
    "row-int8": (torch.float32, "row-int8"),
}
INT4_GROUP = 32


class WeightSettingError(ValueError):
    """A weight setting this build or device cannot run (unknown name, quantized layers off the CPU, ...)."""


def _row_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[out, in]`` as int8 rows and their fp32 scales ``max|w_row| / 127``."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored quantized. ``float_weight()`` gives ``W`` back (dequantized) for code
    that reads the matrix itself, e.g. the realignment of latent thoughts; there is deliberately no ``.weight``."""

    def __init__(self, linear: nn.Linear, bias_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(bias_dtype).clone(), requires_grad=False)

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:  # [rows, in] -> [rows, out]
        raise NotImplementedError

    def float_weight(self) -> torch.Tensor:  # [out, in], fp32
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8WeightLinear(QuantizedLinear):
    """int8 weight rows with per-row scales; activations in the scales' dtype (the model's)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear, linear.weight.dtype)
        rows, scale = _row_int8(linear.weight)
        self.register_buffer("packed", rows)  # [out, in]
        self.register_buffer("scale", scale.to(linear.weight.dtype))

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(flat.to(self.scale.dtype).contiguous(), self.packed, self.scale)

    def float_weight(self) -> torch.Tensor:
        return self.packed.float() * self.scale.float()[:, None]


class Int4WeightLinear(QuantizedLinear):
    """4-bit groups of ``group`` inputs (an offset and a scale per group); activations in the model's dtype."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__(linear, linear.weight.dtype)
        if linear.in_features % group:
            raise WeightSettingError(f"int4 needs input sizes divisible by {group}; a layer has {linear.in_features}")
        weight = linear.weight.detach().float()  # [out, in]
        self.group = group
        blocks = weight.reshape(-1, group)
        low, high = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
        scale = (high - low).clamp_min(1e-6) / 15
        levels = torch.round((blocks - low) / scale).clamp(0, 15).to(torch.int32).reshape(weight.shape)
        zero = low + 8 * scale  # the kernel computes (level - 8) * scale + zero
        pairs = torch.cat([scale, zero], 1).reshape(self.out_features, -1, 2).transpose(0, 1).contiguous()
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(levels, 1))
        self.register_buffer("scale_and_zero", pairs.to(linear.weight.dtype))  # [in / group, out, 2]

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        flat = flat.to(self.scale_and_zero.dtype).contiguous()
        return torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_and_zero)

    def float_weight(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self.scale_and_zero.dtype, device=self.packed.device)
        return self.matmul(eye).float().T.contiguous()  # the kernel's own dequantization, column by column


class RowDynamicInt8Linear(QuantizedLinear):
    """int8 weight rows (as :class:`Int8WeightLinear`) times each input row quantized to int8 with its own scale,
    on int8 dot products; the output comes back in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear, torch.float32)
        rows, scale = _row_int8(linear.weight)
        self.register_buffer("packed", rows.T.contiguous())  # [in, out], as torch._int_mm takes it
        self.register_buffer("scale", scale)

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        x = flat.float()
        row = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        out = torch._int_mm(torch.round(x / row).to(torch.int8), self.packed).float() * row * self.scale
        return out.to(flat.dtype)

    def float_weight(self) -> torch.Tensor:
        return (self.packed.float() * self.scale[None, :]).T.contiguous()


KINDS: dict[str, type[QuantizedLinear]] = {
    "int8": Int8WeightLinear,
    "int4": Int4WeightLinear,
    "row-int8": RowDynamicInt8Linear,
}


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` matrix of a plain or quantized linear layer (dequantized, fp32, for the latter)."""
    return module.float_weight() if isinstance(module, QuantizedLinear) else module.weight


def quantize_linears(model: nn.Module, kind: str) -> int:
    """Replace every ``nn.Linear`` of ``model`` (the decoder's projections and the output head; embeddings stay)
    with the quantized layer of ``kind``, in place. Returns how many were replaced."""
    if kind not in KINDS:
        raise WeightSettingError(f"unknown quantized layer kind {kind!r}; choose from {', '.join(KINDS)}")
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, KINDS[kind](module))
    return len(targets)


def cpu_has_native_bf16() -> bool:
    """Whether torch's CPU kernels (oneDNN) run bfloat16 matmuls on native bf16 units (AVX512_BF16 or AMX) here."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # a torch built without oneDNN
        return False


def default_setting(device: str | torch.device) -> str:
    """``bfloat16`` on accelerators, and on a CPU with native bf16 units; ``float32`` on any other CPU.

    On the project's 2-core build machine (AVX512_BF16) the 1.5B model in bfloat16 prefills 4.4x and decodes 4.5x
    (batch 8) as fast as in float32, for +0.0017 nats/token on GSM8K reference solutions; the quantized settings
    decode faster still but lose 3-4x more (``benchmarks/results/cpu_speed_2026-12-07.txt``). Limited to AVX2 the
    same CPU prefills bfloat16 at 0.3x float32, and no setting kept prefill at float32's speed while decoding 3x.
    """
    if torch.device(device).type != "cpu" or cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def resolve_setting(
    weights: str | torch.dtype | None, device: str | torch.device
) -> tuple[str, torch.dtype, str | None]:
    """``(setting name, dtype, quantized kind or None)`` for a setting name, a dtype, ``"auto"`` or None."""
    if weights is None or weights == "auto":
        weights = default_setting(device)
    name = str(weights).removeprefix("torch.")
    if name not in SETTINGS:
        raise WeightSettingError(f"unknown weight setting {weights!r}; use auto, {', '.join(SETTINGS)}")
    dtype, kind = SETTINGS[name]
    if kind is not None and torch.device(device).type != "cpu":
        raise WeightSettingError(f"weights {name!r} run on torch's CPU kernels; on {device} use bfloat16 or float16")
    return name, dtype, kind


def quantized_fingerprint(fingerprint: str, kind: str) -> str:
    """A model's fingerprint once its linear layers are quantized to ``kind``: other weights, other numbers."""
    return hashlib.sha256(f"{fingerprint}\nquantized-linears={kind}\n".encode()).hexdigest()
