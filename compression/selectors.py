"""Prompt-state eviction at a relay boundary (the Orthogonal Backfill paper's selectors, arXiv 2604.13349, and
ASL's adaptive selection layer, arXiv 2601.07667).

Only the *current* agent's prompt region is evicted: slots whose segment is PROMPT and whose owner is the
observing agent. The attention sink, history (other agents' regions, decoded text) and the latent thoughts
always pass; padding is never selected. Every head of an item keeps exactly ``min(budget, prompt tokens of
that item)`` prompt tokens, so tensors stay rectangular; items that differ are right-padded with PAD slots.

Survivors keep their original positions. Kept slots stay in their original order; the kept prompt tokens sit
where the prompt region started, so for the usual contiguous prompt the order is exactly the original one and
every output slot has one segment and one owner across heads (what :class:`~latent_relay.relay.memory.KVState`
requires).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from latent_relay.compression.asl import TAU, check_tau, choose_layer
from latent_relay.kernels import dispatch
from latent_relay.relay.memory import KVState, Segment, TensorAllocator
from latent_relay.relay.observation import Observation
from latent_relay.relay.wire.frames import MemoryDims, allocate_frames, memory_frames, uniform


def current_agent_index(memory: KVState, observation: Observation | None) -> int:
    """Owner index of the agent whose prompt is evicted (-1 if it owns nothing in this memory).

    With an observation it is ``observation.agent``; without one, the owner of the last real slot of item 0
    (the agent that just wrote its thoughts).
    """
    if observation is not None:
        return memory.agents.index(observation.agent) if observation.agent in memory.agents else -1
    valid = memory.valid[0].nonzero()
    if valid.numel() == 0:
        return -1
    return int(memory.agent[0, int(valid[-1])])


def prompt_mask(memory: KVState, agent_index: int) -> torch.Tensor:
    """Bool ``[B, T]``: the current agent's prompt slots (the only evictable region)."""
    if agent_index < 0:
        return torch.zeros_like(memory.segment, dtype=torch.bool)
    return (memory.segment == Segment.PROMPT) & (memory.agent.long() == agent_index)


@dataclass
class Selection:
    """Which prompt slots survive, on the original slot layout.

    ``keep`` is bool ``[L', B, H', T]`` with ``L'`` in ``{1, L}`` and ``H'`` in ``{1, H_kv}`` (broadcast over the
    missing axes): the kept prompt slots of each (layer, item, head). ``prompt`` is the evictable region
    ``[B, T]``; ``kept`` is the number of prompt tokens each head of an item keeps, ``[B]``. Headwise and
    layerwise selections give per-head positions ``[L, B, H_kv, T]``; a ``shared`` one keeps ``[B, T]``.
    """

    keep: torch.Tensor
    prompt: torch.Tensor
    kept: torch.Tensor
    shared: bool = False  # one token set for all layers and heads (positions may stay [B, T])
    layer: torch.Tensor | None = None  # ASL: each item's selection layer L* [B] (-1: none), else None

    @property
    def evict(self) -> torch.Tensor:
        """Bool ``[L', B, H', T]``: the evicted prompt slots."""
        return self.prompt[None, :, None, :] & ~self.keep

    @property
    def prompt_tokens(self) -> torch.Tensor:
        return self.prompt.sum(dim=1)

    @property
    def retained_fraction(self) -> float:
        total = int(self.prompt_tokens.sum())
        return 1.0 if total == 0 else float(self.kept.sum()) / total


def _keep_top(scores: torch.Tensor, prompt: torch.Tensor, budget: int) -> Selection:
    """Top-``budget`` prompt slots along the last axis of ``scores`` ``[L', B, H', T]``."""
    if budget < 1:
        raise ValueError(f"budget must be a positive number of tokens, got {budget}")
    n_prompt = prompt.sum(dim=1)
    kept = n_prompt.clamp(max=budget)
    k_max = int(kept.max()) if kept.numel() else 0
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k_max > 0:
        finite = torch.nan_to_num(scores.float(), nan=-3e38, posinf=3e38, neginf=-3e38)
        masked = torch.where(prompt[None, :, None, :], finite, torch.full_like(finite, float("-inf")))
        top = masked.topk(k_max, dim=-1).indices
        rank_ok = torch.arange(k_max, device=scores.device)[None, None, None, :] < kept[None, :, None, None]
        keep.scatter_(-1, top, rank_ok.expand_as(top))
    return Selection(keep=keep, prompt=prompt, kept=kept)


def select_headwise(scores: torch.Tensor, prompt: torch.Tensor, budget: int) -> Selection:
    """H: per (layer, KV head) keep the top-``budget`` prompt tokens by score (arXiv 2604.13349)."""
    return _keep_top(scores, prompt, budget)


