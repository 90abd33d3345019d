"""The working memory as a transformers cache, and back: the one place that knows transformers' cache classes.

A :class:`~latent_relay.relay.memory.KVState` is model-agnostic; a forward pass needs a ``DynamicCache``. The cache
is built from the memory's own tensors (no copy) and grows in place as the model appends new positions; afterwards
the memory is read back from it with the token table of the new slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from latent_relay.relay.memory import KVState

if TYPE_CHECKING:
    from transformers import DynamicCache


def to_cache(memory: KVState) -> DynamicCache:
    """A transformers ``DynamicCache`` holding copy-free views of the memory's keys and values."""
    from transformers import DynamicCache  # imported when a model runs, not when the package is imported

    return DynamicCache([(k, v) for k, v in zip(memory.keys, memory.values)])


def read_back(
    memory: KVState,
    cache: DynamicCache,
    segment: torch.Tensor,
    agent: torch.Tensor,
    position: torch.Tensor,
    agents: Sequence[str] | None = None,
) -> KVState:
    """The memory ``cache`` holds after a forward grew it (made from ``memory`` by :func:`to_cache`): its tensors,
    and ``memory``'s token table extended by ``segment``/``agent``/``position`` ``[B, new]`` for the new slots."""
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return memory.extend(keys, values, segment, agent, position, agents)
