"""Random working memories and observations for the compression tests (small shapes, full control of layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from latent_relay.relay.memory import KVState, Segment
from latent_relay.relay.observation import Observation


@dataclass(frozen=True)
class Layout:
    batch: int = 2
    layers: int = 2
    heads: int = 2
    head_dim: int = 8
    sink: int = 4
    history: int = 3  # other agent's prompt tokens after the sink
    text: int = 2  # decoded text of the other agent
    prompts: tuple[int, ...] = (12, 7)  # current agent's prompt length per item
    thoughts: int = 3
    left_pad: tuple[int, ...] = (0, 2)  # padding at the start of each item
    group_size: int = 2
    seed: int = 0
    decay: float = 2.0  # value spectrum decay (log10 range), 0 = isotropic


def build_memory(lay: Layout, dtype: torch.dtype = torch.float32) -> tuple[KVState, Observation]:
    """Items: [PAD x left_pad] [SINK] [other PROMPT] [TEXT] [current PROMPT] [PAD] [THOUGHT] [PAD]."""
    gen = torch.Generator().manual_seed(lay.seed)
    max_prompt = max(lay.prompts)
    max_pad = max(lay.left_pad)
    t = max_pad + lay.sink + lay.history + lay.text + max_prompt + lay.thoughts
    seg = torch.zeros(lay.batch, t, dtype=torch.int8)
    own = torch.full((lay.batch, t), -1, dtype=torch.int16)
    pos = torch.zeros(lay.batch, t, dtype=torch.long)
    for b in range(lay.batch):
        parts = [
            (Segment.PAD, -1, lay.left_pad[b]),
            (Segment.SINK, 0, lay.sink),
            (Segment.PROMPT, 0, lay.history),
            (Segment.TEXT, 0, lay.text),
            (Segment.PROMPT, 1, lay.prompts[b]),
            (Segment.PAD, -1, max_prompt - lay.prompts[b]),
            (Segment.THOUGHT, 1, lay.thoughts),
            (Segment.PAD, -1, max_pad - lay.left_pad[b]),
        ]
        i, p = 0, 0
        for s, a, n in parts:
            seg[b, i : i + n] = int(s)
            own[b, i : i + n] = a
            if s != Segment.PAD:
                pos[b, i : i + n] = torch.arange(p, p + n)
                p += n
            i += n
    valid = (seg != Segment.PAD)[:, None, :, None]
    d = lay.head_dim
    scale = torch.logspace(0, -lay.decay, d) if lay.decay else torch.ones(d)
    keys, values = [], []
    for _ in range(lay.layers):
        rot = torch.linalg.qr(torch.randn(d, d, generator=gen)).Q
        k = torch.randn(lay.batch, lay.heads, t, d, generator=gen)
        v = (torch.randn(lay.batch, lay.heads, t, d, generator=gen) * scale) @ rot
        keys.append((k * valid).to(dtype))
        values.append((v * valid).to(dtype))
    memory = KVState(keys, values, seg, own, pos, agents=["first", "second"])
    m = max(lay.thoughts, 1)
    att = torch.rand(lay.batch, lay.layers, lay.heads, m, t, generator=gen) * (seg != Segment.PAD)[:, None, None, None]
    att = att / att.sum(-1, keepdim=True).clamp_min(1e-9)
    return memory, Observation(att, "second", lay.group_size)


@st.composite
def layouts(draw, max_batch: int = 3, max_prompt: int = 16) -> Layout:
    batch = draw(st.integers(1, max_batch))
    return Layout(
        batch=batch,
        layers=draw(st.integers(1, 2)),
        heads=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([4, 8, 16])),
        sink=draw(st.integers(0, 4)),
        history=draw(st.integers(0, 4)),
        text=draw(st.integers(0, 2)),
        prompts=tuple(draw(st.lists(st.integers(0, max_prompt), min_size=batch, max_size=batch))),
        thoughts=draw(st.integers(0, 3)),
        left_pad=tuple(draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch))),
        group_size=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
        decay=draw(st.sampled_from([0.0, 1.0, 3.0])),
    )
