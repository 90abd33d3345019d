"""Model-agnostic latent working memory: the KV cache that one agent hands to the next.

A :class:`KVState` holds, per layer, keys and values shaped ``[batch, kv_heads, tokens, head_dim]`` plus a token
table that says for every token slot which *segment* it belongs to (attention sink, role prompt, latent
thought, decoded text, or padding), which *agent* wrote it, and its *original position* on the RoPE timeline.
Keys are stored post-RoPE (as transformers caches them), so a token that survives eviction keeps its original
position and is never re-rotated; new tokens continue after the largest original position (LatentMAS,
arXiv 2511.20639; eviction semantics from the Orthogonal Backfill paper, arXiv 2604.13349).

Positions are ``[batch, tokens]`` while every head holds the same tokens. Headwise or layerwise eviction keeps
different tokens per (layer, head); then positions are ``[layers, batch, kv_heads, tokens]``. Segment and owner
stay ``[batch, tokens]`` either way: eviction only ever selects inside one agent's prompt region, and every head
keeps the same count there, so a slot has one segment and one owner across heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum

import torch


class Segment(IntEnum):
    """What a token slot of the working memory holds."""

    PAD = 0
    SINK = 1
    PROMPT = 2
    THOUGHT = 3
    TEXT = 4


#: Makes the tensors of a memory about to be built, uninitialised, from their ``(shape, dtype)`` in wire order (the
#: frame spec, :func:`latent_relay.relay.wire.frames.memory_frames`) and the device; or returns ``None`` to leave the
#: allocation to the builder. A sender passes one (:class:`latent_relay.relay.wire.PacketArena`) so that a memory is
#: built straight inside the packet that will carry it.
TensorAllocator = Callable[[Sequence[tuple[tuple[int, ...], torch.dtype]], torch.device], Sequence[torch.Tensor] | None]


class MemoryError_(ValueError):
    """A working memory is malformed or does not fit the operation (shapes, models, dtypes)."""


class IncompatibleMemoryError(MemoryError_):
    """A memory made by one model was handed to another (fingerprints differ)."""


def check_same_model(expected: str, got: str, what: str = "working memory") -> None:
    """Raise :class:`IncompatibleMemoryError` when both model fingerprints are known and differ: ``what`` (a memory,
    a packet's memory) was made by model ``got`` where model ``expected`` runs. The one fingerprint check."""
    if expected and got and expected != got:
        raise IncompatibleMemoryError(f"{what} was made by model {got!r}, not by {expected!r}")


class MemoryShape:
    """Shape queries shared by every form of a working memory (``KVState`` and its quantized packing): per-layer
    ``keys`` whose elements have ``.shape`` ``[B, H_kv, T, d]`` and ``.dtype``, a ``segment`` table and
    ``position``."""

    keys: list
    segment: torch.Tensor
    position: torch.Tensor

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return int(self.segment.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.segment.shape[1])

    @property
    def num_kv_heads(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0

    @property
    def head_dim(self) -> int:
        return int(self.keys[0].shape[3]) if self.keys else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype if self.keys else torch.float32

    @property
    def per_head_positions(self) -> bool:
        """Positions are ``[layers, batch, kv_heads, tokens]`` (eviction kept different tokens per head)."""
        return self.position.dim() == 4


@dataclass
class KVState(MemoryShape):
    """Per-layer keys/values plus the token table; see the module docstring for the layout."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    segment: torch.Tensor  # int8 [B, T]
    agent: torch.Tensor  # int16 [B, T]; index into ``agents``; -1 for padding
    position: torch.Tensor  # int64 [B, T] or [L, B, H_kv, T]
    agents: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def device(self) -> torch.device:
        return self.segment.device

    def validate(self) -> None:
        """Raise :class:`MemoryError_` unless every tensor agrees with the token table."""
        if len(self.keys) != len(self.values):
            raise MemoryError_(f"{len(self.keys)} key layers but {len(self.values)} value layers")
        if self.segment.dim() != 2 or self.agent.shape != self.segment.shape:
            raise MemoryError_(
                f"segment and agent must both be [batch, tokens]; got {tuple(self.segment.shape)} "
                f"and {tuple(self.agent.shape)}"
            )
        b, t = self.segment.shape
        if self.position.dim() == 2:
            if tuple(self.position.shape) != (b, t):
                raise MemoryError_(f"position {tuple(self.position.shape)} does not match tokens {(b, t)}")
        elif self.position.dim() == 4:
            if tuple(self.position.shape[1::2]) != (b, t) or self.position.shape[0] != len(self.keys):
                raise MemoryError_(f"per-head position {tuple(self.position.shape)} does not match the memory")
        else:
            raise MemoryError_("position must be [batch, tokens] or [layers, batch, kv_heads, tokens]")
        for i, (k, v) in enumerate(() if self._layers_alike(b, t) else zip(self.keys, self.values)):
            if k.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[2] != t:
                raise MemoryError_(
                    f"layer {i}: keys {tuple(k.shape)} / values {tuple(v.shape)} do not match [batch={b}, "
                    f"heads, tokens={t}, head_dim]"
                )
            if k.shape[1] != self.keys[0].shape[1] or k.shape[3] != self.keys[0].shape[3]:
                raise MemoryError_(f"layer {i}: head count or head dim differs from layer 0")
        if self.per_head_positions and self.position.shape[2] != self.num_kv_heads:
            raise MemoryError_("per-head positions have a different head count than the keys")

    def _layers_alike(self, b: int, t: int) -> bool:
        """The usual case, checked in one step: one key shape ``[b, heads, t, head_dim]`` for every layer and one
        value shape that agrees with it up to the head dim."""
        keys, values = {k.shape for k in self.keys}, {v.shape for v in self.values}
        if len(keys) != 1 or len(values) != 1:
            return False
        (k,), (v,) = keys, values
        return len(k) == 4 and k[:3] == v[:3] and k[0] == b and k[2] == t

    # ------------------------------------------------------------- accounting
    @property
    def valid(self) -> torch.Tensor:
        """Bool ``[B, T]``: the slots that hold a real token (not padding)."""
        return self.segment != Segment.PAD

    @property
    def nbytes(self) -> int:
        """Bytes the keys and values occupy uncompressed (the paper's ``numel(K) + numel(V)`` accounting)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.keys, self.values))

    def valid_tokens(self) -> torch.Tensor:
        """Real tokens per batch item, ``[B]``."""
        return self.valid.sum(dim=1)

    def position_full(self) -> torch.Tensor:
        """Positions as ``[L, B, H_kv, T]`` whatever the stored form."""
        if self.per_head_positions:
            return self.position
        return self.position[None, :, None, :].expand(self.num_layers, -1, self.num_kv_heads, -1)

    def next_position(self) -> torch.Tensor:
        """Where new tokens start on the RoPE timeline, per batch item: largest original position + 1."""
        if self.num_tokens == 0:
            return torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        pos = self.position_full().to(torch.long)
        valid = self.valid[None, :, None, :].expand_as(pos)
        masked = torch.where(valid, pos, torch.full_like(pos, -1))
        return masked.amax(dim=(0, 2, 3)) + 1

    # ------------------------------------------------------------ conversion
    @classmethod
    def empty(
        cls,
        batch_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        fingerprint: str = "",
    ) -> KVState:
        z = torch.zeros(batch_size, num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        return cls(
            keys=[z.clone() for _ in range(num_layers)],
            values=[z.clone() for _ in range(num_layers)],
            segment=torch.zeros(batch_size, 0, dtype=torch.int8, device=device),
            agent=torch.zeros(batch_size, 0, dtype=torch.int16, device=device),
            position=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            fingerprint=fingerprint,
        )

    def extend(
        self,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        segment: torch.Tensor,
        agent: torch.Tensor,
        position: torch.Tensor,
        agents: Sequence[str] | None = None,
    ) -> KVState:
        """A new memory with ``keys``/``values`` (these tensors after new slots were appended to them, e.g. by a
        forward that grew a model's cache) and this token table extended by ``segment``/``agent``/``position``
        ``[B, new]`` for the new slots."""
        keys, values = list(keys), list(values)
        new = keys[0].shape[2] - self.num_tokens
        if new != segment.shape[1]:
            raise MemoryError_(f"the tensors grew by {new} tokens but {segment.shape[1]} table entries were given")
        if self.per_head_positions:
            pos_new = position[None, :, None, :].expand(self.num_layers, -1, self.num_kv_heads, -1)
            position = torch.cat([self.position, pos_new.to(self.position.dtype)], dim=-1)
        else:
            position = torch.cat([self.position, position.to(self.position.dtype)], dim=1)
        return replace(
            self,
            keys=keys,
            values=values,
            segment=torch.cat([self.segment, segment.to(torch.int8)], dim=1),
            agent=torch.cat([self.agent, agent.to(torch.int16)], dim=1),
            position=position,
            agents=list(agents) if agents is not None else list(self.agents),
        )

    def agent_index(self, name: str) -> tuple[KVState, int]:
        """Index of ``name`` in the owner table, registering it if new (returns the possibly extended memory)."""
        if name in self.agents:
            return self, self.agents.index(name)
        return replace(self, agents=[*self.agents, name]), len(self.agents)

    # ------------------------------------------------------------- structure
    def select_items(self, index: torch.Tensor | Sequence[int]) -> KVState:
        """The memory of a subset of batch items (same order as ``index``)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        pos = self.position[:, idx] if self.per_head_positions else self.position[idx]
        return replace(
            self,
            keys=[k[idx] for k in self.keys],
            values=[v[idx] for v in self.values],
            segment=self.segment[idx],
            agent=self.agent[idx],
            position=pos,
        )

    def compact(self) -> KVState:
        """Drop slots that are padding in every batch item (cheap clean-up after selection)."""
        keep = self.valid.any(dim=0)
        if bool(keep.all()):
            return self
        pos = self.position[..., keep]
        return replace(
            self,
            keys=[k[:, :, keep] for k in self.keys],
            values=[v[:, :, keep] for v in self.values],
            segment=self.segment[:, keep],
            agent=self.agent[:, keep],
            position=pos,
        )

    def keep_slots(self, keep: torch.Tensor) -> KVState:
        """Only the slots where ``keep`` (bool ``[B, T]``) holds: the others become padding (keys and values
        zeroed, masked by every query), then slots that are padding in every item are dropped. Positions of the
        kept tokens are unchanged."""
        keep = keep.to(self.device) & self.valid
        drop = ~keep
        if not bool(drop.any()):
            return self
        zero = drop[:, None, :, None]
        return replace(
            self,
            keys=[k.masked_fill(zero, 0) for k in self.keys],
            values=[v.masked_fill(zero, 0) for v in self.values],
            segment=self.segment.masked_fill(drop, int(Segment.PAD)),
            agent=self.agent.masked_fill(drop, -1),
        ).compact()

    def to(self, device=None, dtype: torch.dtype | None = None) -> KVState:
        return replace(
            self,
            keys=[k.to(device=device, dtype=dtype) for k in self.keys],
            values=[v.to(device=device, dtype=dtype) for v in self.values],
            segment=self.segment.to(device),
            agent=self.agent.to(device),
            position=self.position.to(device),
        )


#: What an agent sees of the memory it receives: everything; the attention sink and the latent thoughts only
#: (LatentMAS's ``latent_only``: the earlier agents' prompts dropped); or the sink and the tokens of the agent that
#: sent last (LatentMAS's ``sequential_info_only``: only the previous agent's information).
MEMORY_VIEWS = ("all", "thoughts", "last")


def memory_view(memory: KVState, view: str, last_sender: str | None = None) -> KVState:
    """``memory`` as an agent with ``view`` (:data:`MEMORY_VIEWS`) sees it; ``last_sender`` names the agent whose
    tokens ``last`` keeps (LatentMAS, arXiv 2511.20639, offers these views of the final agent's memory)."""
    if view == "all":
        return memory
    sink = memory.segment == Segment.SINK
    if view == "thoughts":
        return memory.keep_slots(sink | (memory.segment == Segment.THOUGHT))
    if view == "last":
        if last_sender not in memory.agents:
            return memory.keep_slots(sink)
        return memory.keep_slots(sink | (memory.agent.long() == memory.agents.index(last_sender)))
    raise MemoryError_(f"unknown memory view {view!r}; use one of {', '.join(MEMORY_VIEWS)}")


def check_compatible(a: KVState, b: KVState) -> None:
    """Raise unless two memories come from the same model and have the same layout."""
    check_same_model(a.fingerprint, b.fingerprint, "a memory to combine")
    if (a.num_layers, a.num_kv_heads, a.head_dim, a.batch_size) != (
        b.num_layers,
        b.num_kv_heads,
        b.head_dim,
        b.batch_size,
    ):
        raise MemoryError_("memories differ in layers, heads, head dim or batch size")


def concat_memories(memories: Sequence[KVState]) -> KVState:
    """Concatenate several memories along tokens (a DAG node with several latent parents).

    Owner tables are merged by name; keys stay post-RoPE, so no position is changed. New tokens will start after
    the largest position of all parts.
    """
    memories = [m for m in memories if m is not None]
    if not memories:
        raise MemoryError_("nothing to concatenate")
    if len(memories) == 1:
        return memories[0]
    first = memories[0]
    for m in memories[1:]:
        check_compatible(first, m)
    agents: list[str] = []
    for m in memories:
        for name in m.agents:
            if name not in agents:
                agents.append(name)
    owner_parts = []
    for m in memories:
        remap = torch.tensor([agents.index(n) for n in m.agents] + [-1], dtype=torch.int16, device=m.device)
        owner = m.agent.long()
        owner_parts.append(remap[torch.where(owner < 0, torch.full_like(owner, len(m.agents)), owner)])
    per_head = any(m.per_head_positions for m in memories)
    positions = [m.position_full() if per_head else m.position for m in memories]
    return KVState(
        keys=[torch.cat([m.keys[i] for m in memories], dim=2) for i in range(first.num_layers)],
        values=[torch.cat([m.values[i] for m in memories], dim=2) for i in range(first.num_layers)],
        segment=torch.cat([m.segment for m in memories], dim=1),
        agent=torch.cat(owner_parts, dim=1),
        position=torch.cat(positions, dim=-1),
        agents=agents,
        fingerprint=first.fingerprint,
    )
