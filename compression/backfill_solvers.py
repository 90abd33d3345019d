"""The solvers of Orthogonal Backfill (OBF, arXiv 2604.13349; METHODS.md §3): for every (item, layer, KV head)
problem at once, the kept-span basis ``Q``, the residual ``R = Y - Y Q Q^T`` reduced to ``r = w_hat^T R`` and
``||R||_F``, and the top-``p`` right singular vectors ``C`` of ``R``.

``exact`` (:func:`solve_exact`): batched Householder QR + SVD in fp32. ``subspace`` and ``eigh``
(:func:`solve_gram`): a group of layers at a time, each layer's (item, head) problems in one batch with reused
buffers, a Cholesky-QR kept basis (:func:`kept_basis`), the residual Gram ``R^T R = P (Y_D^T Y_D) P`` without forming
``R`` (:func:`layer_residual_gram`), then either batched subspace iteration (cheap ridge Cholesky-QR between steps)
with Rayleigh-Ritz, problems with a steep spectrum handed to eigh (:func:`top_directions_subspace`), or a batched
eigen-solve of the same Gram matrices (:func:`top_directions_eigh`). On a CPU, ``Y_D^T Y_D``, ``P S P`` and the
iteration run in the compiled kernels of :mod:`latent_relay.kernels.obf` where they apply, this module's torch code
being their twin. :mod:`latent_relay.compression.backfill` configures the solvers and injects what they return.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from latent_relay.kernels.obf import evicted_gram, project_gram, top_directions_native

if TYPE_CHECKING:
    from latent_relay.compression.backfill import BackfillConfig


def use_all_components(cfg: BackfillConfig, d: int) -> bool:
    """Whether ``delta`` keeps every residual component (``rank`` is ``None`` or at least ``d``)."""
    return cfg.rank is None or cfg.rank >= d


# -------------------------------------------------------------------------------------- orthonormal bases
def kept_basis(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the kept span, ``Q^T`` as ``[N, k, d]`` (rows beyond ``kept`` are zero).

    Cholesky QR: ``A = X X^T`` in float64, ``Q^T = L^-1 X``. Problems where that basis is not orthonormal to
    1e-4 (rank-deficient or ill-conditioned kept values, ``k > d``) fall back to Householder QR.
    """
    n, k, d = x.shape
    if k == 0:
        return x
    valid = torch.arange(k, device=x.device)[None, :] < kept[:, None]
    x64 = x.double()
    a = x64 @ x64.mT
    a.diagonal(dim1=-2, dim2=-1).add_((~valid).to(a.dtype))
    chol, info = torch.linalg.cholesky_ex(a)
    eye = torch.eye(k, dtype=a.dtype, device=x.device).expand(n, k, k)
    qt = torch.linalg.solve_triangular(chol, eye, upper=False).to(x.dtype) @ x  # L^-1 (k x k) applied by a matmul
    # ill-conditioned kept values lose orthogonality in fp32: check Q^T Q = I (cheap, k x k) and fall back
    gram = qt @ qt.mT
    gram.diagonal(dim1=-2, dim2=-1).sub_(valid.to(qt.dtype))
    off = torch.nan_to_num(gram.abs_(), nan=1.0).amax(dim=(1, 2))
    bad = (info != 0) | (off > 1e-4)
    if bool(bad.any()):
        qt = qt.clone()
        qt[bad] = householder_basis(x[bad], kept[bad])
    return qt * valid[..., None]


