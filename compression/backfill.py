"""Orthogonal Backfill (OBF, arXiv 2604.13349; METHODS.md §3).

Eviction throws the evicted prompt *values* away; OBF folds the part of them that the kept values cannot express
back into the kept values, at no extra bytes. For each (item, layer, KV head) with kept prompt values
``X`` (k x d) and evicted ``Y`` (n_d x d), selection weights ``w``::

    Q = qr(X^T).Q                       # basis of the kept span
    R = Y - Y Q Q^T                     # residual orthogonal to every kept value
    C = top-p right singular vectors of R
    r = w_hat^T R,  w_hat = w_D / sum(w_D)
    delta = (r C^T) C,  alpha = A_d / A_s
    V[j] += alpha * delta               # every kept prompt value of that head

Keys, sink, history and thoughts are never touched. One implementation, configured by :class:`BackfillConfig`:
the solver (``exact``: batched QR + SVD in fp32; ``subspace``: a group of layers at a time, each layer's (item, head)
problems in one batch with reused buffers, a Cholesky-QR kept basis, the residual Gram ``R^T R = P (Y_D^T Y_D) P``
without forming ``R``, then batched subspace iteration (cheap ridge Cholesky-QR between steps) with Rayleigh-Ritz,
problems with a steep spectrum handed to eigh; on a CPU, ``Y_D^T Y_D``, ``P S P`` and the iteration run in the
compiled kernels of :mod:`latent_relay.kernels.obf` where they apply, this module's torch code being their twin;
``eigh``: a batched eigen-solve of the same Gram matrices), the inject and scale modes, and the published
ablations (no projection, naive aggregation, no scaling, all components).
:func:`backfill_reference_loop` is the faithful per-(item, layer, head) loop of the paper's code, for tests and
benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from latent_relay.compression.selectors import Gathered, Selection, gather_tokens
from latent_relay.kernels.obf import evicted_gram, project_gram, top_directions_native
from latent_relay.relay.memory import KVState

Solver = Literal["exact", "subspace", "eigh"]

#: Published ablations (arXiv 2604.13349, Table "ablations") as config overrides.
ABLATIONS: dict[str, dict[str, object]] = {
    "no-projection": {"project": False},
    "naive-aggregation": {"aggregate": "mean"},
    "no-scaling": {"scale": "none"},
    "all-components": {"rank": None},
}


@dataclass(frozen=True)
class BackfillConfig:
    """Every knob of Orthogonal Backfill (arXiv 2604.13349).

    ``rank``: residual directions kept (``p``; 4 for L-OBF, 2 for H-OBF; ``None`` = all components).
    ``inject``: ``uniform`` adds the same ``alpha * delta`` to every kept prompt value of a head;
    ``attention`` scales it per kept token by ``w_j / mean_K(w)`` (same total, more on attended tokens).
    ``scale``: ``ratio`` = ``A_d / A_s`` (paper), ``none`` = 1, ``share`` = ``A_d / (A_d + A_s)``.
    ``project``: ``False`` is the "no projection" ablation (``R = Y``).
    ``aggregate``: ``attention`` (paper) or ``mean`` ("naive aggregation": plain mean of the residual rows).
    ``iterations`` / ``oversample`` / ``orth_every`` / ``seed``: the subspace-iteration solver (16 iterations rather
    than the paper's ~12: on Qwen3-4B-shaped caches they bring the largest difference to exact from 8.8e-4 to 6e-5
    for L-OBF, and for H-OBF from 1.3e-3 to 1.5e-4 wherever sigma_p / sigma_{p+1} > 1.02, as
    ``benchmarks/compression_overhead.py`` prints).
    ``residual_tol``: inject nothing where ``||R||_F <= residual_tol * ||Y||_F`` (the fast path's kept basis is
    orthonormal to ~1e-4, so "~0" means below 1e-3 of the evicted norm for every solver).
    """

    rank: int | None = 4
    solver: Solver = "subspace"
    inject: Literal["uniform", "attention"] = "uniform"
    scale: Literal["ratio", "none", "share"] = "ratio"
    project: bool = True
    aggregate: Literal["attention", "mean"] = "attention"
    iterations: int = 16
    oversample: int = 10
    orth_every: int = 2
    seed: int = 0
    eps: float = 1e-8
    residual_tol: float = 1e-3

    def with_ablation(self, name: str) -> BackfillConfig:
        if name not in ABLATIONS:
            raise ValueError(f"unknown OBF ablation {name!r}; expected one of {', '.join(ABLATIONS)}")
        return replace(self, **ABLATIONS[name])


@dataclass
class BackfillResult:
    """Per-problem outcome, all ``[L, B, H_kv, ...]`` float32.

    ``shift`` ``[L, B, H, d]`` is ``alpha * delta`` (zero where nothing was injected); ``token_scale``
    ``[L, B, H, k]`` multiplies it per kept prompt token (1 in uniform mode, 0 on padding);
    ``residual_norm`` / ``evicted_norm`` are ``||R||_F`` / ``||Y||_F``; ``applied`` says where OBF injected.
    """

    shift: torch.Tensor
    token_scale: torch.Tensor
    residual_norm: torch.Tensor
    evicted_norm: torch.Tensor
    applied: torch.Tensor

    def diagnostics(self, item: int | None = None) -> dict[str, float]:
        """Summary over every problem, or over those of batch item ``item``."""
        part = slice(None) if item is None else slice(item, item + 1)
        evicted, residual = self.evicted_norm[:, part], self.residual_norm[:, part]
        has = evicted > 0
        y2 = float((evicted[has] ** 2).sum())
        r2 = float((residual[has] ** 2).sum())
        applied = self.applied[:, part]
        inj = torch.linalg.vector_norm(self.shift[:, part], dim=-1)[applied]
        return {
            "obf_residual_ratio": (r2 / y2) ** 0.5 if y2 > 0 else 0.0,
            "obf_injected_norm": float(inj.mean()) if inj.numel() else 0.0,
            "obf_injected_norm_max": float(inj.max()) if inj.numel() else 0.0,
            "obf_problems": int(has.sum()),
            "obf_applied": int(applied.sum()),
        }


# ----------------------------------------------------------------------------------------------- helpers
def _masked_order(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``True`` slots first (in original order), truncated to ``count``: ``[..., count]``."""
    return (~mask).to(torch.int8).argsort(dim=-1, stable=True)[..., :count]


