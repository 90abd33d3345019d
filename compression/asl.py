"""ASL, the adaptive selection layer (Taniguchi, Dong, Onizuka, Xiao, arXiv 2601.07667; METHODS.md §4): the rule.

Layer-wise token pruning chooses, at one *selection layer*, the tokens that deeper layers keep. ASL picks that layer
per input, as the first layer where the attention ranks of the tokens have settled:

1. **Per-layer token score** ``s_l[j]``: attention of the last ``w`` queries (the *window*; 32 in the paper) onto
   every token, softmax in fp32, causal inside the window, summed over the window's queries and over all query
   heads, SnapKV-style average-pooled along tokens (kernel 7). Only the window's queries meet the layer's keys
   (``H x w x T`` logits, never the ``T x T`` attention matrix): :func:`window_attention_scores`.
2. **Ranks** ``r_l[j]`` in ``1..n`` over the candidate tokens (1 = most attended; ties to the earlier slot):
   :func:`token_ranks`.
3. **Rank variance** over the last ``L_obs`` layers ending at ``l`` (layers ``l - L_obs + 1 .. l``): ``U`` = union of
   every one of those layers' top-``k`` tokens, ``V(l) = mean_{j in U} Var_i(r_i[j])`` (population variance over
   the ``L_obs`` layers): :func:`rank_variance`.
4. **Stability ratio** ``rho(l) = V(l) / V(L_min)`` for ``l >= L_min``; the selection layer ``L*`` is the first
   layer with ``rho(l) < tau`` (``tau = 0.3``): :func:`stability_ratios`, :func:`selection_layer`. A larger ``tau``
   selects earlier (faster, less accurate). When it never drops below ``tau`` no layer is selected (``-1``): the
   paper then prunes nothing.

Degenerate cases: ``V(L_min) = 0`` (ranks already identical over the first window) gives ``rho = 0`` where
``V(l) = 0`` too and ``inf`` elsewhere, so ``L* = L_min``; an empty ``U`` (no candidates) gives ``NaN``, never below
``tau``, so no layer is selected.

**Depth scaling** (:class:`AslLayers`). The paper's constants are for 32-layer models: ``L_min = 10``, ``L_obs = 8``
(0-based layer indices). For a model of ``L`` layers they scale proportionally, rounded half up:
``L_obs = max(2, round(8 L / 32))`` (a variance needs two layers) and ``L_min = max(L_obs - 1, round(10 L / 32))``
(the first window, layers ``L_min - L_obs + 1 .. L_min``, must exist). 32 layers give (10, 8), 36 give (11, 9),
28 give (9, 7), 24 give (8, 6); a 2-layer model gives (1, 2), where ``rho`` exists only at layer 1 and is 1 (0
when both layers rank alike), so such a shallow model selects no layer or its last one, which select alike. The
ratio does not depend on the variance's normalisation (both ``V`` use the same ``L_obs``).

The relay selector built on this rule is ``asl`` in :mod:`latent_relay.compression.selectors`; the plain-loop
twins of these transforms (which materialise the full attention) are in
:mod:`latent_relay.compression.asl_reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latent_relay.compression.scores import pool_scores

#: The paper's constants, for 32-layer models (METHODS.md §4).
PAPER_LAYERS = 32
PAPER_L_MIN = 10
PAPER_L_OBS = 8
WINDOW = 32
POOL = 7
TAU = 0.3


def check_tau(tau: float) -> float:
    """``tau`` must lie strictly between 0 and 1 (a ratio to the variance at ``L_min``, which is 1 there)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < float(tau) < 1.0:
        raise ValueError(f"tau must be a number in (0, 1), got {tau!r}")
    return float(tau)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class AslLayers:
    """Where the stability test looks: the first ratio layer ``l_min`` and the window of ``l_obs`` layers."""

    l_min: int
    l_obs: int

    def __post_init__(self) -> None:
        if self.l_obs < 2:
            raise ValueError(f"l_obs must be at least 2 layers (a variance over layers), got {self.l_obs}")
        if self.l_min < self.l_obs - 1:
            raise ValueError(f"l_min must be at least l_obs - 1 = {self.l_obs - 1} (0-based), got {self.l_min}")

    @classmethod
    def for_depth(cls, num_layers: int) -> AslLayers:
        """The paper's ``L_min = 10``, ``L_obs = 8`` of 32 layers scaled to ``num_layers`` (module docstring)."""
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        l_obs = max(2, _round_half_up(PAPER_L_OBS * num_layers / PAPER_LAYERS))
        l_min = max(l_obs - 1, _round_half_up(PAPER_L_MIN * num_layers / PAPER_LAYERS))
        return cls(l_min=l_min, l_obs=l_obs)


