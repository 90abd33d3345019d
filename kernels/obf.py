"""Compiled CPU steps of Orthogonal Backfill's fast path (arXiv 2604.13349; METHODS.md section 3), ``cpu_obf.c``.

**Gram matrices of the evicted value rows.** For one layer's values ``v`` ``[B, H, T, d]``, an evicted-slot mask
``evict`` ``[B, H, T]`` and weights ``w`` ``[B, H, T]`` (zero off the evicted slots), per (item, head) problem
``p = b * H + h``::

    S[p] = Y_D^T Y_D     # [B * H, d, d], Y_D = the evicted rows in float32
    u[p] = w^T Y_D       # [B * H, d]

:func:`evicted_gram_ref` is the plain-torch reference; :func:`evicted_gram` runs the compiled CPU kernel
(one pass, the symmetric half only) where it applies and the reference elsewhere. The whole solve with and without
these kernels is timed by ``benchmarks/compression_overhead.py`` (its ``/torch`` rows).

**The residual Gram.** :func:`project_gram` turns ``S`` into ``G = P S P``, ``P = I - Q^T Q`` projecting out the
kept span (twin :func:`project_gram_ref`).

**Top-p eigenvectors of the residual Gram matrices.** :func:`top_directions_native` runs, per problem, the
orthogonal iteration of :func:`latent_relay.compression.backfill_solvers.top_directions_subspace` (its plain-torch
twin) with each problem's matrices kept in cache, Gram-Schmidt re-orthonormalisation and a Jacobi eigen-solve for
Rayleigh-Ritz, instead of a sequence of small batched torch and LAPACK calls.

``RELAY_KERNELS=torch`` (or ``backend="torch"``) forces the torch path; ``backend="native"`` raises
:class:`latent_relay.kernels.native.NativeKernelUnavailable` where the compiled kernel cannot run.
"""

from __future__ import annotations

import ctypes

import torch

