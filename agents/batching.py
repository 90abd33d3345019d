"""Batching per-item working memories into one padded forward, and splitting them back without padding.

Hand-overs are always per item and padding-free; only inside one agent step are items stacked (left-padded
with PAD slots whose keys and values are zero and which every query masks out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latent_relay.relay.memory import KVState, Segment
from latent_relay.relay.observation import Observation


def stack_memories(memories: Sequence[KVState]) -> KVState:
    """Stack single-item memories into one batch, left-padding shorter ones with PAD slots."""
    if any(m.batch_size != 1 for m in memories):
        raise ValueError("stack_memories takes single-item memories")
    first = memories[0]
    fps = {m.fingerprint for m in memories if m.fingerprint}
    if len(fps) > 1:
        from latent_relay.relay.memory import IncompatibleMemoryError

        raise IncompatibleMemoryError("items of one batch carry memories of different models")
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


def split_memory(memory: KVState, observation: Observation | None = None):
    """Per-item memories (and observations) with every PAD slot removed."""
    items, observations = [], []
    for b in range(memory.batch_size):
        keep = memory.valid[b]
        pos = (
            memory.position[b : b + 1, keep]
            if not memory.per_head_positions
            else memory.position[:, b : b + 1][..., keep]
        )
        items.append(
            KVState(
                keys=[k[b : b + 1, :, keep].contiguous() for k in memory.keys],
                values=[v[b : b + 1, :, keep].contiguous() for v in memory.values],
                segment=memory.segment[b : b + 1, keep],
                agent=memory.agent[b : b + 1, keep],
                position=pos,
                agents=list(memory.agents),
                fingerprint=memory.fingerprint,
            )
        )
        if observation is not None:
            att = observation.attention[b : b + 1][..., keep].contiguous()
            observations.append(Observation(att, observation.agent, observation.group_size))
    return items, (observations if observation is not None else None)