def window_attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    pool: int = POOL,
    scale: float | None = None,
) -> torch.Tensor:
    """Step 1: one layer's token scores ``[B, T]`` float32 from the window's queries only.

    ``queries`` ``[B, H, w, d]`` are the (post-RoPE) queries of the last ``w`` slots, ``keys`` ``[B, H_kv, T, d]``
    the layer's (post-RoPE) keys of all ``T`` slots, the window's own last; query head ``q`` reads KV head
    ``q // (H / H_kv)`` (GQA). Window query ``i`` (slot ``T - w + i``) sees slots ``<= T - w + i`` that are ``valid``
    (bool ``[B, T]``; the window itself must be real tokens). Logits are scaled by ``scale`` (default
    ``d ** -0.5``), softmaxed in fp32 over the slots, summed over the window and every query head, and pooled over
    each item's real slots (:func:`latent_relay.compression.scores.pool_scores`); PAD slots score 0. One KV head's
    group at a time: the largest temporary is ``[B, H / H_kv, w, T]``.
    """
    b, h, w, d = queries.shape
    if keys.dim() != 4 or keys.shape[0] != b or keys.shape[3] != d:
        raise ValueError(f"keys {tuple(keys.shape)} do not match queries {tuple(queries.shape)} ([B, H_kv, T, d])")
    h_kv, t = keys.shape[1], keys.shape[2]
    if h_kv == 0 or h % h_kv:
        raise ValueError(f"{h} query heads are not a multiple of {h_kv} KV heads")
    if not 1 <= w <= t:
        raise ValueError(f"window of {w} queries for {t} slots: need 1 <= w <= T")
    g = h // h_kv
    scale = d**-0.5 if scale is None else scale
    slot = torch.arange(t, device=keys.device)
    allowed = slot[None, :] <= (t - w + torch.arange(w, device=keys.device))[:, None]  # [w, T] causal in the window
    allowed = allowed[None, None] if valid is None else allowed[None, None] & valid[:, None, None, :].bool()
    q = queries.float().reshape(b, h_kv, g, w, d)
    total = torch.zeros(b, t, dtype=torch.float32, device=keys.device)
    for kv in range(h_kv):
        logits = torch.einsum("bgwd,btd->bgwt", q[:, kv], keys[:, kv].float()) * scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        total += torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=(1, 2))
    if valid is not None:
        total = total * valid.to(total.dtype)
    return pool_scores(total[None, :, None, :], pool, None if valid is None else valid.bool())[0, :, 0]


def token_ranks(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Step 2: ranks ``[..., T]`` int64 of the candidate slots by descending score, 1 = highest, ties to the earlier
    slot; non-candidates get 0. ``candidates`` (bool) broadcasts against ``scores``; NaN scores rank last."""
    candidates = candidates.expand_as(scores)
    finite = torch.nan_to_num(scores.float(), nan=-3e38, posinf=3e38, neginf=-3e38)
    masked = torch.where(candidates, finite, torch.full_like(finite, float("-inf")))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(1, scores.shape[-1] + 1, device=order.device).expand_as(order)
    )
    return ranks * candidates


def rank_variance(ranks: torch.Tensor, top: torch.Tensor | int) -> torch.Tensor:
    """Step 3: ``V`` of one window of layers, ``ranks`` ``[n_layers, ..., T]`` -> ``[...]`` float32.

    ``U`` = slots ranked ``1..top`` (per item, ``top`` broadcasts over ``...``) in at least one of the layers;
    ``V`` = mean over ``U`` of each slot's population variance of its rank across the layers; NaN for an empty
    ``U``. Ranks of 0 (non-candidates) never enter ``U``."""
    top = torch.as_tensor(top, device=ranks.device)
    top = top.reshape(*top.shape, 1)  # [..., 1] against [..., T]
    in_top = ((ranks >= 1) & (ranks <= top)).any(dim=0)
    var = ranks.float().var(dim=0, correction=0)
    count = in_top.sum(dim=-1)
    total = torch.where(in_top, var, torch.zeros_like(var)).sum(dim=-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def stability_ratios(ranks: torch.Tensor, top: torch.Tensor | int, layers: AslLayers) -> torch.Tensor:
    """Step 4: ``rho`` ``[L, ...]`` float32 from per-layer ranks ``[L, ..., T]``; NaN below ``l_min`` (and
    everywhere when the model has at most ``l_min`` layers)."""
    n = ranks.shape[0]
    rho = torch.full((n, *ranks.shape[1:-1]), float("nan"), device=ranks.device)
    if n <= layers.l_min:
        return rho
    windows = ranks.unfold(0, layers.l_obs, 1)  # [L - l_obs + 1, ..., T, l_obs]: window ending at l = i + l_obs - 1
    variance = rank_variance(windows.movedim(-1, 0), top)  # [L - l_obs + 1, ...]
    v = variance[layers.l_min - layers.l_obs + 1 :]  # V(l) for l = l_min .. L - 1
    base = v[0]
    ratio = v / base
    ratio = torch.where(base == 0, torch.where(v == 0, 0.0, float("inf")), ratio)
    rho[layers.l_min :] = ratio
    return rho


def selection_layer(rho: torch.Tensor, tau: float) -> torch.Tensor:
    """Step 4: the first layer with ``rho < tau`` per item, ``rho`` ``[L, ...]`` -> int64 ``[...]``; -1 where
    ``rho`` never drops below ``tau`` (NaN never does)."""
    tau = check_tau(tau)
    below = rho < tau
    first = below.to(torch.int8).argmax(dim=0)
    return torch.where(below.any(dim=0), first, torch.full_like(first, -1))


def choose_layer(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    top: torch.Tensor | int,
    tau: float = TAU,
    layers: AslLayers | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4 at once: per-layer scores ``[L, ..., T]`` (one score per token, heads already summed) and the
    candidate slots -> ``(L* [...], ranks [L, ..., T])``; ``layers`` defaults to
    :meth:`AslLayers.for_depth` of ``L``."""
    tau = check_tau(tau)
    layers = layers or AslLayers.for_depth(scores.shape[0])
    ranks = token_ranks(scores, candidates)
    return selection_layer(stability_ratios(ranks, top, layers), tau), ranks
