"""Batching per-item working memories into one padded batch, and splitting a batch back without padding.

Hand-overs are always per item and padding-free; only inside one agent step (and one edge's compression) are items
stacked, left-padded with PAD slots whose keys and values are zero and which every query masks out (LatentMAS,
arXiv 2511.20639, runs its agents batch-wise the same way). Model-free: tensors and the token table only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from latent_relay.relay.memory import KVState, Segment, TensorAllocator, check_same_model
from latent_relay.relay.observation import Observation
from latent_relay.relay.wire.frames import MemoryDims, allocate_frames, memory_frames, uniform


def stack_items(memories: Sequence[KVState]) -> KVState:
    """Stack single-item memories into one batch, left-padding shorter ones with PAD slots."""
    if any(m.batch_size != 1 for m in memories):
        raise ValueError("stack_items takes single-item memories")
    first = memories[0]
    model = next((m.fingerprint for m in memories if m.fingerprint), "")
    for m in memories:
        check_same_model(model, m.fingerprint, "an item's working memory")
    agents: list[str] = []
    for m in memories:
        agents.extend(a for a in m.agents if a not in agents)
    width = max(m.num_tokens for m in memories)
    per_head = any(m.per_head_positions for m in memories)
    keys, values, segs, owners, poss = [], [], [], [], []
    for m in memories:
        pad = width - m.num_tokens
        remap = torch.tensor([agents.index(a) for a in m.agents] + [-1], dtype=torch.long)
        owner = m.agent.long().cpu()
        owner = remap[torch.where(owner < 0, torch.full_like(owner, len(m.agents)), owner)]
        keys.append([torch.nn.functional.pad(k, (0, 0, pad, 0)) for k in m.keys])
        values.append([torch.nn.functional.pad(v, (0, 0, pad, 0)) for v in m.values])
        segs.append(torch.nn.functional.pad(m.segment, (pad, 0), value=int(Segment.PAD)))
        owners.append(torch.nn.functional.pad(owner.to(m.device), (pad, 0), value=-1))
        pos = m.position_full() if per_head else m.position
        poss.append(torch.nn.functional.pad(pos, (pad, 0), value=0))
    return KVState(
        keys=[torch.cat([k[i] for k in keys], dim=0) for i in range(first.num_layers)],
        values=[torch.cat([v[i] for v in values], dim=0) for i in range(first.num_layers)],
        segment=torch.cat(segs, dim=0),
        agent=torch.cat(owners, dim=0).to(torch.int16),
        position=torch.cat(poss, dim=1 if per_head else 0),
        agents=agents,
        fingerprint=first.fingerprint,
    )


def _take(x: torch.Tensor, dim: int, index: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``x.index_select(dim, index)``, written into ``out`` when given."""
    if out is None:
        return x.index_select(dim, index)
    if out.dtype != x.dtype:
        return out.copy_(x.index_select(dim, index))
    return torch.index_select(x, dim, index, out=out)


def split_items(memory: KVState, allocators: Sequence[TensorAllocator | None] | None = None) -> list[KVState]:
    """Per-item memories with every PAD slot removed.

    ``allocators[b]`` (optional) makes item ``b``'s tensors, asked for the frames of the item's memory in wire order
    (:func:`latent_relay.relay.wire.frames.memory_frames`), e.g. inside the packet that will carry the item
    (:class:`latent_relay.relay.wire.PacketArena`): the item is written straight into them. The result is the same
    either way."""
    items = []
    for b in range(memory.batch_size):
        index = memory.valid[b].nonzero().squeeze(1)
        allocate = allocators[b] if allocators is not None else None
        out: dict[tuple[str, int], torch.Tensor | None] = {}
        if allocate is not None and uniform(memory):
            frames = memory_frames(replace(MemoryDims.of(memory), batch=1, tokens=len(index)))
            out = {(f.part, f.layer): t for f, t in zip(frames, allocate_frames(allocate, frames, memory.device))}
        position = memory.position[:, b : b + 1] if memory.per_head_positions else memory.position[b : b + 1]
        items.append(
            KVState(
                keys=[_take(k[b : b + 1], 2, index, out.get(("keys", i))) for i, k in enumerate(memory.keys)],
                values=[_take(v[b : b + 1], 2, index, out.get(("values", i))) for i, v in enumerate(memory.values)],
                segment=_take(memory.segment[b : b + 1], 1, index, out.get(("segment", -1))),
                agent=_take(memory.agent[b : b + 1], 1, index, out.get(("agent", -1))),
                position=_take(position, position.dim() - 1, index, out.get(("position", -1))),
                agents=list(memory.agents),
                fingerprint=memory.fingerprint,
            )
        )
    return items


def split_observation(observation: Observation | None, memory: KVState) -> list[Observation] | None:
    """Per-item observations of a batch step on ``memory``, every PAD column removed (None passes through)."""
    if observation is None:
        return None
    observations = []
    for b in range(memory.batch_size):
        index = memory.valid[b].nonzero().squeeze(1)
        attention = observation.attention[b : b + 1].index_select(-1, index)
        observations.append(Observation(attention, observation.agent, observation.group_size))
    return observations