def _gather_rows(values: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """``values[l][b, h, index[l, b, h, j]]`` stacked to ``[L, B, H, J, d]`` float32."""
    return torch.stack([gather_tokens(v, index[i]) for i, v in enumerate(values)]).float()


def _weights_hat(weights: torch.Tensor, evict: torch.Tensor, aggregate: str) -> torch.Tensor:
    """``w_hat`` over the evicted slots (zero elsewhere); uniform when asked for or when all weights are 0."""
    w = torch.where(evict, weights.clamp_min(0), torch.zeros_like(weights))
    total = w.sum(dim=-1, keepdim=True)
    n = evict.sum(dim=-1, keepdim=True).clamp_min(1).to(w.dtype)
    uniform = evict.to(w.dtype) / n
    if aggregate == "mean":
        return uniform
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), uniform)


def _alpha(a_d: torch.Tensor, a_s: torch.Tensor, cfg: BackfillConfig) -> torch.Tensor:
    if cfg.scale == "ratio":
        return a_d / (a_s + cfg.eps)
    if cfg.scale == "share":
        return a_d / (a_d + a_s + cfg.eps)
    if cfg.scale == "none":
        return torch.ones_like(a_d)
    raise ValueError(f"unknown OBF scale mode {cfg.scale!r}")


