"""Device dispatch for the kernels: Triton on CUDA tensors, the torch reference twin elsewhere.

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
