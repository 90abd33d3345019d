"""What an agent saw while thinking: the attention of each latent thought's query on every cached token.

Selectors score prompt tokens with it (the Orthogonal Backfill paper, arXiv 2604.13349, §"latent-query
attention"): a token that the agent's own latent thoughts attended to is one the next agent will need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Observation:
    """Attention rows of the latent thoughts of one agent step.

    ``attention`` is float32 ``[batch, layers, kv_heads, thoughts, tokens]``: for thought ``i`` the softmax
    attention of its query onto every slot of the memory *after* the step (the memory the agent hands on),
    averaged over the query heads of each GQA group, so every row is a probability distribution over the slots
    that existed when thought ``i`` was computed (itself included); later slots and padding hold 0.
    Multiply by ``group_size`` to get the GQA-group *sums* METHODS.md §2 uses (same ranking).
    """

    attention: torch.Tensor
    agent: str
    group_size: int = 1

    @property
    def num_thoughts(self) -> int:
        return int(self.attention.shape[3])

    @property
    def num_tokens(self) -> int:
        return int(self.attention.shape[4])

    def select_items(self, index) -> Observation:
        idx = torch.as_tensor(index, dtype=torch.long, device=self.attention.device)
        return Observation(self.attention[idx], self.agent, self.group_size)
