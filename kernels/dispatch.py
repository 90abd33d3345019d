"""Device dispatch for the kernels: Triton on CUDA tensors, the torch reference twin elsewhere.

The kernels: KIVI quantize + pack and its inverse (:mod:`latent_relay.kernels.triton_quant`), the gather of surviving
tokens (:mod:`latent_relay.kernels.triton_gather`) and Orthogonal Backfill's matrix-shaped steps -- the weighted
residual mean, the projection onto the principal directions and the injection into the kept values
(:mod:`latent_relay.kernels.triton_backfill`); their twins are in :mod:`latent_relay.kernels.reference`.

``backend`` (argument) or the ``RELAY_KERNELS`` environment variable picks the path: ``"auto"`` (default),
``"triton"`` (force the Triton kernels, e.g. on CPU tensors under ``TRITON_INTERPRET=1``) or ``"torch"`` (also
skips the compiled CPU kernels of :mod:`latent_relay.kernels.obf`).
Triton is imported only when the Triton path is taken, so ``TRITON_INTERPRET`` can be set late.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from latent_relay.kernels import reference

#: "native": the compiled CPU kernels (:mod:`latent_relay.kernels.obf`) where they apply; the quantizers, which have
#: none, read it as "auto"; "triton" means "auto" for the compiled CPU kernels, which have no Triton twin
BACKENDS = ("auto", "triton", "torch", "native")
ENV_VAR = "RELAY_KERNELS"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@contextmanager
def backend_override(value: str) -> Iterator[None]:
    """``RELAY_KERNELS=value`` for the duration of the block (e.g. ``"torch"`` to time or test the torch twins)."""
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: ``backend``, else ``RELAY_KERNELS``, else ``"auto"``; one of :data:`BACKENDS`."""
    choice = backend or os.environ.get(ENV_VAR, "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {choice!r}")
    return choice