def _restrict(r: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """``delta = (r C^T) C`` for ``r`` ``[N, d]``, ``C`` ``[N, p, d]``; ``C = None`` keeps every component."""
    if c is None:
        return r
    return torch.einsum("np,npd->nd", torch.einsum("nd,npd->np", r, c), c)


def _use_all_components(cfg: BackfillConfig, d: int) -> bool:
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
        qt[bad] = _householder_basis(x[bad], kept[bad])
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


def _householder_basis(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
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
def _solve_exact(x, qt, y, w_hat_d, cfg):
    """Batched QR + SVD path: returns (r, C or None, ||R||_F, ||Y||_F) per problem."""
    r_mat = y - (y @ qt.mT) @ qt if cfg.project else y
    r = torch.einsum("nj,njd->nd", w_hat_d, r_mat)
    c = None
    if not _use_all_components(cfg, y.shape[-1]) and y.shape[1] > 0:
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
            qs = _householder_basis(x_kept[small], n_kept[small])
        res = (ys - (ys @ qs.mT) @ qs) * m
        gram[small] = res.mT @ res
        r2 = r2.index_put((small,), res.square().sum(dim=(-1, -2)))
        r = r.index_put((small,), (w_hat.reshape(b * h, 1, t)[small].to(torch.float32) @ res)[:, 0])
    return gram, r, r2, y2


#: bytes of residual Gram matrices solved together: layers are grouped so that a group's ``[N, d, d]`` Grams (and
#: the subspace iteration's square of them) fit this, small enough to be reused warm from the allocator, large
#: enough that each batched step covers hundreds of problems (on a small CPU the per-call cost dominates)
_GRAM_GROUP_BYTES = 16 << 20


def _solve_gram(values, x, kept, evict, w_hat, prompt, cfg):
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
    directions = not _use_all_components(cfg, d)
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


# ---------------------------------------------------------------------------------------------- public
def orthogonal_backfill(
    memory: KVState, selection: Selection, scores: torch.Tensor, config: BackfillConfig
) -> BackfillResult:
    """Solve every (layer, item, KV head) OBF problem of a selection at once (no loop over heads or items).

    ``scores`` ``[L, B, H_kv, T]`` are the selection scores, used as the weights ``w``. Returns the shifts to add
    to the kept prompt values; :func:`apply_backfill` writes them into the evicted memory.
    """
    L, b, h, d = memory.num_layers, memory.batch_size, memory.num_kv_heads, memory.head_dim
    t = memory.num_tokens
    keep = selection.keep.expand(L, b, h, t)
    evict = selection.prompt[None, :, None, :] & ~keep
    scores = scores.float()
    k_max = int(selection.kept.max()) if b else 0
    n_evict = evict.sum(dim=-1)  # [L, B, H]
    n_max = int(n_evict.max()) if n_evict.numel() else 0
    w_hat = _weights_hat(scores, evict, config.aggregate)

    kept_idx = _masked_order(selection.keep, k_max).expand(L, b, h, k_max)  # sorted once per shared token set
    n_prob = L * b * h
    x = _gather_rows(memory.values, kept_idx).reshape(n_prob, k_max, d)
    kept_n = selection.kept[None, :, None].expand(L, b, h).reshape(-1)
    kept_valid = torch.arange(k_max, device=memory.device)[None, :] < kept_n[:, None]
    if not bool(kept_valid.all()):  # items that keep fewer than k_max tokens: zero the rows beyond
        x = x * kept_valid[..., None]
    w_kept = scores.gather(-1, kept_idx).reshape(n_prob, k_max) * kept_valid

    if n_max == 0 or k_max == 0:
        zero = torch.zeros(n_prob, device=memory.device)
        r, c, r_norm, y_norm = torch.zeros(n_prob, d, device=memory.device), None, zero, zero
    elif config.solver == "exact":
        qt = _householder_basis(x, kept_n)
        ev_idx = _masked_order(evict, n_max)
        y = _gather_rows(memory.values, ev_idx).reshape(n_prob, n_max, d)
        wd = w_hat.gather(-1, ev_idx).reshape(n_prob, n_max)
        y = y * (torch.arange(n_max, device=y.device)[None, :] < n_evict.reshape(-1, 1))[..., None]
        r, c, r_norm, y_norm = _solve_exact(x, qt, y, wd, config)
    else:
        r, c, r_norm, y_norm = _solve_gram(memory.values, x, kept_n, evict, w_hat, selection.prompt, config)

    delta = _restrict(r, c)
    if c is not None:  # at most p evicted rows: C spans the whole row space of R, so delta = r exactly
        delta = torch.where((n_evict.reshape(-1) <= config.rank)[:, None], r, delta)
    a_d = torch.where(evict, scores, torch.zeros_like(scores)).sum(-1).reshape(-1)
    a_s = w_kept.sum(-1)
    alpha = _alpha(a_d, a_s, config)
    applied = (n_evict.reshape(-1) > 0) & (y_norm > 0) & (r_norm > config.residual_tol * y_norm)
    shift = torch.where(applied[:, None], alpha[:, None] * delta, torch.zeros_like(delta))
    if config.inject == "attention":
        rel = w_kept * kept_n[:, None].to(w_kept.dtype) / a_s.clamp_min(torch.finfo(a_s.dtype).tiny)[:, None]
        token_scale = torch.where(a_s[:, None] > 0, rel, torch.ones_like(rel)) * kept_valid
    else:
        token_scale = kept_valid.to(torch.float32)
    return BackfillResult(
        shift=shift.reshape(L, b, h, d),
        token_scale=token_scale.reshape(L, b, h, k_max),
        residual_norm=r_norm.reshape(L, b, h),
        evicted_norm=y_norm.reshape(L, b, h),
        applied=applied.reshape(L, b, h),
    )


def apply_backfill(gathered: Gathered, result: BackfillResult, inplace: bool = False) -> KVState:
    """Add the shifts to the kept prompt values of the evicted memory; every other element is left bit-identical.

    Only the kept prompt rows are read and written (a row gather and an ``index_copy_`` per layer). With
    ``inplace=True`` the values of ``gathered.memory`` (which eviction created) are edited instead of copied.
    """
    mem = gathered.memory
    slots, valid = gathered.prompt_slots, gathered.prompt_slots_valid
    b, k = slots.shape
    if k == 0 or not bool(valid.any()):
        return mem
    t_out, h, d = mem.num_tokens, mem.num_kv_heads, mem.head_dim
    flat = (slots[:, None, :] + (torch.arange(b * h, device=slots.device) * t_out).view(b, h, 1)).reshape(-1)
    real = None if bool(valid.all()) else valid[:, None, :].expand(b, h, k).reshape(-1).nonzero().squeeze(1)
    if real is not None:
        flat = flat[real]
    values = []
    for i, v in enumerate(mem.values):
        rows = gather_tokens(v, slots[:, None, :])  # [B, H, k, d]
        add = result.shift[i][:, :, None, :] * result.token_scale[i][..., None]
        new = (rows.float() + add).to(v.dtype).view(-1, d)
        out = v if inplace else v.clone()
        out.view(b * h * t_out, d).index_copy_(0, flat, new if real is None else new.index_select(0, real))
        values.append(out)
    return replace(mem, values=values)


def backfill_reference_loop(
    memory: KVState, selection: Selection, scores: torch.Tensor, config: BackfillConfig = BackfillConfig()
) -> torch.Tensor:
    """Faithful per-(item, layer, head) loop as in the paper's code (QR + SVD per head): ``shift [L, B, H, d]``.

    Slow on purpose; the plain-torch reference the batched solvers are tested and benchmarked against.
    """
    L, b, h, d = memory.num_layers, memory.batch_size, memory.num_kv_heads, memory.head_dim
    shift = torch.zeros(L, b, h, d, device=memory.device)
    keep_all = selection.keep.expand(L, b, h, memory.num_tokens)
    for bi in range(b):
        prompt = selection.prompt[bi]
        for li in range(L):
            for hi in range(h):
                keep = keep_all[li, bi, hi]
                evict = prompt & ~keep
                if not bool(evict.any()):
                    continue
                v = memory.values[li][bi, hi].float()
                w = scores[li, bi, hi].float()
                x, y = v[keep], v[evict]
                q = torch.linalg.qr(x.T).Q
                r_mat = y - y @ q @ q.T if config.project else y
                if float(torch.linalg.norm(r_mat)) <= config.residual_tol * float(torch.linalg.norm(y)):
                    continue
                w_d = w[evict].clamp_min(0)
                if config.aggregate == "mean" or float(w_d.sum()) <= 0:
                    w_hat = torch.full_like(w_d, 1.0 / w_d.numel())
                else:
                    w_hat = w_d / w_d.sum()
                r = w_hat @ r_mat
                if _use_all_components(config, d):
                    delta = r
                else:
                    vh = torch.linalg.svd(r_mat, full_matrices=False).Vh
                    c = vh[: config.rank]
                    delta = (r @ c.T) @ c
                a_d, a_s = w[evict].sum(), w[keep].sum()
                alpha = _alpha(a_d[None], a_s[None], config)[0]
                shift[li, bi, hi] = alpha * delta
    return shift
