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


# ---------------------------------------------------------------------------------------------------------------
# The relay boundary's other tensor steps (Triton twins in kernels/triton_gather.py and kernels/triton_backfill.py):
# the gather of surviving tokens and the matrix-shaped steps of Orthogonal Backfill (arXiv 2604.13349, METHODS.md
# section 3). Shapes: one layer's keys or values ``[B, H, T, d]``; problem ``n = b * H + h``.


def gather_tokens_ref(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[b, h, index[b, h, j]]`` for ``x`` ``[B, H, T, d]`` and ``index`` ``[B, H or 1, J]``: ``[B, H, J, d]``
    (written into ``out``, contiguous, when given). A negative index is a padding slot: its row is zero.

    One ``index_select`` of whole ``d``-rows on the flattened tensor (much faster on CPU than an elementwise
    ``torch.gather`` with an index expanded along ``d``, and the same bits).
    """
    b, h, t, d = x.shape
    j = index.shape[-1]
    idx = index.expand(b, h, j)
    pad = idx < 0
    padded = bool(pad.any())
    if padded:
        idx = idx.clamp_min(0)
        if t == 0:  # nothing to read: every slot is padding
            return x.new_zeros(b, h, j, d) if out is None else out.zero_()
    base = (torch.arange(b * h, device=x.device) * t).view(b, h, 1)
    flat = (idx + base).reshape(-1)
    rows = x.reshape(b * h * t, d)
    if out is None:
        result = rows.index_select(0, flat).view(b, h, j, d)
    else:
        torch.index_select(rows, 0, flat, out=out.view(b * h * j, d))
        result = out
    if padded:
        result.masked_fill_(pad[..., None], 0)
    return result


def residual_mean_ref(
    v: torch.Tensor, evict: torch.Tensor, w: torch.Tensor, qt: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OBF's residual of the evicted values against the kept span, and its weighted mean, per problem.

    ``v`` ``[B, H, T, d]`` (any float dtype), ``evict`` bool ``[B, H, T]``, weights ``w`` ``[B, H, T]`` (``w_hat``;
    only the evicted slots count), ``qt`` ``Q^T`` ``[B * H, k, d]`` with orthonormal rows (``None``: no projection).
    With ``Y`` the evicted rows (zero elsewhere) and ``R = Y - (Y Q^T) Q``: returns ``r = w^T R`` ``[B * H, d]``,
    ``||R||_F^2`` and ``||Y||_F^2`` ``[B * H]``, all float32.
    """
    b, h, t, d = v.shape
    n = b * h
    ym = (v.float() * evict[..., None]).reshape(n, t, d)
    res = ym if qt is None else ym - (ym @ qt.float().mT) @ qt.float()
    r = (w.reshape(n, 1, t).float() @ res)[:, 0]
    return r, res.square().sum(dim=(1, 2)), ym.square().sum(dim=(1, 2))


def backfill_shift_ref(
    r: torch.Tensor,
    c: torch.Tensor | None,
    alpha: torch.Tensor,
    applied: torch.Tensor,
    full: torch.Tensor | None = None,
) -> torch.Tensor:
    """OBF's projection onto the principal residual directions, scaled: ``shift`` ``[N, d]``.

    ``delta = (r C^T) C`` for ``r`` ``[N, d]`` and ``C`` ``[N, p, d]`` (``None``: every component, ``delta = r``);
    ``delta = r`` where ``full`` (bool ``[N]``: at most ``p`` evicted rows, so ``C`` spans the whole residual);
    ``shift = alpha * delta`` where ``applied`` (bool ``[N]``), zero elsewhere.
    """
    if c is None:
        delta = r
    else:
        delta = torch.einsum("np,npd->nd", torch.einsum("nd,npd->np", r, c), c)
        if full is not None:
            delta = torch.where(full[:, None], r, delta)
    return torch.where(applied[:, None], alpha[:, None] * delta, torch.zeros_like(delta))


def inject_rows_ref(
    v: torch.Tensor, slots: torch.Tensor, shift: torch.Tensor, token_scale: torch.Tensor
) -> torch.Tensor:
    """OBF's injection, in place: ``v[b, h, slots[b, h, j]] += shift[b, h] * token_scale[b, h, j]``.

    ``v`` ``[B, H, T, d]`` (contiguous), ``slots`` ``[B, H or 1, k]`` (distinct per (item, head); negative:
    padding, left alone), ``shift`` ``[B, H, d]`` and ``token_scale`` ``[B, H, k]`` float32. The sum is taken in
    float32 and rounded once to ``v``'s dtype. Returns ``v``.
    """
    b, h, t, d = v.shape
    k = slots.shape[-1]
    idx = slots.expand(b, h, k)
    real = idx >= 0
    if not bool(real.any()):
        return v
    flat = (idx.clamp_min(0) + (torch.arange(b * h, device=v.device) * t).view(b, h, 1)).reshape(-1)
    rows = v.reshape(b * h * t, d).index_select(0, flat).view(b, h, k, d)
    add = shift[:, :, None, :] * token_scale[..., None]
    new = (rows.float() + add).to(v.dtype).view(-1, d)
    if not bool(real.all()):
        keep = real.reshape(-1).nonzero().squeeze(1)
        flat, new = flat[keep], new.index_select(0, keep)
    v.view(b * h * t, d).index_copy_(0, flat, new)
    return v
