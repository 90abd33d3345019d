"""Prefill pruning for an agent that reads a long document: layer-wise token selection during the prompt's forward.

One implementation, five methods (``method``), all under one budget ``k`` of KV slots per layer (the selection size,
the observation window included):

- ``full``: a plain prefill, every layer keeps all ``T`` prompt tokens.
- ``snapkv`` (SnapKV, Li et al., arXiv 2404.14469): a full prefill, then every layer keeps its *own* top ``k``
  tokens by window attention (pooled). Per layer, not per head: a transformers cache holds one token count per
  layer, so the heads of a layer share its choice (their scores are summed, as ASL's are).
- ``gemfilter`` (GemFilter-like, Shi et al., arXiv 2409.17422): run layers up to a fixed filter layer (13 of 32,
  scaled to depth), select the top ``k`` tokens there, then rerun the whole model on the selected ids only, with
  positions renumbered ``0..k-1``. GemFilter scores with the last query alone; here the same window scores as the
  others rank the tokens (``window=1`` gives GemFilter's), so the methods differ only in where they select.
- ``fastkv`` (FastKV-like, Jo et al., arXiv 2502.01068): at a fixed propagation layer (15 of 32, scaled) keep the
  top ``k`` tokens and continue the deeper layers with only their hidden states, at their **original positions**.
- ``asl`` (ASL, Taniguchi et al., arXiv 2601.07667; METHODS.md §4): like ``fastkv``, but the layer is chosen per
  input as the first layer whose attention ranks have settled (rank-variance stability ratio below ``tau``,
  :func:`latent_relay.compression.asl.choose_layer`). When no layer settles, every token goes through every layer
  (``layer`` -1) and the KV follows ``early_kv`` everywhere (per-layer SnapKV, or full).

**Scores.** Layer ``l``'s token scores are the attention of the last ``w`` queries (post-RoPE, post-``q_norm``;
recomputed from the layer's input for those ``w`` slots only) onto the layer's cached keys, summed over the window
and all heads, average-pooled (:func:`latent_relay.compression.asl.window_attention_scores`). The window is always
kept; the other ``k - w`` slots are the top by score (ties to the earlier slot), i.e. exactly the slots that
``choose_layer`` ranks ``1..k - w`` among the non-window candidates.

**KV of the layers up to the selection layer** (``asl``, ``fastkv``): ``early_kv="snapkv"`` (default) compresses
each of them to its own top ``k`` (so every layer holds exactly ``k`` slots: ASL's budget mode), ``"full"`` keeps
their ``T`` slots. Deeper layers hold the ``k`` survivors.

**The result** (:class:`PrunedPrefill`) is a transformers ``DynamicCache`` (layers may hold different token counts,
which :class:`~latent_relay.relay.memory.KVState` cannot: it shares one token table across layers), each layer's
original positions, the next token's logits and the next position: ``T`` for ``full``, ``snapkv``, ``fastkv``,
``asl``; ``k`` for ``gemfilter``. :func:`decode_step` and :func:`greedy_decode` continue from it (one token at a
time, no mask: the single query sees every cached slot); the model's own forward does too under ``sdpa`` attention
given explicit ``position_ids`` and no ``attention_mask``.

**Supported models**: transformers 5.x Llama, Qwen2 and Qwen3 (``model.model.layers`` of decoder layers called with
``position_embeddings`` from ``model.model.rotary_emb``), full attention in every layer, one prompt at a time; other
models raise :class:`UnsupportedArchitectureError`.

**Floors** (ARCHITECTURE.md): ``agents`` may not import ``compression``, so the model-free half of the rule comes in
as a :class:`WindowRule` (built from :mod:`latent_relay.compression.asl` by the caller).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

METHODS = ("full", "snapkv", "gemfilter", "fastkv", "asl")
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
#: The fixed layers of the baselines in their 32-layer models, scaled to depth (:func:`fixed_layer`).
PAPER_LAYERS = 32
GEMFILTER_LAYER = 13
FASTKV_LAYER = 15


class UnsupportedArchitectureError(ValueError):
    """Prefill pruning walks the decoder layers itself; it knows Llama, Qwen2 and Qwen3 with full attention."""


@dataclass(frozen=True)
class WindowRule:
    """The model-free half: ``scores(queries [1, H, w, d], keys [1, H_kv, T, d], pool=, scale=) -> [1, T]`` and
    ``choose_layer(scores [L, 1, T], candidates [1, T], top, tau) -> (L* [1], ranks)``; pass those of
    :mod:`latent_relay.compression.asl` (``window_attention_scores``, ``choose_layer``)."""

    scores: Callable[..., torch.Tensor]
    choose_layer: Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PruneSettings:
    """``budget``: KV slots per layer (None or ``>= T``: nothing is pruned); ``window``: scoring queries (kept
    always); ``layer``: the fixed layer of ``gemfilter``/``fastkv`` (default: the papers' layer scaled to depth)."""

    method: str = "asl"
    budget: int | None = None
    window: int = 32
    pool: int = 7
    tau: float = 0.3
    layer: int | None = None
    early_kv: str = "snapkv"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.budget is not None and (
            isinstance(self.budget, bool) or int(self.budget) != self.budget or self.budget < 1
        ):
            raise ValueError(f"budget must be a positive number of KV slots per layer or None, got {self.budget!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive number of queries, got {self.window!r}")
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd positive kernel, got {self.pool!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must be a number in (0, 1), got {self.tau!r}")
        if self.layer is not None and (
            isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0
        ):
            raise ValueError(f"layer must be a non-negative layer index or None, got {self.layer!r}")
        if self.early_kv not in ("snapkv", "full"):
            raise ValueError(f"early_kv must be 'snapkv' or 'full', got {self.early_kv!r}")


@dataclass
class PrunedPrefill:
    """A pruned prompt's cache: ``positions[l]`` (int64 ``[n_l]``) are layer ``l``'s cached slots' positions (their
    original ones; ``0..k-1`` for ``gemfilter``), ``logits`` (float32 ``[V]``) the next token's, ``layer`` the
    selection layer (-1: none), ``kept`` the original positions of the tokens past it (None when nothing was
    pruned), ``scores`` the window scores of the layers that computed them (float32 ``[T]`` each)."""

    method: str
    cache: object
    positions: list[torch.Tensor]
    logits: torch.Tensor
    next_position: int
    layer: int
    kept: torch.Tensor | None
    prompt_length: int
    scores: list[torch.Tensor]

    def kv_tokens(self) -> list[int]:
        """Slots each layer holds."""
        return [int(p.numel()) for p in self.positions]


def fixed_layer(method: str, num_layers: int) -> int:
    """The baselines' layer (GemFilter 13, FastKV 15 of 32) scaled to ``num_layers``, rounded half up."""
    base = {"gemfilter": GEMFILTER_LAYER, "fastkv": FASTKV_LAYER}[method]
    return min(num_layers - 1, int(base * num_layers / PAPER_LAYERS + 0.5))


class _Decoder:
    """The decoder layers of a supported model, called one at a time with the model's own rotary embeddings."""

    def __init__(self, model) -> None:
        config = model.config.get_text_config()
        arch = getattr(config, "model_type", None)
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedArchitectureError(
                f"prefill pruning supports {', '.join(SUPPORTED_ARCHS)} models; got model_type {arch!r}"
            )
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise UnsupportedArchitectureError(f"prefill pruning needs full attention in every layer; got {kinds}")
        base = getattr(model, "model", None)
        if not all(hasattr(base, name) for name in ("layers", "rotary_emb", "norm", "embed_tokens")):
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no model.layers / rotary_emb / norm")
        self.model, self.base, self.arch = model, base, arch
        self.layers = list(base.layers)[: config.num_hidden_layers]
        self.rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.implicit_causal = model.config._attn_implementation == "sdpa"  # is_causal for a mask-free call
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(ids[None].to(self.device))

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.rotary_emb(hidden, positions[None].to(self.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(self.base.norm(hidden[:, -1:]))[0, -1].float()

    def layer(self, i, hidden, rope, positions, cache, mask=None) -> torch.Tensor:
        return self.layers[i](
            hidden,
            attention_mask=mask,
            position_ids=positions[None].to(self.device),
            cache=cache,
            use_cache=True,
            position_embeddings=rope,
        )

    def window_queries(self, i: int, hidden: torch.Tensor, rope, w: int) -> torch.Tensor:
        """Layer ``i``'s post-RoPE queries ``[1, H, w, d]`` of the last ``w`` slots, from the layer's input."""
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden[:, -w:])
        q = attn.q_proj(x).view(1, w, -1, attn.head_dim)
        if self.arch == "qwen3":
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = rope[0][:, -w:], rope[1][:, -w:]
        return self.rope(q, q, cos, sin)[0]

    def causal_mask(self, n: int) -> torch.Tensor | None:
        """Causal attention among ``n`` new slots on an empty layer cache (the kept slots are in position order)."""
        if n == 1 or self.implicit_causal:
            return None
        allowed = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        mask = torch.zeros(n, n, dtype=self.dtype, device=self.device)
        return mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[None, None]


def top_slots(scores: torch.Tensor, window: int, keep: int) -> torch.Tensor:
    """The kept slots (sorted): the last ``window`` slots plus the top ``keep - window`` others by score."""
    t = scores.shape[-1]
    others = torch.nan_to_num(scores[: t - window].float(), nan=float("-inf"))
    best = others.argsort(descending=True, stable=True)[: keep - window]
    return torch.cat([best.sort().values, torch.arange(t - window, t, device=scores.device)])


def _check_ids(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"ids must be one non-empty prompt (a list of ids or [1, T]), got shape {tuple(ids.shape)}")
    return ids


@torch.inference_mode()
def prune_prefill(model, ids: Sequence[int] | torch.Tensor, settings: PruneSettings, rule: WindowRule) -> PrunedPrefill:
    """Prefill one prompt with ``settings.method`` (module docstring); ``model`` a Llama/Qwen2/Qwen3 causal LM."""
    from transformers import DynamicCache  # imported when a model runs

    dec = _Decoder(model)
    ids = _check_ids(ids)
    t, n_layers = ids.numel(), len(dec.layers)
    k = t if settings.budget is None else min(int(settings.budget), t)
    w = min(settings.window, t)
    prune = k < t and settings.method != "full"
    if prune and k < w:
        raise ValueError(f"budget {k} is below the window of {w} queries, which is always kept; lower window")
    stop = None
    if prune and settings.method in ("gemfilter", "fastkv"):
        stop = fixed_layer(settings.method, n_layers) if settings.layer is None else settings.layer
        if stop >= n_layers:
            raise ValueError(f"layer {stop} is past the model's last layer {n_layers - 1}")

    positions = torch.arange(t, device=dec.device)
    hidden = dec.embed(ids)
    rope = dec.rotary(hidden, positions)
    mask = dec.causal_mask(t)
    scratch = DynamicCache()
    kv, layer_positions, scores = [], [], []
    star, kept = -1, None
    for i in range(n_layers):
        layer_in = hidden
        hidden = dec.layer(i, layer_in, rope, positions, scratch, mask)
        kv.append((scratch.layers[i].keys, scratch.layers[i].values))
        layer_positions.append(positions)
        if not prune or kept is not None:
            continue
        queries = dec.window_queries(i, layer_in, rope, w)
        scores.append(rule.scores(queries, kv[i][0], pool=settings.pool, scale=dec.layers[i].self_attn.scaling)[0])
        if settings.method == "asl":
            select = _asl_selects(rule, scores, n_layers, w, k, settings.tau)
        else:
            select = i == stop
        if not select:
            continue
        star, kept = i, top_slots(scores[i], w, k)
        if settings.method == "gemfilter":
            rerun = prune_prefill(model, ids[kept.cpu()], PruneSettings("full"), rule)
            rerun.method, rerun.layer, rerun.kept, rerun.prompt_length, rerun.scores = "gemfilter", i, kept, t, scores
            return rerun
        hidden, positions = hidden[:, kept], positions[kept]
        rope = (rope[0][:, kept], rope[1][:, kept])
        mask = dec.causal_mask(k)

    if prune and (settings.method == "snapkv" or settings.early_kv == "snapkv"):
        for i in range(len(scores)):  # the layers that ran on every token: each keeps its own top k
            if kv[i][0].shape[2] == t:
                slots = top_slots(scores[i], w, k)
                kv[i] = (kv[i][0][:, :, slots], kv[i][1][:, :, slots])
                layer_positions[i] = layer_positions[i][slots]
    cache = DynamicCache([(key.contiguous(), value.contiguous()) for key, value in kv])
    return PrunedPrefill(settings.method, cache, layer_positions, dec.logits(hidden), t, star, kept, t, scores)


def _asl_selects(rule: WindowRule, scores: list[torch.Tensor], n_layers: int, w: int, k: int, tau: float) -> bool:
    """Whether the newest layer is ASL's ``L*``: ``choose_layer`` over the layers so far (later rows are zeros: the
    ratio at a layer reads only the layers up to it) names it."""
    t = scores[0].shape[0]
    stack = torch.zeros(n_layers, 1, t, device=scores[0].device)
    stack[: len(scores), 0] = torch.stack(scores)
    candidates = torch.ones(1, t, dtype=torch.bool, device=stack.device)
    candidates[:, t - w :] = False
    star, _ = rule.choose_layer(stack, candidates, k - w, tau)
    return int(star[0]) == len(scores) - 1


@torch.inference_mode()
def decode_step(model, state: PrunedPrefill, token: int) -> torch.Tensor:
    """Feed ``token`` at ``state.next_position``: grows the cache and positions, returns the next logits ``[V]``."""
    dec = _Decoder(model)
    position = torch.tensor([state.next_position], device=dec.device)
    hidden = dec.embed(torch.tensor([int(token)]))
    rope = dec.rotary(hidden, position)
    for i in range(len(dec.layers)):
        hidden = dec.layer(i, hidden, rope, position, state.cache)
        state.positions[i] = torch.cat([state.positions[i], position.to(state.positions[i].device)])
    state.next_position += 1
    state.logits = dec.logits(hidden)
    return state.logits


def greedy_decode(model, state: PrunedPrefill, max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy tokens after the prompt (at most ``max_new_tokens``, ending at a token of ``stop_ids``, kept)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    out = [int(state.logits.argmax())]
    while len(out) < max_new_tokens and out[-1] not in stop_ids:
        out.append(int(decode_step(model, state, out[-1]).argmax()))
    return out
