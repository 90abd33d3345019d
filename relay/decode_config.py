"""How an agent decodes text: a node setting of the graph, read by the agents' decoder
(:mod:`latent_relay.agents.decoding`). Greedy by default; temperature / top-p sampling with a seed, a token budget
and stop strings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DecodeConfig(BaseModel):
    """How an agent decodes text."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(256, ge=1, le=32768)
    greedy: bool = True
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int = 0
