"""Triton kernel for the gather of surviving tokens at the relay boundary.

For one layer's keys or values ``x`` ``[B, H, T, d]`` and per-(item, head) token indices ``index`` ``[B, H or 1, J]``
(a ``[B, 1, J]`` index is shared by every head), ``out[b, h, j] = x[b, h, index[b, h, j]]``; a negative index is a
padding slot whose row is zero. Same contract, bit for bit, as the torch twin
:func:`latent_relay.kernels.reference.gather_tokens_ref`.

A gather copies bits: the kernel moves the elements as integers of the same width (a bf16 tensor is read and
written through an int16 view), so no float arithmetic, and hence none of the interpreter's bf16 trouble, is
involved, and every dtype is copied exactly. Plain pointer arithmetic with masks over any strides of ``x`` and
``out``; one program copies ``BLOCK_J`` rows of one (item, head) in ``BLOCK_D``-wide chunks. Indices at or beyond
``T`` are not read (their rows are zero); they are a caller's error, which the twin raises on.

Importing this module imports ``triton``; :mod:`latent_relay.kernels.dispatch` imports it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_J = 32
MAX_BLOCK_D = 128

#: integer dtype of each element width: the kernel copies bits, never floats
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _gather_rows_kernel(
    x_ptr, idx_ptr, out_ptr, H, T, J, D,
    sxb, sxh, sxt, sxd, sib, sih, sij, sob, soh, soj, sod,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jm = js < J
    idx = tl.load(idx_ptr + b * sib + h * sih + js.to(tl.int64) * sij, mask=jm, other=-1).to(tl.int64)
    ok = jm & (idx >= 0) & (idx < T)
    src = x_ptr + b * sxb + h * sxh + tl.where(ok, idx, 0) * sxt
    dst = out_ptr + b * sob + h * soh + js.to(tl.int64) * soj
    for start in range(0, D, BLOCK_D):
        ds = start + tl.arange(0, BLOCK_D)
        dm = ds < D
        dsl = ds.to(tl.int64)
        row = tl.load(src[:, None] + dsl[None, :] * sxd, mask=ok[:, None] & dm[None, :], other=0)
        tl.store(dst[:, None] + dsl[None, :] * sod, row, mask=jm[:, None] & dm[None, :])


def gather_tokens_triton(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`latent_relay.kernels.reference.gather_tokens_ref` (``out``: any ``[B, H, J, d]``
    tensor of ``x``'s dtype to write into)."""
    b, h, t, d = x.shape
    j = index.shape[-1]
    if out is None:
        out = torch.empty(b, h, j, d, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if index.dtype not in (torch.int64, torch.int32):
        index = index.long()
    view = _BITS_VIEW[x.element_size()]
    xs, os_ = x.view(view), out.view(view)
    sih = 0 if index.shape[1] == 1 else index.stride(1)
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(d))
    grid = (b * h, triton.cdiv(j, BLOCK_J))
    _gather_rows_kernel[grid](
        xs, index, os_, h, t, j, d,
        *x.stride(), index.stride(0), sih, index.stride(2), *out.stride(),
        BLOCK_J=BLOCK_J, BLOCK_D=block_d,
    )  # fmt: skip
    return out