def choose_backend(tensor: torch.Tensor, backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for an operation on ``tensor``."""
    choice = requested_backend(backend)
    if choice in ("auto", "native"):
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("the Triton kernel path was requested but triton is not installed")
    return choice


def quantize_pack(
    x: torch.Tensor, valid: torch.Tensor | None, bits: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise KIVI quantize + pack (see :mod:`latent_relay.kernels.reference`).

    Returns ``(packed uint8 [rows, bytes], scale fp16 [rows], zero fp16 [rows])``.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a [rows, n] matrix, got shape {tuple(x.shape)}")
    if valid is not None and valid.shape != x.shape:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match {tuple(x.shape)}")
    if choose_backend(x, backend) == "triton":
        from latent_relay.kernels.triton_quant import quantize_pack_triton

        return quantize_pack_triton(x, None if valid is None else valid.bool(), bits)
    return reference.quantize_pack_ref(x, None if valid is None else valid.bool(), bits)


def unpack_dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    n: int,
    dtype: torch.dtype,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_pack`: ``[rows, n]`` in ``dtype``."""
    if packed.dim() != 2 or scale.shape != (packed.shape[0],) or zero.shape != scale.shape:
        raise ValueError("packed must be [rows, bytes] with one scale and one zero per row")
    if choose_backend(packed, backend) == "triton":
        from latent_relay.kernels.triton_quant import unpack_dequantize_triton

        return unpack_dequantize_triton(packed, scale, zero, bits, n, dtype)
    return reference.unpack_dequantize_ref(packed, scale, zero, bits, n, dtype)


# ------------------------------------------------------------------------------------------- the relay boundary
def _check_layer(x: torch.Tensor, what: str) -> tuple[int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"expected {what} [B, H, T, d], got shape {tuple(x.shape)}")
    b, h, t, d = x.shape
    return b, h, t, d


def _check_index(index: torch.Tensor, b: int, h: int, what: str) -> None:
    if index.dim() != 3 or index.shape[0] != b or index.shape[1] not in (1, h):
        raise ValueError(f"{what} must be [B, H or 1, J] with B={b}, H={h}, got shape {tuple(index.shape)}")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token indices, not {index.dtype}")


def gather_tokens(
    x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """Gather of surviving tokens: ``x[b, h, index[b, h, j]]`` ``[B, H, J, d]`` for one layer's keys or values ``x``
    ``[B, H, T, d]`` and ``index`` ``[B, H or 1, J]`` (negative: padding, a zero row); written into ``out`` when
    given (see :func:`latent_relay.kernels.reference.gather_tokens_ref`, which is what runs on CPU)."""
    b, h, _, d = _check_layer(x, "keys or values")
    _check_index(index, b, h, "index")
    if out is not None and (out.shape != (b, h, index.shape[-1], d) or out.dtype != x.dtype):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} does not fit the gathered rows of {x.dtype}")
    if choose_backend(x, backend) == "triton":
        from latent_relay.kernels.triton_gather import gather_tokens_triton

        return gather_tokens_triton(x, index, out)
    return reference.gather_tokens_ref(x, index, out)


def residual_mean(
    v: torch.Tensor,
    evict: torch.Tensor,
    w: torch.Tensor,
    qt: torch.Tensor | None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthogonal Backfill's residual of the evicted values ``Y`` against the kept span and its weighted mean, per
    (item, head) of one layer: ``(r = w^T R [B*H, d], ||R||_F^2 [B*H], ||Y||_F^2 [B*H])`` with
    ``R = Y - (Y Q^T) Q`` (see :func:`latent_relay.kernels.reference.residual_mean_ref`)."""
    b, h, t, d = _check_layer(v, "values")
    if evict.shape != (b, h, t) or w.shape != (b, h, t):
        raise ValueError(f"evict {tuple(evict.shape)} and w {tuple(w.shape)} must both be {(b, h, t)}")
    if qt is not None and (qt.dim() != 3 or qt.shape[0] != b * h or qt.shape[2] != d):
        raise ValueError(f"qt must be [B*H, k, d] = [{b * h}, k, {d}], got shape {tuple(qt.shape)}")
    if choose_backend(v, backend) == "triton":
        from latent_relay.kernels.triton_backfill import residual_mean_triton

        return residual_mean_triton(v, evict.bool(), w, qt)
    return reference.residual_mean_ref(v, evict.bool(), w, qt)


def backfill_shift(
    r: torch.Tensor,
    c: torch.Tensor | None,
    alpha: torch.Tensor,
    applied: torch.Tensor,
    full: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Orthogonal Backfill's projection onto the principal residual directions, scaled:
    ``applied ? alpha * (r C^T) C : 0`` ``[N, d]`` (see :func:`latent_relay.kernels.reference.backfill_shift_ref`)."""
    if r.dim() != 2:
        raise ValueError(f"expected r [N, d], got shape {tuple(r.shape)}")
    n, d = r.shape
    if c is not None and (c.dim() != 3 or c.shape[0] != n or c.shape[2] != d):
        raise ValueError(f"C must be [N, p, d] = [{n}, p, {d}], got shape {tuple(c.shape)}")
    for name, t in (("alpha", alpha), ("applied", applied), ("full", full)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must be [N] = [{n}], got shape {tuple(t.shape)}")
    if choose_backend(r, backend) == "triton":
        from latent_relay.kernels.triton_backfill import backfill_shift_triton

        return backfill_shift_triton(r, c, alpha, applied.bool(), None if full is None else full.bool())
    return reference.backfill_shift_ref(r, c, alpha, applied.bool(), None if full is None else full.bool())


def inject_rows(
    v: torch.Tensor,
    slots: torch.Tensor,
    shift: torch.Tensor,
    token_scale: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Orthogonal Backfill's injection, in place: ``v[b, h, slots[b, h, j]] += shift[b, h] * token_scale[b, h, j]``
    (fp32 sum, one rounding to ``v``'s dtype; negative slots are padding). Returns ``v`` (see
    :func:`latent_relay.kernels.reference.inject_rows_ref`)."""
    b, h, _, d = _check_layer(v, "values")
    _check_index(slots, b, h, "slots")
    k = slots.shape[-1]
    if shift.shape != (b, h, d) or token_scale.shape != (b, h, k):
        raise ValueError(f"shift {tuple(shift.shape)} and token_scale {tuple(token_scale.shape)} must be "
                         f"{(b, h, d)} and {(b, h, k)}")  # fmt: skip
    if not v.is_contiguous():
        raise ValueError("inject_rows edits v in place and needs it contiguous")
    if choose_backend(v, backend) == "triton":
        from latent_relay.kernels.triton_backfill import inject_rows_triton

        return inject_rows_triton(v, slots, shift, token_scale)
    return reference.inject_rows_ref(v, slots, shift, token_scale)
