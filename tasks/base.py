"""The common shape of a benchmark task: load items, score an answer, state the final answer format (and when an
answer in it is complete, :mod:`latent_relay.tasks.stops`)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latent_relay.relay.decode_config import AnswerStop


@dataclass(frozen=True)
class TaskItem:
    """One problem: `question` is what the agents are given, `gold` what the scorer compares against."""

    id: str
    question: str
    gold: Any
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class Task(ABC):
    """A benchmark: `load` reads items from the data folder, `score` judges a final answer text."""

    name: str = ""
    answer_format: str = ""  # instruction appended to the final agent's prompt

    @abstractmethod
    def load(self, n: int | None = None, data_dir: str | os.PathLike | None = None) -> list[TaskItem]:
        """The first `n` items (all when `n` is None)."""

    @abstractmethod
    def score(self, item: TaskItem, answer_text: str) -> bool:
        """Whether `answer_text` (the final agent's output) answers `item` correctly."""

    @property
    def answer_stop(self) -> AnswerStop | None:
        """When a final answer in this task's format is complete (decoding stops the item there); None: no rule."""
        from latent_relay.tasks.stops import answer_stop_for  # stops reads the tasks' own answer parsers

        return answer_stop_for(self.answer_format)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_n(n: int | None) -> None:
    if n is not None and n < 0:
        raise ValueError(f"n must be a non-negative number of items, got {n}")