def select_layerwise(scores: torch.Tensor, prompt: torch.Tensor, budget: int) -> Selection:
    """L: per layer keep one top-``budget`` set shared by all KV heads, ranked by the head-summed score
    (arXiv 2604.13349)."""
    return _keep_top(scores.sum(dim=2, keepdim=True), prompt, budget)


def select_generation_only(prompt: torch.Tensor) -> Selection:
    """Gen: drop the whole current prompt region; sink, history and thoughts pass (arXiv 2604.13349)."""
    b, t = prompt.shape
    keep = torch.zeros(1, b, 1, t, dtype=torch.bool, device=prompt.device)
    kept = torch.zeros(b, dtype=torch.long, device=prompt.device)
    return Selection(keep=keep, prompt=prompt, kept=kept, shared=True)


def select_asl(scores: torch.Tensor, prompt: torch.Tensor, budget: int, tau: float = TAU) -> Selection:
    """ASL: the adaptive selection layer (arXiv 2601.07667, :mod:`latent_relay.compression.asl`) on a relay edge.

    Each layer's head-summed scores rank the prompt tokens (the observation's latent-thought queries, as the other
    selectors use, play the part of the paper's last-``w`` window); each item's selection layer ``L*`` is the first
    where the rank-variance ratio drops below ``tau``. Layers up to ``L*`` keep their own top-``budget`` per KV head
    (SnapKV-style, as ``head``: the paper's budget mode, since every layer of a memory holds the same number of
    slots, "kept whole" does not fit); every deeper layer keeps the one set of ``L*``'s top-``budget`` tokens, shared
    by all heads (the tokens the paper propagates). Every head keeps exactly ``min(budget, prompt tokens)``.

    When the ratio never drops below ``tau`` (as on a model too shallow for the test, see
    :class:`~latent_relay.compression.asl.AslLayers`) no layer is selected (``layer`` -1): every layer keeps its own
    per-head top-``budget``, exactly the ``head`` selector (the budget-mode reading of the paper's "prune nothing").
    """
    tau = check_tau(tau)
    per_layer = _keep_top(scores, prompt, budget)
    n_layers = scores.shape[0]
    star, ranks = choose_layer(scores.sum(dim=2), prompt[None], per_layer.kept, tau)  # [B], [L, B, T]
    at = torch.where(star < 0, n_layers - 1, star)
    item = torch.arange(prompt.shape[0], device=prompt.device)
    at_star = ranks[at, item]  # [B, T]: the ranks at each item's L*
    chosen = (at_star >= 1) & (at_star <= per_layer.kept[:, None])
    deeper = torch.arange(n_layers, device=prompt.device)[:, None] > at[None, :]  # [L, B]
    keep = torch.where(deeper[:, :, None, None], chosen[None, :, None, :], per_layer.keep)
    return Selection(keep=keep, prompt=prompt, kept=per_layer.kept, layer=star)


@dataclass
class Gathered:
    """The evicted memory plus where its kept prompt tokens ended up.

    ``prompt_slots`` ``[B, k_max]`` are output slot indices of the kept prompt tokens (in their original order,
    the same for every layer and head), valid where ``prompt_slots_valid``.
    """

    memory: KVState
    prompt_slots: torch.Tensor
    prompt_slots_valid: torch.Tensor


def _first_prompt_slot(prompt: torch.Tensor) -> torch.Tensor:
    b, t = prompt.shape
    if t == 0:
        return torch.zeros(b, dtype=torch.long, device=prompt.device)
    first = prompt.to(torch.int8).argmax(dim=1)
    return torch.where(prompt.any(dim=1), first, torch.full_like(first, t))


