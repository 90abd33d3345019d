"""Scoring off the scheduler's thread: a finished batch's records are built (and its answers scored, which for
HumanEval runs every item's tests in a sandbox) on a small thread pool, so the scheduler keeps collecting steps,
submitting work and watching deadlines meanwhile."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class ScorePool:
    """Runs ``fn(*args)`` jobs on ``workers`` threads; :meth:`done` hands back the finished ones with their keys."""

    def __init__(self, workers: int = 4):
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="relay-score")
        self.pending: dict[Future, Any] = {}

    def submit(self, key: Any, fn: Callable, *args) -> None:
        self.pending[self.pool.submit(fn, *args)] = key

    def done(self) -> list[tuple[Any, Any, BaseException | None]]:
        """``(key, result, error)`` of every job that has ended since the last call, in submission order."""
        ended = [f for f in self.pending if f.done()]
        return [(self.pending.pop(f), None if f.exception() else f.result(), f.exception()) for f in ended]

    def close(self, wait: bool = True) -> None:
        """Stop the threads; ``wait``: let running jobs end first (queued ones are dropped)."""
        self.pool.shutdown(wait=wait, cancel_futures=True)
        self.pending.clear()

    def __enter__(self) -> ScorePool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)