from latent_relay.kernels import native
from latent_relay.kernels.dispatch import requested_backend

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def evicted_gram_ref(
    v: torch.Tensor,
    evict: torch.Tensor,
    w: torch.Tensor,
    buffer: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: ``(S [B*H, d, d], u [B*H, d])``; ``buffer`` an optional float32 ``[B, H, T, d]`` to reuse,
    ``out`` an optional ``[B*H, d, d]`` for ``S``."""
    b, h, t, d = v.shape
    if buffer is None:
        buffer = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    ym = torch.mul(v, evict[..., None], out=buffer).view(b * h, t, d)  # Y_D, zero off the evicted rows
    return torch.matmul(ym.mT, ym, out=out), torch.einsum("nt,ntd->nd", w.reshape(b * h, t).to(torch.float32), ym)


def _library() -> ctypes.CDLL | None:
    lib = native.load("cpu_obf")
    if lib is not None and not getattr(lib, "_relay_typed", False):
        lib.evicted_gram.restype = ctypes.c_int
        lib.evicted_gram.argtypes = [ctypes.c_void_p, ctypes.c_int, *[ctypes.c_int64] * 4, *[ctypes.c_int] * 3]
        lib.evicted_gram.argtypes += [ctypes.c_void_p] * 4
        lib.project_gram.restype = ctypes.c_int
        lib.project_gram.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        lib.top_directions.restype = ctypes.c_int
        lib.top_directions.argtypes = [ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_int] * 4, ctypes.c_void_p]
        lib.top_directions.argtypes += [ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
        lib._relay_typed = True
    return lib


def _native_or_none(backend: str | None, applies: bool, what: str) -> ctypes.CDLL | None:
    """The kernel library where it is asked for (``"auto"`` or ``"native"``; :func:`requested_backend`) and applies."""
    choice = requested_backend(backend)
    lib = _library() if choice != "torch" and applies else None
    if lib is None and choice == "native":
        raise native.NativeKernelUnavailable(f"the compiled {what} kernel does not run here")
    return lib


def _evicted_gram_applies(v: torch.Tensor) -> bool:
    """Whether :func:`evicted_gram` can take the compiled kernel for values ``v`` (before building it)."""
    d = v.shape[-1]
    return v.device.type == "cpu" and v.dtype in _DTYPE_CODES and d > 0 and d % 16 == 0 and v.stride(-1) == 1


def evicted_gram(
    v: torch.Tensor,
    evict: torch.Tensor,
    w: torch.Tensor,
    *,
    backend: str | None = None,
    buffer: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, u)`` as :func:`evicted_gram_ref`, by the compiled CPU kernel where it applies (``backend`` ``"auto"``,
    the default, or ``"native"``, which raises where the kernel cannot run) and by the reference with ``"torch"``
    (or ``RELAY_KERNELS=torch``). ``buffer`` is the reference's scratch space, ``out`` an optional contiguous float32
    ``[B*H, d, d]`` for ``S``."""
    b, h, t, d = v.shape
    if evict.shape != (b, h, t) or w.shape != (b, h, t):
        raise ValueError(f"evict {tuple(evict.shape)} and w {tuple(w.shape)} must both be {(b, h, t)}")
    lib = _native_or_none(backend, _evicted_gram_applies(v), "evicted-Gram")
    if lib is None:
        return evicted_gram_ref(v, evict, w, buffer, out)
    ev = evict.to(torch.uint8).contiguous()
    wc = w.to(torch.float32).contiguous()
    s = torch.empty(b * h, d, d) if out is None else out
    if s.shape != (b * h, d, d) or s.dtype != torch.float32 or not s.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 {(b * h, d, d)} tensor")
    u = torch.empty(b * h, d)
    status = lib.evicted_gram(
        v.data_ptr(), _DTYPE_CODES[v.dtype], v.stride(0), v.stride(1), v.stride(2), b * h, h, t, d,
        ev.data_ptr(), wc.data_ptr(), s.data_ptr(), u.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"compiled evicted-Gram kernel failed (status {status})")
    return s, u


def project_gram_ref(gram: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
    """In place: ``G = P S P`` with ``P = I - Q^T Q`` for ``gram`` ``S`` ``[N, d, d]`` and ``qt`` ``Q^T`` ``[N, k, d]``,
    as ``S - (E + E^T)`` with ``E = (S Q^T - Q^T Q S Q^T / 2) Q`` (``d x d x k`` products, ``R`` never formed)."""
    a = gram @ qt.mT  # S Q^T  [N, d, k]
    a.sub_(qt.mT @ (qt @ a), alpha=0.5)  # A = S Q^T - Q^T Q S Q^T / 2, E = A Q
    return gram.baddbmm_(a, qt, alpha=-1).baddbmm_(qt.mT, a.mT, alpha=-1)  # S - E - E^T, inside the two products


def project_gram(gram: torch.Tensor, qt: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """:func:`project_gram_ref` (in place, returns ``gram``), by the compiled CPU kernel where it applies: CPU
    float32, contiguous, ``d % 16 == 0``. The kernel keeps ``G`` exactly symmetric."""
    n, d = gram.shape[0], gram.shape[-1]
    k = qt.shape[1]
    applies = (
        gram.device.type == "cpu"
        and gram.dtype == qt.dtype == torch.float32
        and gram.shape == (n, d, d)
        and qt.shape == (n, k, d)
        and gram.is_contiguous()
        and d > 0
        and d % 16 == 0
    )
    lib = _native_or_none(backend, applies, "kept-span projection")
    if lib is None:
        return project_gram_ref(gram, qt)
    q = qt.contiguous()
    status = lib.project_gram(gram.data_ptr(), q.data_ptr(), n, d, k)
    if status != 0:
        raise RuntimeError(f"compiled kept-span projection kernel failed (status {status})")
    return gram


def top_directions_native(
    gram: torch.Tensor, p: int, start: torch.Tensor, reps: int, steep_ratio: float, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-``p`` eigenvectors of each symmetric PSD ``gram`` ``[N, d, d]`` (float32) as rows ``[N, p, d]`` and a
    bool ``[N]`` marking steep spectra (p-th Ritz value below ``steep_ratio`` of the first; solve those with eigh).

    From ``start`` ``[width, d]`` (orthonormal rows), ``reps`` products with ``G^2``, each re-orthonormalised, then
    Rayleigh-Ritz with ``G``: :func:`latent_relay.compression.backfill_solvers.top_directions_subspace`'s iteration
    with ``orth_every=2`` and ``iterations = 2 * reps``. ``None`` where the torch path is to be taken (CPU float32
    and ``d % 16 == 0`` only).
    """
    n, d = gram.shape[0], gram.shape[-1]
    width = start.shape[0]
    applies = (
        gram.device.type == "cpu"
        and gram.dtype == torch.float32
        and gram.shape == (n, d, d)
        and d > 0
        and d % 16 == 0
        and 0 < p <= width <= d
        and start.shape == (width, d)
        and reps >= 1
    )
    lib = _native_or_none(backend, applies, "top-directions")
    if lib is None:
        return None
    g = gram.contiguous()
    z0 = start.to(device="cpu", dtype=torch.float32).contiguous()
    c = torch.empty(n, p, d)
    steep = torch.empty(n, dtype=torch.uint8)
    status = lib.top_directions(
        g.data_ptr(), n, d, p, width, reps, z0.data_ptr(), steep_ratio, c.data_ptr(), steep.data_ptr()
    )
    if status != 0:
        raise RuntimeError(f"compiled top-directions kernel failed (status {status})")
    return c, steep.bool()
