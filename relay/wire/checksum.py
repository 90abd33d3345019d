"""A packet's checksum: XXH3-128 over the prefix and header, and the XXH3-128 of each 4 MiB chunk of the payload (a
hash tree of depth one, so that a large payload is hashed by parallel threads)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import xxhash

from latent_relay.relay.threads import available_cpus, shared_pool

DIGEST_SIZE = 16
DIGEST_SEED = 0x4C524C59  # 'LRLY'
DIGEST_CHUNK = 4 << 20  # payload bytes per leaf of the checksum tree
LEAVES_PER_RUN = 2  # a checksum thread is handed at least this many leaves (8 MiB): waking it costs more below
HASH_STEP = 256 << 10  # bytes hashed per update: small enough to still be in a core's cache after it was written


def hash_step() -> int:
    """The hashing step: :data:`HASH_STEP`, or one whole leaf where the leaf is not a multiple of it."""
    return HASH_STEP if DIGEST_CHUNK % HASH_STEP == 0 else DIGEST_CHUNK


def digest(head: memoryview | bytes, payload: memoryview, write: Callable[[int], None] | None = None) -> bytes:
    """XXH3-128 over the header block and the XXH3-128 of each :data:`DIGEST_CHUNK` chunk of ``payload``. A
    non-cryptographic checksum: it detects corruption, not tampering. A large payload's chunks are hashed in
    contiguous runs, at most one per available CPU, the caller taking the first (xxhash releases the GIL), so the
    checksum never dominates a hop. A payload is split into at most one run per :data:`LEAVES_PER_RUN` leaves: handing a
    thread less costs more than it saves (waking it, and, in a hop, sharing a CPU with torch's OpenMP workers, which
    spin for milliseconds after the compression's last op). So a 7.6 MB packet is copied and hashed by the caller
    alone, a 22.6 MB one by two threads.

    Each chunk is hashed in steps of :func:`hash_step` bytes; ``write(j)``, when given, is called just before
    step ``j`` (payload bytes ``[j * step, (j + 1) * step)``) is hashed and must fill them: the encoder copies a
    step's frames into the packet there, so the copy and the checksum read the source once, the checksum reading
    the copy from cache, and both run on the checksum's threads."""
    total, step = len(payload), hash_step()
    n_leaves = -(-total // DIGEST_CHUNK)
    leaves: list[bytes] = [b""] * n_leaves

    def hash_run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            h = xxhash.xxh3_128(seed=DIGEST_SEED)
            for start in range(i * DIGEST_CHUNK, min(total, (i + 1) * DIGEST_CHUNK), step):
                if write is not None:
                    write(start // step)
                h.update(payload[start : start + step])
            leaves[i] = h.digest()

    runs = min(n_leaves, max(1, n_leaves // LEAVES_PER_RUN), available_cpus(), 4)
    bounds = [n_leaves * i // max(1, runs) for i in range(runs + 1)]
    pending = [hash_pool().submit(hash_run, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    try:
        if runs:
            hash_run(bounds[0], bounds[1])
    finally:
        for future in pending:
            future.result()
    h = xxhash.xxh3_128(seed=DIGEST_SEED)
    h.update(head)
    for leaf in leaves:
        h.update(leaf)
    return h.digest()


def hash_pool() -> ThreadPoolExecutor:
    """The checksum threads (the caller hashes one run itself, so one fewer than the runs)."""
    return shared_pool("wire-digest", 3)
