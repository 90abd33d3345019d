"""latent_relay.relay.runtime.allocator: a host's C allocator keeps packet-sized blocks for reuse (issue 4)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from latent_relay.relay.runtime.allocator import MAX_MMAP_THRESHOLD, retain_freed_memory

# In a child process: the setting is process-wide and permanent. After it, freeing and allocating packet-sized
# blocks (with other frees in between, as torch's are in a hop) takes no new pages: the heap is reused.
CHILD = """
import resource, sys
from latent_relay.relay.runtime.allocator import retain_freed_memory
applied = retain_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
packet = b"x" * (22 << 20)
other = b"y" * (40 << 20)
del packet, other
before = faults()
for _ in range(5):
    packet = b"x" * (22 << 20)  # written in full (not calloc): every page not yet mapped faults
    del packet
print(applied, faults() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_packet_memory_is_reused():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) < 100  # five 22 MiB packets would otherwise map in 5 x 5,632 pages


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mmap_threshold": 0},
        {"mmap_threshold": MAX_MMAP_THRESHOLD + 1},
        {"trim_threshold": -1},
        {"trim_threshold": 1 << 31},
    ],
)
def test_bad_thresholds_are_refused(kwargs):
    with pytest.raises(ValueError, match="threshold"):
        retain_freed_memory(**kwargs)
