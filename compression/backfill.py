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
the solver that finds ``r``, ``C`` and the norms of every problem at once (``exact``, ``subspace`` or ``eigh``, in
:mod:`latent_relay.compression.backfill_solvers`), the inject and scale modes, and the published ablations (no
projection, naive aggregation, no scaling, all components). This module weighs the evicted rows, scales and
restricts the residual and injects it (:func:`orthogonal_backfill`, :func:`apply_backfill`);
:func:`latent_relay.compression.backfill_reference.backfill_reference_loop` is the faithful per-(item, layer, head)
loop of the paper's code, for tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from latent_relay.compression.backfill_solvers import householder_basis, solve_exact, solve_gram
from latent_relay.compression.selectors import Gathered, Selection, gather_tokens
from latent_relay.kernels.dispatch import backfill_shift, inject_rows
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


def injection_scale(a_d: torch.Tensor, a_s: torch.Tensor, cfg: BackfillConfig) -> torch.Tensor:
    """``alpha`` per problem from the evicted and kept attention mass ``A_d`` / ``A_s`` (``cfg.scale``)."""
    if cfg.scale == "ratio":
        return a_d / (a_s + cfg.eps)
    if cfg.scale == "share":
        return a_d / (a_d + a_s + cfg.eps)
    if cfg.scale == "none":
        return torch.ones_like(a_d)
    raise ValueError(f"unknown OBF scale mode {cfg.scale!r}")


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
        qt = householder_basis(x, kept_n)
        ev_idx = _masked_order(evict, n_max)
        y = _gather_rows(memory.values, ev_idx).reshape(n_prob, n_max, d)
        wd = w_hat.gather(-1, ev_idx).reshape(n_prob, n_max)
        y = y * (torch.arange(n_max, device=y.device)[None, :] < n_evict.reshape(-1, 1))[..., None]
        r, c, r_norm, y_norm = solve_exact(x, qt, y, wd, config)
    else:
        r, c, r_norm, y_norm = solve_gram(memory.values, x, kept_n, evict, w_hat, selection.prompt, config)

    # at most p evicted rows: C spans the whole row space of R, so delta = r exactly
    full = None if c is None else n_evict.reshape(-1) <= config.rank
    a_d = torch.where(evict, scores, torch.zeros_like(scores)).sum(-1).reshape(-1)
    a_s = w_kept.sum(-1)
    alpha = injection_scale(a_d, a_s, config)
    applied = (n_evict.reshape(-1) > 0) & (y_norm > 0) & (r_norm > config.residual_tol * y_norm)
    shift = backfill_shift(r, c, alpha, applied, full)  # applied ? alpha * (r C^T) C : 0
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

    Only the kept prompt rows are read and written (:func:`latent_relay.kernels.dispatch.inject_rows`: a Triton
    kernel on CUDA tensors, else a row gather and an ``index_copy_`` per layer). With
    ``inplace=True`` the values of ``gathered.memory`` (which eviction created) are edited instead of copied.
    """
    mem = gathered.memory
    slots, valid = gathered.prompt_slots, gathered.prompt_slots_valid
    if slots.shape[1] == 0 or not bool(valid.any()):
        return mem
    padded = torch.where(valid, slots, torch.full_like(slots, -1))[:, None, :]  # [B, 1, k], -1: no kept token
    values = [
        inject_rows(v if inplace else v.clone(), padded, result.shift[i], result.token_scale[i])
        for i, v in enumerate(mem.values)
    ]
    return replace(mem, values=values)
