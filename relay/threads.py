"""Process-wide worker thread pools for C work that releases the GIL (the wire checksum's hashing).

Keep torch ops out of these threads: running part of the OBF solve in such a thread left the process's later
torch work about 35% slower on a 2-core CPU (an ad-hoc timing of the paper-style OBF loop before and after one
call; likely the thread's own OpenMP team staying behind).

A pool is created on first use and again after a fork: a forked child inherits the pool object but not its
threads, and would wait forever on work submitted to it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[str, tuple[int, ThreadPoolExecutor]] = {}
_LOCK = threading.Lock()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's pool called ``name`` (``workers`` threads, fixed by the first call in this process)."""
    with _LOCK:
        entry = _POOLS.get(name)
        if entry is None or entry[0] != os.getpid():
            entry = (os.getpid(), ThreadPoolExecutor(max(1, workers), thread_name_prefix=f"relay-{name}"))
            _POOLS[name] = entry
        return entry[1]
