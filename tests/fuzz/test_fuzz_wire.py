"""CI fuzz of relay/wire/ (issue 4): 10,500 random, mutated and forged inputs see only PacketError.

Three hypothesis tests (3,500 examples each) drive :mod:`tests.fuzz.mutate` with a hypothesis-chosen seed;
each input must decode or raise a PacketError, within a second, without growing the process by more than
a few hundred MB (decode limits are small). tests/fuzz/fuzz_wire.py is the long (1M+) version.
"""

from __future__ import annotations

import random
import resource
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latent_relay.relay import wire
from tests.fuzz import mutate

EXAMPLES = 3_500
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
SEEDS = mutate.seeds()


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
