"""The C allocator of a model host process: keep freed packet-sized memory for reuse (issue 4).

Every message that leaves a host is encoded into a packet, a new ``bytes`` object the size of the compressed
memory (7.6 MB for a Qwen2.5-0.5B-shaped batch, 22.6 MB for a Qwen3-4B-shaped item at ``h-obf:budget=32``), which
is freed once the object store holds its copy. With glibc's defaults such a block is often given back to the
operating system when it is freed (``munmap`` or a heap trim) and the next packet's pages are faulted in again
while encode writes them: ``python -m latent_relay.benchmarks.codec`` saw about 5,500 page faults on some 22.6 MB
encodes (14 ms against 5 ms without them), and giving a freed 40 MiB mapping back took 4-6 ms in an ad-hoc timing.

A host is a long-lived process that holds a model's weights, so keeping some freed heap is cheap.
:func:`retain_freed_memory` asks glibc to serve blocks up to 32 MiB from the heap and to keep up to
``trim_threshold`` bytes of free heap, so one hop's packet memory is reused by the next. Elsewhere (another C
library) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 << 20  # glibc refuses a larger one on 64-bit (HEAP_MAX_SIZE / 2)


def retain_freed_memory(mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = 1 << 30) -> bool:
    """Serve blocks of up to ``mmap_threshold`` bytes from the heap instead of fresh mappings, and give free heap
    back to the operating system only beyond ``trim_threshold`` bytes. Process-wide and for the rest of the
    process's life (it also turns off glibc's own adjustment of both thresholds). Returns whether it applied:
    ``False`` where the C library is not glibc."""
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be in (0, {MAX_MMAP_THRESHOLD}], got {mmap_threshold}")
    if not 0 <= trim_threshold < 1 << 31:
        raise ValueError(f"trim_threshold must be in [0, 2**31), got {trim_threshold}")
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
