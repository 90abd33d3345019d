"""CI fuzz of relay/wire/ (issues 4 and 17): random, mutated, forged and structured inputs see only PacketError.

Four hypothesis tests (1,000 to 2,000 examples each, seconds in all) drive :mod:`tests.fuzz.mutate` and
:mod:`tests.fuzz.structured` with a hypothesis-chosen seed, decoding at the default limits; each input must decode
or raise a PacketError, within a second, without growing the process by more than a few hundred MB, and a
structured forgery (zstd bombs included) must not make decode allocate more than the payload it builds whole.
tests/fuzz/fuzz_wire.py is the long (1M+) version, which also caps the address space at the decoded-size limit.
"""

from __future__ import annotations

import random
import resource
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latent_relay.relay import wire
from tests.fuzz import mutate, structured

EXAMPLES = 1_000
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
SEEDS = mutate.seeds()
LATENT = mutate.latent_seeds(SEEDS)
#: The most a structured forgery may make decode allocate (Python objects: the inflated payload among them): the
#: largest payload it builds whole, and room for the packet and the header.
ALLOWED = max(structured.FULL_BOMB, structured.PAYLOAD) + (4 << 20)


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert grown < 256 << 20, f"fuzzing grew the process by {grown >> 20} MiB"


def check(data: bytes) -> None:
    start = time.perf_counter()
    try:
        wire.decode(data, limits=mutate.LIMITS)
    except wire.PacketError:
        pass
    assert time.perf_counter() - start < 1.0, "decode took over a second"


@SETTINGS
@given(
    data=st.one_of(st.binary(max_size=400), st.integers(0, 2**32).map(lambda s: mutate.random_input(random.Random(s))))
)
def test_random_inputs_only_raise_packet_errors(data):
    check(data)


@SETTINGS
@given(which=st.integers(0, len(SEEDS) - 1), seed=st.integers(0, 2**32))
def test_mutated_packets_only_raise_packet_errors(which, seed):
    check(mutate.mutate_bytes(SEEDS[which], random.Random(seed)))


@SETTINGS
@given(which=st.integers(0, len(SEEDS) - 1), seed=st.integers(0, 2**32))
def test_forged_packets_only_raise_packet_errors(which, seed):
    check(mutate.forge(SEEDS[which], random.Random(seed)))


@settings(SETTINGS, max_examples=2 * EXAMPLES)
@given(which=st.integers(0, len(LATENT) - 1), seed=st.integers(0, 2**32))
def test_structured_forgeries_only_raise_packet_errors_and_allocate_no_more_than_they_carry(which, seed):
    data = structured.forge_fields(LATENT[which], random.Random(seed), mutate.LIMITS)
    tracemalloc.start()  # around decode only: tracing the forging would cost ten times more
    try:
        check(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < ALLOWED, f"decoding a {len(data):,}-byte forgery allocated {peak:,} bytes"
