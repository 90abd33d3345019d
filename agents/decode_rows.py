"""Finished items leave the decoding batch: later forwards run only on the items still decoding.

When items finish, their rows are set aside as they are (their memory is final) and the batch keeps only the other
rows (keys, values and token table; the caller rebuilds the model's cache from them). At the end the batch is put
back together in item order, each set-aside row right-padded with PAD slots (zero keys and values, masked for every
query) to the width of the longest row: the same per-item memories as decoding every row to the end with finished
rows masked, minus the forwards."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latent_relay.relay.memory import KVState, Segment


class DecodeRows:
    """Which item each row of the decoding batch holds, and the memories of the items that left it."""

    def __init__(self, batch_size: int):
        self.items = list(range(batch_size))
        self.left: dict[int, KVState] = {}

    def leave(self, memory: KVState, done: Sequence[bool]) -> tuple[KVState, list[int]]:
        """Set aside the rows whose item is ``done``; returns the memory of the remaining rows and their places in
        the old batch (every row when nothing finished: the memory is returned as it is)."""
        keep = [i for i, item in enumerate(self.items) if not done[item]]
        if len(keep) == len(self.items):
            return memory, keep
        for i, item in enumerate(self.items):
            if done[item]:
                self.left[item] = memory.select_items([i])
        self.items = [self.items[i] for i in keep]
        return memory.select_items(keep), keep

    def whole(self, memory: KVState) -> KVState:
        """The batch in item order: ``memory``'s rows (the items still in the batch) and the rows that left,
        right-padded with PAD slots to the widest row."""
        if not self.left:
            return memory
        device = memory.device
        parts = [(torch.tensor(self.items, dtype=torch.long, device=device), memory)]
        parts += [(torch.tensor([item], dtype=torch.long, device=device), m) for item, m in self.left.items()]
        batch = len(self.items) + len(self.left)
        width = max(m.num_tokens for _, m in parts)

        def place(get, batch_dim: int, token_dim: int, fill) -> torch.Tensor:
            tensors = [(index, get(m)) for index, m in parts]
            shape = list(tensors[0][1].shape)
            shape[batch_dim], shape[token_dim] = batch, width
            out = tensors[0][1].new_full(shape, fill)
            for index, t in tensors:
                out.narrow(token_dim, 0, t.shape[token_dim]).index_copy_(batch_dim, index, t)
            return out

        per_head = memory.per_head_positions
        layers = range(memory.num_layers)
        return KVState(
            keys=[place(lambda m, i=i: m.keys[i], 0, 2, 0) for i in layers],
            values=[place(lambda m, i=i: m.values[i], 0, 2, 0) for i in layers],
            segment=place(lambda m: m.segment, 0, 1, int(Segment.PAD)),
            agent=place(lambda m: m.agent, 0, 1, -1),
            position=place(lambda m: m.position, 1 if per_head else 0, 3 if per_head else 1, 0),
            agents=list(memory.agents),
            fingerprint=memory.fingerprint,
        )
