"""Triton kernels for the matrix-shaped steps of Orthogonal Backfill (OBF, arXiv 2604.13349; METHODS.md section 3).

For each (item, KV head) problem ``n = b * H + h`` of one layer, with the evicted rows ``Y`` of the values, their
weights ``w_hat``, the kept-span basis ``Q^T`` (``k x d``, orthonormal rows), the top-``p`` residual directions ``C``
(``p x d``) and the scale ``alpha``:

- :func:`residual_mean_triton` -- the residual of the evicted values against the kept span and its weighted mean:
  ``R = Y - (Y Q^T) Q``, ``r = w_hat^T R``, ``||R||_F^2`` and ``||Y||_F^2``, streaming ``Y`` from the layer's values
  (any strides and float dtype) in ``BLOCK_T``-row tiles, ``R`` never stored (two ``tl.dot`` per tile, IEEE fp32).
- :func:`backfill_shift_triton` -- the projection onto the principal directions and the scale:
  ``shift = applied ? alpha * (r C^T) C : 0`` (``r`` itself where ``C`` spans the whole residual).
- :func:`inject_rows_triton` -- the injection, in place: ``V[b, h, slot_j] = V[b, h, slot_j] + shift[b, h] *
  token_scale[b, h, j]`` in fp32, rounded once to the values' dtype; a negative slot is padding and is left alone.

The eigen/SVD/subspace-iteration steps that find ``Q`` and ``C`` are small (``k x d`` and ``d x d`` per problem,
rank 2-4) and stay in torch (:mod:`latent_relay.compression.backfill_solvers`). Twins: the ``*_ref`` functions of
:mod:`latent_relay.kernels.reference`. The injection matches its twin bit for bit (fp32 multiply, fp32 add, one
round-to-nearest-even; launched with ``enable_fp_fusion=False`` so no FMA fuses the two); the two reductions match
theirs to fp32 rounding (their sums run in another order).

bf16 values are read and written through an int16 view, the conversion done on the bits (exact, and the same under
``TRITON_INTERPRET=1``, whose bf16 arithmetic is unreliable); all arithmetic is fp32 after every load.

Importing this module imports ``triton``; :mod:`latent_relay.kernels.dispatch` imports it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 32
BLOCK_K = 16
BLOCK_N = 16
BLOCK_S = 16


@triton.jit
def _bf16_bits_to_f32(bits):
    """int16 bit patterns of bf16 values -> float32 (exact)."""
    return ((bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_bits(x):
    """float32 -> int16 bit patterns of bf16, rounded to nearest even (NaN -> the quiet NaN 0x7FC0), like torch."""
    u = x.to(tl.int32, bitcast=True)
    bits = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16) & 0xFFFF
    bits = tl.where(x != x, 0x7FC0, bits)
    return bits.to(tl.int16)


@triton.jit
def _load_f32(ptr, mask, IS_BF16: tl.constexpr):
    if IS_BF16:
        return _bf16_bits_to_f32(tl.load(ptr, mask=mask, other=0))
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _residual_mean_kernel(
    v_ptr, e_ptr, w_ptr, q_ptr, r_ptr, r2_ptr, y2_ptr, H, T, K, D,
    svb, svh, svt, svd,
    HAS_Q: tl.constexpr, IS_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = pid.to(tl.int64)
    vbase = v_ptr + (pid // H).to(tl.int64) * svb + (pid % H).to(tl.int64) * svh
    ds = tl.arange(0, BLOCK_D)
    dm = ds < D
    dsl = ds.to(tl.int64)
    r_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    r2_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    y2_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        ts = start + tl.arange(0, BLOCK_T)
        tm = ts < T
        e = tl.load(e_ptr + n * T + ts, mask=tm, other=0)
        m = tm & (e != 0)
        w = tl.load(w_ptr + n * T + ts, mask=m, other=0.0)
        y = _load_f32(vbase + ts.to(tl.int64)[:, None] * svt + dsl[None, :] * svd, m[:, None] & dm[None, :], IS_BF16)
        y2_acc += tl.sum(y * y, axis=1)
        res = y
        if HAS_Q:
            proj = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                qm = (ks < K)[:, None] & dm[None, :]
                q = tl.load(q_ptr + (n * K + ks)[:, None] * D + ds[None, :], mask=qm, other=0.0)
                coef = tl.dot(y, tl.trans(q), input_precision="ieee")  # Y Q^T  [BLOCK_T, BLOCK_K]
                proj += tl.dot(coef, q, input_precision="ieee")  # (Y Q^T) Q  [BLOCK_T, BLOCK_D]
            res = y - proj
        r2_acc += tl.sum(res * res, axis=1)
        r_acc += tl.sum(w[:, None] * res, axis=0)
    tl.store(r_ptr + n * D + ds, r_acc, mask=dm)
    tl.store(r2_ptr + n, tl.sum(r2_acc, axis=0))
    tl.store(y2_ptr + n, tl.sum(y2_acc, axis=0))


@triton.jit
def _backfill_shift_kernel(
    r_ptr, c_ptr, a_ptr, ap_ptr, f_ptr, out_ptr, N, P, D,
    HAS_C: tl.constexpr, HAS_FULL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N
    rl = rows.to(tl.int64)
    ds = tl.arange(0, BLOCK_D)
    m = rm[:, None] & (ds < D)[None, :]
    r = tl.load(r_ptr + rl[:, None] * D + ds[None, :], mask=m, other=0.0)
    delta = r
    if HAS_C:
        delta = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for p in range(0, P):
            c = tl.load(c_ptr + (rl * P + p)[:, None] * D + ds[None, :], mask=m, other=0.0)
            delta += tl.sum(r * c, axis=1)[:, None] * c  # (r . c_p) c_p
        if HAS_FULL:
            full = tl.load(f_ptr + rows, mask=rm, other=0) != 0
            delta = tl.where(full[:, None], r, delta)
    alpha = tl.load(a_ptr + rows, mask=rm, other=0.0)
    applied = tl.load(ap_ptr + rows, mask=rm, other=0) != 0
    shift = tl.where(applied[:, None], alpha[:, None] * delta, 0.0)
    tl.store(out_ptr + rl[:, None] * D + ds[None, :], shift, mask=m)


@triton.jit
def _inject_rows_kernel(
    v_ptr, s_ptr, shift_ptr, ts_ptr, H, T, K, D,
    svb, svh, svt, svd, ssb, ssh, ssk,
    IS_BF16: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = pid.to(tl.int64)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    km = ks < K
    slot = tl.load(s_ptr + b * ssb + h * ssh + ks.to(tl.int64) * ssk, mask=km, other=-1).to(tl.int64)
    ok = km & (slot >= 0) & (slot < T)
    scale = tl.load(ts_ptr + n * K + ks, mask=km, other=0.0)
    rows = v_ptr + b * svb + h * svh + tl.where(ok, slot, 0)[:, None] * svt
    for start in range(0, D, BLOCK_D):
        ds = start + tl.arange(0, BLOCK_D)
        dm = ds < D
        m = ok[:, None] & dm[None, :]
        ptr = rows + ds.to(tl.int64)[None, :] * svd
        shift = tl.load(shift_ptr + n * D + ds, mask=dm, other=0.0)
        add = shift[None, :] * scale[:, None]
        new = _load_f32(ptr, m, IS_BF16) + add
        if IS_BF16:
            tl.store(ptr, _f32_to_bf16_bits(new), mask=m)
        else:
            tl.store(ptr, new.to(v_ptr.dtype.element_ty), mask=m)


def _values_view(v: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The tensor the kernels address (bf16 through an int16 view) and whether it is bf16."""
    if v.dtype == torch.bfloat16:
        return v.view(torch.int16), True
    if v.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"the OBF kernels take float32, float16 or bfloat16 values, not {v.dtype}")
    return v, False


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def residual_mean_triton(
    v: torch.Tensor, evict: torch.Tensor, w: torch.Tensor, qt: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`latent_relay.kernels.reference.residual_mean_ref`."""
    b, h, t, d = v.shape
    n = b * h
    r = torch.empty(n, d, dtype=torch.float32, device=v.device)
    r2 = torch.empty(n, dtype=torch.float32, device=v.device)
    y2 = torch.empty(n, dtype=torch.float32, device=v.device)
    if n == 0 or d == 0:
        return r.zero_(), r2.zero_(), y2.zero_()
    vs, is_bf16 = _values_view(v)
    e = evict.reshape(n, t).to(torch.uint8).contiguous()
    wc = w.reshape(n, t).to(torch.float32).contiguous()
    k = 0 if qt is None else qt.shape[1]
    q = e if qt is None else qt.to(torch.float32).contiguous()
    _residual_mean_kernel[(n,)](
        vs, e, wc, q, r, r2, y2, h, t, k, d, *v.stride(),
        HAS_Q=qt is not None, IS_BF16=is_bf16, BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BLOCK_D=_block_d(d),
    )  # fmt: skip
    return r, r2, y2


def backfill_shift_triton(
    r: torch.Tensor, c: torch.Tensor | None, alpha: torch.Tensor, applied: torch.Tensor, full: torch.Tensor | None
) -> torch.Tensor:
    """Triton twin of :func:`latent_relay.kernels.reference.backfill_shift_ref`."""
    n, d = r.shape
    out = torch.empty(n, d, dtype=torch.float32, device=r.device)
    if n == 0 or d == 0:
        return out
    rc = r.to(torch.float32).contiguous()
    cc = rc if c is None else c.to(torch.float32).contiguous()
    p = 0 if c is None else c.shape[1]
    ap = applied.to(torch.uint8).contiguous()
    fu = ap if full is None else full.to(torch.uint8).contiguous()
    _backfill_shift_kernel[(triton.cdiv(n, BLOCK_N),)](
        rc, cc, alpha.to(torch.float32).contiguous(), ap, fu, out, n, p, d,
        HAS_C=c is not None, HAS_FULL=c is not None and full is not None, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(d),
    )  # fmt: skip
    return out


def inject_rows_triton(
    v: torch.Tensor, slots: torch.Tensor, shift: torch.Tensor, token_scale: torch.Tensor
) -> torch.Tensor:
    """Triton twin of :func:`latent_relay.kernels.reference.inject_rows_ref` (edits ``v`` in place, returns it)."""
    b, h, t, d = v.shape
    k = slots.shape[-1]
    if b * h * k * d == 0:
        return v
    vs, is_bf16 = _values_view(v)
    if slots.dtype not in (torch.int64, torch.int32):
        slots = slots.long()
    ssh = 0 if slots.shape[1] == 1 else slots.stride(1)
    sh = shift.to(torch.float32).expand(b, h, d).contiguous()
    sc = token_scale.to(torch.float32).expand(b, h, k).contiguous()
    _inject_rows_kernel[(b * h, triton.cdiv(k, BLOCK_S))](
        vs, slots, sh, sc, h, t, k, d, *v.stride(), slots.stride(0), ssh, slots.stride(2),
        IS_BF16=is_bf16, BLOCK_S=BLOCK_S, BLOCK_D=min(128, _block_d(d)), enable_fp_fusion=False,
    )  # fmt: skip
    return v