def survivor_order(memory: KVState, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot indices of the survivors ``[L', B, H', T_out]`` (original order) and ``slot_valid [B, T_out]``."""
    b, t = memory.segment.shape
    dev = memory.device
    ar = torch.arange(t, device=dev)
    prompt = selection.prompt
    other = memory.valid & ~prompt
    first = _first_prompt_slot(prompt)
    # Sort key: other slots before the prompt region, kept prompt tokens, other slots after it, dropped.
    group = torch.where(ar[None, :] < first[:, None], 0, 2)
    group = torch.where(other, group, torch.full_like(group, 3))
    group = torch.where(selection.keep, torch.ones((), dtype=group.dtype, device=dev), group[None, :, None, :])
    order = (group * t + ar).argsort(dim=-1, stable=True)
    count = other.sum(dim=1) + selection.kept
    t_out = int(count.max()) if b else 0
    slot_valid = torch.arange(t_out, device=dev)[None, :] < count[:, None]
    return order[..., :t_out], slot_valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[b, h, index[b, h, j]]`` for ``x`` ``[B, H, T, d]`` and ``index`` ``[B, H or 1, J]``: ``[B, H, J, d]``
    (written into ``out``, contiguous, when given).

    :func:`latent_relay.kernels.dispatch.gather_tokens`: a Triton kernel on CUDA tensors; elsewhere one
    ``index_select`` of whole ``d``-rows on the flattened tensor (much faster on CPU than an elementwise
    ``torch.gather`` with an index expanded along ``d``).
    """
    return dispatch.gather_tokens(x, index, out)


def gather_selection(memory: KVState, selection: Selection, allocate: TensorAllocator | None = None) -> Gathered:
    """Physically evict: gather the survivors of every layer and head (one row gather per layer).

    ``allocate`` (optional) makes the new memory's tensors, asked for its frames in wire order
    (:func:`latent_relay.relay.wire.frames.memory_frames`), e.g. inside the packet that will carry them
    (:class:`latent_relay.relay.wire.PacketArena`); the result is the same either way."""
    order, slot_valid = survivor_order(memory, selection)
    b, t_out = slot_valid.shape
    h = memory.num_kv_heads
    per_layer = order.shape[0] > 1
    shared_positions = selection.shared and not memory.per_head_positions
    out: dict[tuple[str, int], torch.Tensor | None] = {}
    if allocate is not None and uniform(memory):  # the frame spec describes the new memory: ask for its frames
        dims = replace(MemoryDims.of(memory), batch=b, tokens=t_out, per_head_positions=not shared_positions)
        frames = memory_frames(dims)
        out = {(f.part, f.layer): t for f, t in zip(frames, allocate_frames(allocate, frames, memory.device))}
    keys, values = [], []
    pad = ~slot_valid[:, None, :, None]
    any_pad = bool(pad.any())
    for i, (k, v) in enumerate(zip(memory.keys, memory.values)):
        idx = order[i if per_layer else 0]
        k_new, v_new = gather_tokens(k, idx, out.get(("keys", i))), gather_tokens(v, idx, out.get(("values", i)))
        if any_pad:  # padding slots hold zeros
            k_new.masked_fill_(pad, 0)
            v_new.masked_fill_(pad, 0)
        keys.append(k_new)
        values.append(v_new)
    slot_idx = order[0, :, 0]  # segment/owner are the same across layers and heads by construction
    segment = torch.where(slot_valid, memory.segment.gather(1, slot_idx), torch.zeros((), dtype=torch.int8))
    agent = torch.where(slot_valid, memory.agent.gather(1, slot_idx), torch.full((), -1, dtype=torch.int16))
    if shared_positions:
        position = memory.position.gather(1, slot_idx)
        position = torch.where(slot_valid, position, torch.zeros_like(position))
    else:
        full_idx = order.expand(memory.num_layers, b, h, t_out)
        position = memory.position_full().gather(-1, full_idx)
        position = torch.where(slot_valid[None, :, None, :], position, torch.zeros_like(position))
    table = {"segment": segment.to(torch.int8), "agent": agent.to(torch.int16), "position": position}
    table = {part: t if out.get((part, -1)) is None else out[part, -1].copy_(t) for part, t in table.items()}
    gathered = KVState(
        keys=keys,
        values=values,
        **table,
        agents=list(memory.agents),
        fingerprint=memory.fingerprint,
    )
    # Kept prompt tokens sit right after the "other" slots that precede the prompt region.
    first = _first_prompt_slot(selection.prompt)
    ar = torch.arange(memory.num_tokens, device=memory.device)
    start = ((memory.valid & ~selection.prompt) & (ar[None, :] < first[:, None])).sum(dim=1)
    k_max = int(selection.kept.max()) if b else 0
    ark = torch.arange(k_max, device=memory.device)
    prompt_slots = start[:, None] + ark[None, :]
    prompt_valid = ark[None, :] < selection.kept[:, None]
    prompt_slots = torch.where(prompt_valid, prompt_slots, torch.zeros_like(prompt_slots))
    return Gathered(memory=gathered, prompt_slots=prompt_slots, prompt_slots_valid=prompt_valid)


# ------------------------------------------------------------------------------------------ selector registry
#: A scored selector: ``(scores [L, B, H_kv, T], prompt [B, T], budget, **options) -> Selection``; its options are
#: keyword parameters with defaults (``asl``'s ``tau``), set by the recipe step's options of the same name.
Selector = Callable[..., Selection]

#: Scored selectors by name; a recipe's scored-eviction step names one (``h`` -> ``head``, ``l`` -> ``layer``).
SELECTORS: dict[str, Selector] = {}


def register_selector(name: str, selector: Selector) -> Selector:
    """Make ``selector`` available to scored-eviction recipe steps as ``name`` (e.g. a new ASL selector)."""
    if name in SELECTORS and SELECTORS[name] is not selector:
        raise ValueError(f"a different selector is already registered as {name!r}")
    SELECTORS[name] = selector
    return selector


register_selector("head", select_headwise)
register_selector("layer", select_layerwise)
register_selector("asl", select_asl)