def _orthonormalize_rows(w: torch.Tensor) -> torch.Tensor:
    """Roughly orthonormal rows spanning the rows of ``w`` ``[N, m, d]``: the cheap inner step of subspace
    iteration. One row-scaled Cholesky QR (the ``m x m`` parts in float64) with a 1e-5 ridge, so that it never fails
    and zero rows stay zero; where the rows are ill-conditioned the result is orthonormal only roughly. That is
    enough between iteration steps, whose later products damp the error; the last step uses a full QR.
    Householder QR covers problems whose factorization still fails (non-finite rows)."""
    n, m, _ = w.shape
    eye = torch.eye(m, dtype=torch.float64, device=w.device).expand(n, m, m)
    z = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    gram = (z @ z.mT).double()
    gram.diagonal(dim1=-2, dim2=-1).add_(1e-5)
    chol, info = torch.linalg.cholesky_ex(gram)
    inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    z = torch.nan_to_num(inv.to(w.dtype)) @ z
    bad = info != 0
    if bool(bad.any()):
        z = z.clone()
        z[bad] = torch.linalg.qr(w[bad].mT).Q.mT
    return z


def householder_basis(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``Q^T`` ``[N, k, d]`` from ``torch.linalg.qr(X^T)``, columns beyond ``kept`` zeroed (the exact path)."""
    n, k, d = x.shape
    q = torch.linalg.qr(x.mT).Q  # [N, d, min(d, k)]
    q = q * (torch.arange(q.shape[-1], device=x.device)[None, :] < kept[:, None])[:, None, :]
    qt = x.new_zeros(n, k, d)
    qt[:, : q.shape[-1]] = q.mT
    return qt


# -------------------------------------------------------------------------------------- top-p directions
def _start_block(d: int, width: int, seed: int, device, dtype) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(d, width, generator=gen, dtype=torch.float64)
    return torch.linalg.qr(z).Q.to(device=device, dtype=dtype)


#: below this ratio of the p-th to the first Ritz value, the subspace solver hands a problem to eigh (see below)
STEEP_SPECTRUM = 1e-2


def top_directions_subspace(
    gram: torch.Tensor, p: int, cfg: BackfillConfig, backend: str | None = None
) -> torch.Tensor:
    """Top-``p`` eigenvectors of symmetric PSD ``gram`` ``[N, d, d]`` as rows ``[N, p, d]``.

    Orthogonal (subspace) iteration of width ``p + oversample`` from a fixed seeded start block, re-orthonormalised
    every ``orth_every`` steps, then Rayleigh-Ritz (METHODS.md §3 fast path), all problems in one batch. With the
    default ``orth_every=2`` the two products between re-orthonormalisations are one product with ``G^2``; that
    case runs in the compiled CPU kernel (:func:`latent_relay.kernels.obf.top_directions_native`) where it applies, this
    torch code being its twin (``backend="torch"`` or ``RELAY_KERNELS=torch`` forces it).
    """
    n, d, _ = gram.shape
    width = min(d, p + cfg.oversample)
    if cfg.orth_every == 2 and cfg.iterations % 2 == 0 and cfg.iterations >= 2:
        start = _start_block(d, width, cfg.seed, "cpu", torch.float32).mT
        native = top_directions_native(gram, p, start, cfg.iterations // 2, STEEP_SPECTRUM, backend=backend)
        if native is not None:
            c, steep = native
            steep = steep.nonzero().squeeze(1)
            if steep.numel():
                c[steep] = top_directions_eigh(gram[steep], p)
            return c
    # Iterates are kept transposed (zt = Z^T, row-major), so Z = zt.mT is column-major, the layout LAPACK's QR
    # wants (no copies); G is symmetric, so (G Z)^T = Z^T G.
    zt = _start_block(d, width, cfg.seed, gram.device, gram.dtype).mT.expand(n, width, d)
    step, reps = gram, cfg.iterations
    if cfg.orth_every == 2 and cfg.iterations % 2 == 0:
        step, reps = gram @ gram, cfg.iterations // 2
    for i in range(reps):
        zt = zt @ step
        if i + 1 == reps:
            zt = torch.linalg.qr(zt.mT).Q.mT
        elif step is not gram or (i + 1) % cfg.orth_every == 0:
            zt = _orthonormalize_rows(zt)
    t = (zt @ gram) @ zt.mT
    theta, u = torch.linalg.eigh(torch.nan_to_num(0.5 * (t + t.mT)))
    c = u[..., -p:].mT @ zt
    # Products with G^2 square the spread of the spectrum: where the p-th Ritz value is below STEEP_SPECTRUM of the
    # first, float32 rounding in them drowns the p-th direction (a steep spectrum, often with a wide gap at p).
    # Those problems, rare in real caches, are solved by eigh instead.
    steep = (theta[..., -p] < STEEP_SPECTRUM * theta[..., -1]).nonzero().squeeze(1)
    if steep.numel():
        c[steep] = top_directions_eigh(gram[steep], p)
    return c


def top_directions_eigh(gram: torch.Tensor, p: int, solvable: torch.Tensor | None = None) -> torch.Tensor:
    """Top-``p`` eigenvectors of ``gram`` ``[N, d, d]`` from one batched ``torch.linalg.eigh``: ``[N, p, d]``."""
    if solvable is not None:
        gram = torch.where(solvable[:, None, None], gram, torch.zeros((), dtype=gram.dtype, device=gram.device))
    _, u = torch.linalg.eigh(0.5 * (gram + gram.mT))
    return u[..., -p:].mT


# ------------------------------------------------------------------------------------------ the solvers
def solve_exact(x, qt, y, w_hat_d, cfg):
    """Batched QR + SVD path: returns (r, C or None, ||R||_F, ||Y||_F) per problem."""
    r_mat = y - (y @ qt.mT) @ qt if cfg.project else y
    r = torch.einsum("nj,njd->nd", w_hat_d, r_mat)
    c = None
    if not use_all_components(cfg, y.shape[-1]) and y.shape[1] > 0:
        vh = torch.linalg.svd(r_mat, full_matrices=False).Vh
        c = vh[:, : cfg.rank]
    return r, c, torch.linalg.matrix_norm(r_mat), torch.linalg.matrix_norm(y)


def _prompt_span(prompt: torch.Tensor) -> tuple[int, int]:
    """First and one-past-last token slot that is a prompt slot of any item."""
    cols = prompt.any(dim=0).nonzero()
    return (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0)


def layer_residual_gram(
    v: torch.Tensor,
    evict: torch.Tensor,
    w_hat: torch.Tensor,
    qt: torch.Tensor | None,
    buffer: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    kept_values: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """One layer's problems: the Gram ``G = R^T R`` ``[N, d, d]`` of the residual ``R = Y_D - Y_D Q^T Q`` of the
    evicted rows, ``r = w_hat^T R`` ``[N, d]``, ``||R||_F^2`` and ``||Y_D||_F^2`` ``[N]``.

    ``v`` ``[B, H, T, d]`` are the layer's values over the prompt span, ``evict`` ``[B, H, T]`` the evicted slots,
    ``w_hat`` ``[B, H, T]`` (zero off the evicted slots), ``qt`` ``Q^T`` ``[N, k, d]`` (``None``: no projection,
    ``R = Y_D``), ``buffer`` an optional float32 ``[B, H, T, d]`` to reuse, ``out`` an optional ``[N, d, d]`` for the
    Gram. ``R`` is never formed: with
    ``S = Y_D^T Y_D`` and ``P = I - Q^T Q``, ``G = P S P = S - (E + E^T)`` with ``E = (S Q^T - Q^T Q S Q^T / 2) Q``
    (``d x d x k`` products instead of two ``T x d x k`` ones). Where ``||R||`` is below a tenth of ``||Y_D||``
    that difference of large terms loses digits in float32, so those problems are recomputed from ``R`` itself;
    given ``kept_values`` (the kept values ``[N, k, d]`` behind ``qt`` and their counts ``[N]``), from a Householder
    basis of them, since ``qt`` from :func:`kept_basis` is orthonormal only to ~1e-4 of ``||Y_D||``, which is most
    of a small residual.
    """
    b, h, t, d = v.shape
    gram, u = evicted_gram(v, evict, w_hat, buffer=buffer, out=out)  # S, w_hat^T Y_D
    y2 = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0)
    if qt is None:
        return gram, u, y2, y2
    project_gram(gram, qt)  # S - E - E^T
    r = u - (u[:, None, :] @ qt.mT @ qt)[:, 0]
    r2 = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0)
    small = ((r2 < 1e-2 * y2) & (y2 > 0)).nonzero().squeeze(1)
    if small.numel():
        m = evict.reshape(b * h, t, 1)[small]
        ys = v.reshape(b * h, t, d)[small].float() * m
        if kept_values is None:
            qs = qt[small]
        else:
            x_kept, n_kept = kept_values
            qs = householder_basis(x_kept[small], n_kept[small])
        res = (ys - (ys @ qs.mT) @ qs) * m
        gram[small] = res.mT @ res
        r2 = r2.index_put((small,), res.square().sum(dim=(-1, -2)))
        r = r.index_put((small,), (w_hat.reshape(b * h, 1, t)[small].to(torch.float32) @ res)[:, 0])
    return gram, r, r2, y2


#: bytes of residual Gram matrices solved together: layers are grouped so that a group's ``[N, d, d]`` Grams (and
#: the subspace iteration's square of them) fit this, small enough to be reused warm from the allocator, large
#: enough that each batched step covers hundreds of problems (on a small CPU the per-call cost dominates)
_GRAM_GROUP_BYTES = 16 << 20


def solve_gram(values, x, kept, evict, w_hat, prompt, cfg):
    """The ``subspace`` / ``eigh`` solvers, a group of layers at a time: per layer (all its ``B * H`` problems in
    one batch, the value buffer reused so the step works in cache) the kept basis and the Gram of each residual,
    written into the group's buffer; then the top-p eigenvectors of the whole group's Grams in one batch.
    ``x`` ``[L * B * H, k, d]`` are the kept values, ``kept`` their counts. Returns (r, C or None, ||R||_F, ||Y||_F)
    over all ``L * B * H`` problems.

    (Overlapping a group's iteration with the next group's Grams in a worker thread was 5-7% faster on a 2-core CPU
    but left the process's later torch work about 35% slower in ad-hoc timings; see
    :mod:`latent_relay.relay.threads`.)"""
    lo, hi = _prompt_span(prompt)
    n_layers, b, h = evict.shape[:3]
    d = values[0].shape[-1]
    device = values[0].device
    per_layer = b * h
    group = max(1, min(n_layers, _GRAM_GROUP_BYTES // max(1, per_layer * d * d * 4)))
    directions = not use_all_components(cfg, d)
    buffer = torch.empty(b, h, hi - lo, d, device=device)
    grams = torch.empty(group * per_layer, d, d, device=device)
    rs, cs, r_norms, y_norms = [], [], [], []
    for first in range(0, n_layers, group):
        layers = range(first, min(n_layers, first + group))
        rows = slice(first * per_layer, layers[-1] * per_layer + per_layer)
        q = kept_basis(x[rows], kept[rows]) if cfg.project else None
        parts = []
        for j, i in enumerate(layers):
            own = slice(j * per_layer, (j + 1) * per_layer)
            parts.append(
                layer_residual_gram(
                    values[i][:, :, lo:hi],
                    evict[i, :, :, lo:hi],
                    w_hat[i, :, :, lo:hi],
                    None if q is None else q[own],
                    buffer,
                    out=grams[own],
                    kept_values=(x[rows][own], kept[rows][own]),
                )[1:]
            )
        gram = grams[: len(layers) * per_layer]
        r, r2, y2 = (torch.cat(t) for t in zip(*parts))
        rs.append(r)
        r_norms.append(r2.sqrt())
        y_norms.append(y2.sqrt())
        if not directions:
            continue
        if cfg.solver == "eigh":
            cs.append(top_directions_eigh(gram, cfg.rank, r_norms[-1] > cfg.residual_tol * y_norms[-1]))
        else:
            cs.append(top_directions_subspace(gram, cfg.rank, cfg))
    c = torch.cat(cs) if directions else None
    return torch.cat(rs), c, torch.cat(r_norms), torch.cat(y_norms)
