"""How an agent decodes text: a node setting of the graph, read by the agents' decoder
(:mod:`latent_relay.agents.decoding`). Greedy by default; temperature / top-p sampling with a seed, a token budget,
stop strings, and whether the final agent stops as soon as its answer is complete (:class:`AnswerStop`, a task's
rule, handed to decoding by the runtime)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class DecodeConfig(BaseModel):
    """How an agent decodes text.

    ``stop_at_answer`` (on by default): the final node stops each item as soon as its text holds a complete answer
    in the task's format (the task's :class:`AnswerStop`: GSM8K, MedQA and HumanEval have one), and a stopped item
    leaves the batch; ``False`` decodes every item to end of sequence, a stop string or ``max_new_tokens``."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(512, ge=1, le=32768)
    greedy: bool = True
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int = 0
    stop_at_answer: bool = True


@dataclass(frozen=True)
class AnswerStop:
    """When a final answer is complete: ``complete(text)`` on an item's decoded text so far.

    Decoding asks it only after a token whose text holds one of ``triggers`` (every token when ``triggers`` is
    empty), so a rule must stay true once it is true: the answer's last character is among the triggers, or a
    trigger follows it. Tasks define these (:mod:`latent_relay.tasks.stops`); decoding knows only this shape."""

    name: str
    complete: Callable[[str], bool]
    triggers: str = ""

    def __call__(self, text: str) -> bool:
        return self.complete(text)
