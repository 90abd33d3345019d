"""The task registry: loaders for the shared evaluation data (or generators of synthetic items) and scorers for final
answers, by name.

`get_task(name)` returns a `Task` with `name`, `answer_format` (the instruction for the final agent),
`load(n, data_dir=None) -> list[TaskItem]` and `score(item, answer_text) -> bool`.
"""

from __future__ import annotations

from collections.abc import Callable

from latent_relay.tasks.base import Task, TaskItem
from latent_relay.tasks.data import DataNotFoundError
from latent_relay.tasks.gsm8k import GSM8K
from latent_relay.tasks.humaneval import HumanEval
from latent_relay.tasks.kv_retrieval import KVRetrieval
from latent_relay.tasks.medqa import MedQA
from latent_relay.tasks.needle import Needle

#: Task names -> tasks. ``needle`` and ``kv-retrieval`` are generated (seed 0, lengths 1K-8K tokens by the
#: characters-per-token estimate, depths 0-1: :mod:`latent_relay.tasks.long_context`); the others read data files.
TASKS: dict[str, Callable[[], Task]] = {
    "gsm8k": GSM8K,
    "humaneval": HumanEval,
    "kv-retrieval": KVRetrieval,
    "medqa": MedQA,
    "needle": Needle,
}


class UnknownTaskError(ValueError):
    """A task name that is not registered."""


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The task registered under `name` (case-insensitive)."""
    key = (name or "").strip().lower()
    if key not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; choose one of {', '.join(task_names())}")
    return TASKS[key]()


__all__ = ["DataNotFoundError", "Task", "TaskItem", "UnknownTaskError", "get_task", "task_names", "TASKS"]
