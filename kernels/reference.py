"""Plain-torch reference twins of the quantization kernels in :mod:`latent_relay.kernels.triton_quant`.

Row-wise asymmetric min-max quantization with bit packing, the building block of KIVI (Liu et al., "KIVI: A
Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750): every row of a ``[rows, n]`` matrix
is one quantization group. The caller arranges the rows (keys: one row per channel across tokens; values: one
row per token across channels).

For a group with real (unmasked) entries ``x``:

- ``zero = fp16_round_down(min x)`` and ``scale = fp16_round_up((max x - zero) / (2**bits - 1))``, both
  stored as fp16. Rounding outwards guarantees ``zero <= min x`` and ``zero + qmax * scale >= max x`` (up to
  one fp32 rounding), so no real entry is clamped and each dequantizes to within half a quantization step.
- ``q = clamp(floor((x - zero) / scale + 0.5), 0, qmax)``; masked entries (padding) take no part in min/max
  and are clamped into range.
- ``8 // bits`` codes share one byte, the first in the low bits (int4: element ``2j`` in the low nibble of
  byte ``j``, ``2j + 1`` in the high nibble); a row's trailing byte is zero-filled.

Dequantization is ``q * scale + zero`` in fp32, cast to the requested dtype.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def qmax(bits: int) -> int:
    """Largest code of a ``bits``-wide unsigned integer."""
    return (1 << bits) - 1


def packed_width(n: int, bits: int) -> int:
    """Bytes per packed row of ``n`` codes."""
    per = 8 // bits
    return (n + per - 1) // per


def fp16_round_down(x: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value ``<= x`` (fp32 in, fp16 out): round to nearest, then step one ulp down if above."""
    h = x.to(torch.float16)
    bits = h.view(torch.int16)
    step = torch.where(bits == 0, torch.full_like(bits, -32767), torch.where(bits > 0, bits - 1, bits + 1))
    return torch.where(h.float() > x, step, bits).view(torch.float16)


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value ``>= x`` for ``x >= 0`` (fp32 in, fp16 out)."""
    h = x.to(torch.float16)
    bits = h.view(torch.int16)
    return torch.where(h.float() < x, bits + 1, bits).view(torch.float16)


def quantize_pack_ref(
    x: torch.Tensor, valid: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` ``[rows, n]`` (fp32/fp16/bf16) and pack it.

    ``valid`` (bool ``[rows, n]`` or None) marks the entries that count for min/max. Returns ``packed`` uint8
    ``[rows, packed_width(n, bits)]``, ``scale`` and ``zero`` fp16 ``[rows]``.
    """
    check_bits(bits)
    rows, n = x.shape
    per, top = 8 // bits, qmax(bits)
    xf = x.float()
    if n == 0:
        mn = torch.zeros(rows, device=x.device)
        mx = torch.zeros(rows, device=x.device)
    elif valid is None:
        mn, mx = xf.amin(dim=1), xf.amax(dim=1)
    else:
        mn = torch.where(valid, xf, float("inf")).amin(dim=1)
        mx = torch.where(valid, xf, float("-inf")).amax(dim=1)
    empty = mn > mx
    mn = torch.where(empty, torch.zeros_like(mn), mn)
    mx = torch.where(empty, torch.zeros_like(mx), mx)
    zero = fp16_round_down(mn)
    zf = zero.float()
    scale = fp16_round_up(torch.clamp_min((mx - zf) / top, 0.0))
    sf = scale.float()
    # a zero scale divides by inf: (x - zero) / inf + 0.5 floors to code 0, like the kernel's explicit where
    sdiv = torch.where(sf > 0, sf, torch.full_like(sf, float("inf")))
    q = (xf - zf[:, None]).div_(sdiv[:, None]).add_(0.5).floor_().clamp_(0, top).to(torch.uint8)
    if per == 1:
        return q, scale, zero
    width = packed_width(n, bits)
    if width * per != n:
        q = torch.nn.functional.pad(q, (0, width * per - n))
    q = q.view(rows, width, per)
    packed = q[:, :, 0].clone()
    for k in range(1, per):
        packed |= q[:, :, k] << (k * bits)
    return packed, scale, zero


def unpack_dequantize_ref(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_pack_ref`: ``[rows, n]`` in ``dtype``."""
    check_bits(bits)
    rows, width = packed.shape
    per, top = 8 // bits, qmax(bits)
    if per == 1:
        q = packed
    else:
        q = torch.stack([(packed >> (k * bits)) & top for k in range(per)], dim=2).view(rows, width * per)[:, :n]
    return q.float().mul_(scale.float()[:, None]).add_(zero.float()[:, None]).to(dtype)
