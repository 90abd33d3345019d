"""Plain-loop references for :mod:`latent_relay.agents.prefill_pruning`, for tests: written for clarity, not speed.

The window scores come from the *full* ``T x T`` attention the model itself returns (``output_attentions`` under
eager attention), summed over the last ``w`` rows and every head in float64, then average-pooled with loops; the
tokens past a selection layer are run through a copy of the model that holds only the deeper layers, fed the full
forward's hidden states of the kept tokens at their original positions.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch


@contextmanager
def eager_attention(model):
    """The model with eager attention for the duration (so it can return its attention matrices)."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@torch.inference_mode()
def window_scores_reference(model, ids: list[int], window: int, pool: int) -> list[list[float]]:
    """Every layer's pooled window scores ``[L][T]`` from the model's full attention matrices."""
    with eager_attention(model):
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    t = len(ids)
    w = min(window, t)
    rows = []
    for attention in out.attentions:  # [1, H, T, T]
        a = attention[0].double()
        raw = [sum(float(a[h, r, j]) for h in range(a.shape[0]) for r in range(t - w, t)) for j in range(t)]
        half = pool // 2
        rows.append([sum(raw[m] for m in range(j - half, j + half + 1) if 0 <= m < t) / pool for j in range(t)])
    return rows


def top_slots_reference(scores: list[float], window: int, keep: int) -> list[int]:
    """The last ``window`` slots plus the ``keep - window`` best others (ties to the earlier slot), sorted."""
    t = len(scores)
    others = sorted(range(t - window), key=lambda j: (-scores[j], j))[: keep - window]
    return sorted(others) + list(range(t - window, t))


@torch.inference_mode()
def full_forward(model, ids: list[int]):
    """``(next-token logits [V] float32, [(keys, values)] per layer, hidden states per layer output)``."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True, output_hidden_states=True)
    kv = [(layer.keys, layer.values) for layer in out.cache.layers]
    return out.logits[0, -1].float(), kv, out.hidden_states


@torch.inference_mode()
def continue_from_layer(model, hidden: torch.Tensor, positions: list[int], start: int):
    """Layers ``start..L-1`` of a copy of ``model`` on ``hidden`` ``[1, k, D]`` at ``positions``: ``(logits [V],
    [(keys, values)] of those layers)``."""
    tail = copy.deepcopy(model)
    layers = tail.model.layers[start:]
    for j, layer in enumerate(layers):
        layer.self_attn.layer_idx = j
    tail.model.layers = layers
    tail.config.num_hidden_layers = len(layers)
    if getattr(tail.config, "layer_types", None) is not None:
        tail.config.layer_types = tail.config.layer_types[start:]
    out = tail(inputs_embeds=hidden, position_ids=torch.tensor([positions]), use_cache=True)
    return out.logits[0, -1].float(), [(layer.keys, layer.values) for layer in out.cache.layers]
