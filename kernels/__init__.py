"""Triton kernels with plain-torch reference twins and a device dispatch (torch and triton only).

- :func:`quantize_pack` / :func:`unpack_dequantize`: row-wise KIVI-style asymmetric min-max quantization with
  bit packing (KIVI, arXiv 2402.02750). Triton on CUDA tensors, torch elsewhere; see :mod:`kernels.dispatch`.
- :mod:`kernels.obf`: the CPU steps of Orthogonal Backfill's fast solver (arXiv 2604.13349) in a C kernel
  (``cpu_obf.c``, built on first use by :mod:`kernels.native`), with plain-torch twins and a fallback to them.
"""

from kernels.dispatch import choose_backend, quantize_pack, unpack_dequantize
from kernels.reference import SUPPORTED_BITS, packed_width, qmax, quantize_pack_ref, unpack_dequantize_ref

__all__ = [
    "SUPPORTED_BITS",
    "choose_backend",
    "packed_width",
    "qmax",
    "quantize_pack",
    "quantize_pack_ref",
    "unpack_dequantize",
    "unpack_dequantize_ref",
]
