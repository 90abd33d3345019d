"""Triton kernels for row-wise KIVI quantization + bit packing and unpacking + dequantization.

Same contract, bit for bit, as the torch twins in :mod:`latent_relay.kernels.reference` (KIVI, arXiv 2402.02750; see
that module for the arithmetic). One program handles ``BLOCK_R`` rows: a first sweep over the row finds the masked
min/max, a second quantizes and packs ``8 // bits`` codes per byte. Plain pointer arithmetic only, fp32 math
after every load (the interpreter's bf16 arithmetic is unreliable), so the kernels also run under
``TRITON_INTERPRET=1`` on CPU tensors, which is how the tests check them.

Importing this module imports ``triton``; :mod:`latent_relay.kernels.dispatch` imports it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from latent_relay.kernels.reference import check_bits, packed_width, qmax

BLOCK_R = 16
BLOCK_N = 64
BLOCK_B = 32


@triton.jit
def _fp16_down(x):
    h = x.to(tl.float16)
    b = h.to(tl.int16, bitcast=True).to(tl.int32)
    step = tl.where(b == 0, -32767, tl.where(b > 0, b - 1, b + 1))
    b = tl.where(h.to(tl.float32) > x, step, b).to(tl.int16)
    return b.to(tl.float16, bitcast=True)


@triton.jit
def _fp16_up(x):
    h = x.to(tl.float16)
    b = h.to(tl.int16, bitcast=True).to(tl.int32)
    b = tl.where(h.to(tl.float32) < x, b + 1, b).to(tl.int16)
    return b.to(tl.float16, bitcast=True)


@triton.jit
def _quantize_pack_kernel(
    x_ptr, valid_ptr, out_ptr, scale_ptr, zero_ptr, R, N, NB,
    HAS_VALID: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, QMAX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rbase = rows.to(tl.int64) * N
    mn = tl.full([BLOCK_R], float("inf"), tl.float32)
    mx = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        m = rmask[:, None] & (cols[None, :] < N)
        offs = rbase[:, None] + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_VALID:
            v = tl.load(valid_ptr + offs, mask=m, other=0)
            m = m & (v != 0)
        mn = tl.minimum(mn, tl.min(tl.where(m, x, float("inf")), axis=1))
        mx = tl.maximum(mx, tl.max(tl.where(m, x, float("-inf")), axis=1))
    empty = mn > mx
    mn = tl.where(empty, 0.0, mn)
    mx = tl.where(empty, 0.0, mx)
    zero = _fp16_down(mn)
    zf = zero.to(tl.float32)
    # div_rn: correctly rounded division, as torch's (a plain fp32 `/` compiles to an approximate division on GPUs)
    scale = _fp16_up(tl.maximum(tl.div_rn(mx - zf, tl.full(mx.shape, QMAX, tl.float32)), 0.0))
    sf = scale.to(tl.float32)
    tl.store(scale_ptr + rows, scale, mask=rmask)
    tl.store(zero_ptr + rows, zero, mask=rmask)
    sdiv = tl.where(sf > 0, sf, 1.0)
    obase = rows.to(tl.int64) * NB
    for start in range(0, NB, BLOCK_B):
        bcols = start + tl.arange(0, BLOCK_B)
        bm = rmask[:, None] & (bcols[None, :] < NB)
        acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
        for k in tl.static_range(PER):
            cols = bcols * PER + k
            m = bm & (cols[None, :] < N)
            x = tl.load(x_ptr + rbase[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            q = tl.floor(tl.div_rn(x - zf[:, None], tl.broadcast_to(sdiv[:, None], x.shape)) + 0.5)
            q = tl.where(sf[:, None] > 0, q, 0.0)
            q = tl.minimum(tl.maximum(q, 0.0), QMAX)
            q = tl.where(m, q, 0.0)
            acc = acc | (q.to(tl.int32) << (k * BITS))
        tl.store(out_ptr + obase[:, None] + bcols[None, :], acc.to(tl.uint8), mask=bm)


@triton.jit
def _unpack_dequantize_kernel(
    in_ptr, scale_ptr, zero_ptr, out_ptr, R, N, NB,
    BITS: tl.constexpr, PER: tl.constexpr, QMAX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    s = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    ibase = rows.to(tl.int64) * NB
    obase = rows.to(tl.int64) * N
    for start in range(0, NB, BLOCK_B):
        bcols = start + tl.arange(0, BLOCK_B)
        bm = rmask[:, None] & (bcols[None, :] < NB)
        byte = tl.load(in_ptr + ibase[:, None] + bcols[None, :], mask=bm, other=0).to(tl.int32)
        for k in tl.static_range(PER):
            cols = bcols * PER + k
            q = (byte >> (k * BITS)) & QMAX
            x = q.to(tl.float32) * s[:, None] + z[:, None]
            tl.store(out_ptr + obase[:, None] + cols[None, :], x, mask=bm & (cols[None, :] < N))


def quantize_pack_triton(
    x: torch.Tensor, valid: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`latent_relay.kernels.reference.quantize_pack_ref`."""
    check_bits(bits)
    x = x.contiguous()
    rows, n = x.shape
    width = packed_width(n, bits)
    packed = torch.empty(rows, width, dtype=torch.uint8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float16, device=x.device)
    zero = torch.empty(rows, dtype=torch.float16, device=x.device)
    if rows == 0:
        return packed, scale, zero
    if x.dtype == torch.bfloat16:  # the interpreter's bf16 loads are unreliable; fp32 is exact for bf16
        x = x.float()
    v = valid.contiguous().view(torch.uint8) if valid is not None else x
    grid = (triton.cdiv(rows, BLOCK_R),)
    _quantize_pack_kernel[grid](
        x, v, packed, scale, zero, rows, n, width,
        HAS_VALID=valid is not None, BITS=bits, PER=8 // bits, QMAX=qmax(bits),
        BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_B=BLOCK_B,
    )  # fmt: skip
    return packed, scale, zero


def unpack_dequantize_triton(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Triton twin of :func:`latent_relay.kernels.reference.unpack_dequantize_ref`."""
    check_bits(bits)
    packed = packed.contiguous()
    rows, width = packed.shape
    if width != packed_width(n, bits):
        raise ValueError(f"packed rows of {width} bytes cannot hold {n} codes of {bits} bits")
    store_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    out = torch.empty(rows, n, dtype=store_dtype, device=packed.device)
    if rows and n:
        grid = (triton.cdiv(rows, BLOCK_R),)
        _unpack_dequantize_kernel[grid](
            packed, scale.contiguous(), zero.contiguous(), out, rows, n, width,
            BITS=bits, PER=8 // bits, QMAX=qmax(bits), BLOCK_R=BLOCK_R, BLOCK_B=BLOCK_B,
        )  # fmt: skip
    return out.to(dtype)
