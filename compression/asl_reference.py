"""Plain-loop twins of the ASL transforms (arXiv 2601.07667, :mod:`latent_relay.compression.asl`), for tests.

Written for clarity, not speed: one (item, head) at a time, Python lists for ranks and sets. The window scores
materialise each head's full ``T x T`` causal attention matrix and read its last ``w`` rows, which is what
:func:`~latent_relay.compression.asl.window_attention_scores` computes without building it.
"""

from __future__ import annotations

import math

import torch

from latent_relay.compression.asl import AslLayers


def window_attention_scores_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    window: int,
    valid: torch.Tensor | None = None,
    pool: int = 7,
    scale: float | None = None,
) -> torch.Tensor:
    """``queries`` ``[B, H, T, d]`` of *every* slot, ``keys`` ``[B, H_kv, T, d]`` -> ``[B, T]`` float32 scores."""
    b, h, t, d = queries.shape
    g = h // keys.shape[1]
    scale = d**-0.5 if scale is None else scale
    valid = torch.ones(b, t, dtype=torch.bool) if valid is None else valid.bool().cpu()
    out = torch.zeros(b, t, dtype=torch.float32)
    for i in range(b):
        raw = torch.zeros(t, dtype=torch.float64)
        for q in range(h):
            full = (queries[i, q].double() @ keys[i, q // g].double().T) * scale  # [T, T]
            mask = torch.ones(t, t, dtype=torch.bool).tril() & valid[i][None, :]
            full = full.masked_fill(~mask, float("-inf"))
            attention = torch.softmax(full, dim=-1).nan_to_num(0.0)
            for row in range(t - window, t):
                raw += attention[row]
        real = [j for j in range(t) if bool(valid[i, j])]
        half = pool // 2
        for n, j in enumerate(real):  # average pool over the item's real slots, zero padding, divide by the kernel
            total = sum(float(raw[real[m]]) for m in range(n - half, n + half + 1) if 0 <= m < len(real))
            out[i, j] = total / pool if pool > 1 else float(raw[j])
    return out


def token_ranks_reference(scores: list[float], candidates: list[bool]) -> list[int]:
    """Rank 1 = highest score among the candidates, ties to the earlier slot; 0 for the others."""
    order = sorted((j for j in range(len(scores)) if candidates[j]), key=lambda j: (-scores[j], j))
    ranks = [0] * len(scores)
    for r, j in enumerate(order, 1):
        ranks[j] = r
    return ranks


def rank_variance_reference(ranks: list[list[int]], top: int) -> float:
    """``V``: mean over the union of the layers' top-``top`` slots of the population variance of their ranks."""
    union = {j for layer in ranks for j, r in enumerate(layer) if 1 <= r <= top}
    if not union:
        return math.nan
    variances = []
    for j in sorted(union):
        values = [layer[j] for layer in ranks]
        mean = sum(values) / len(values)
        variances.append(sum((v - mean) ** 2 for v in values) / len(values))
    return sum(variances) / len(variances)


def selection_layer_reference(ranks: list[list[int]], top: int, tau: float, layers: AslLayers) -> tuple[int, list]:
    """``(L*, rho)`` for one item from its per-layer ranks: the first ``l >= l_min`` with ``rho(l) < tau``, or -1."""
    rho: list[float] = [math.nan] * len(ranks)
    star = -1
    if len(ranks) <= layers.l_min:
        return star, rho
    base = rank_variance_reference(ranks[layers.l_min - layers.l_obs + 1 : layers.l_min + 1], top)
    for layer in range(layers.l_min, len(ranks)):
        v = rank_variance_reference(ranks[layer - layers.l_obs + 1 : layer + 1], top)
        if base == 0:
            rho[layer] = 0.0 if v == 0 else math.inf
        else:
            rho[layer] = v / base
        if star < 0 and rho[layer] < tau:
            star = layer
    return star, rho


def select_asl_reference(
    scores: torch.Tensor, prompt: torch.Tensor, budget: int, tau: float
) -> tuple[dict[tuple[int, int, int], set[int]], list[int]]:
    """The ``asl`` selector as loops: ``{(layer, item, head): kept prompt slots}`` and each item's ``L*``.

    ``scores`` ``[L, B, H, T]``, ``prompt`` bool ``[B, T]``. Layers up to ``L*`` (all layers when ``L* = -1``) keep
    each head's top-``budget`` prompt slots; deeper layers keep ``L*``'s top-``budget`` by the head-summed score."""
    n_layers, b, h, t = scores.shape
    layers = AslLayers.for_depth(n_layers)
    kept: dict[tuple[int, int, int], set[int]] = {}
    stars = []
    for i in range(b):
        cand = [bool(prompt[i, j]) for j in range(t)]
        slots = [j for j in range(t) if cand[j]]
        top = min(budget, len(slots))
        ranks = [
            token_ranks_reference([float(scores[li, i, :, j].sum()) for j in range(t)], cand) for li in range(n_layers)
        ]
        star, _ = selection_layer_reference(ranks, top, tau, layers)
        stars.append(star)
        last = n_layers - 1 if star < 0 else star
        shared = {j for j in slots if 1 <= ranks[last][j] <= top}
        for li in range(n_layers):
            for head in range(h):
                if li > last:
                    kept[li, i, head] = set(shared)
                else:
                    order = sorted(slots, key=lambda j, li=li, head=head: (-float(scores[li, i, head, j]), j))
                    kept[li, i, head] = set(order[:top])
    return kept, stars
