"""Input generators shared by the CI fuzz test and the long fuzz script: byte mutations of valid packets and
forged packets whose checksum is valid but whose header fields are replaced by hostile values (one to four nodes of
the header at random here; several dimension fields at once, with the frame table and payload to match, in
:mod:`tests.fuzz.structured`). Every input is decoded at the default limits (:data:`LIMITS`)."""

from __future__ import annotations

import random

from latent_relay.relay import wire
from tests.fuzz.packets import seal, seed_packets, split

HOSTILE = [
    None, True, -1, 0, 1, 2, 3, 7, 2**31, 2**62, 2**63 - 1, 2**64 - 1, -(2**63), 1 << 20, (1 << 20) + 1, 1.5,
    float("nan"), float("inf"), "", "x" * 300,
    "float64", "int8", "kv", "quantized", "text", "latent", [], [1], ["a"], [[]], {}, {"bits": 4},
    {"bits": 99},
    [["segment", "int8", [1, 3], 0, 3]], [[0, 0, 0, 0, 0]], b"\x00" * 8,
]  # fmt: skip

LIMITS = wire.DEFAULT_LIMITS  # what a host decodes with: the fuzzers hold those, not reduced ones


def mutate_bytes(packet: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flips, byte sets, inserts, deletes, truncation, duplicated spans."""
    buf = bytearray(packet)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 3:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 4:
            del buf[pos:]
        else:
            buf[pos:pos] = buf[max(0, pos - 32) : pos]
    return bytes(buf)


def _edit(value, rng: random.Random, depth: int = 0):
    """Replace one randomly chosen node of a header (nested maps and lists) by a hostile value."""
    if depth > 4 or not isinstance(value, (dict, list)) or not value or rng.random() < 0.25:
        return rng.choice(HOSTILE)
    if isinstance(value, dict):
        key = rng.choice(list(value))
        if rng.random() < 0.1:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _edit(value[key], rng, depth + 1)}
    i = rng.randrange(len(value))
    if rng.random() < 0.1:
        return value[:i] + value[i + 1 :]
    return value[:i] + [_edit(value[i], rng, depth + 1)] + value[i + 1 :]


def forge(packet: bytes, rng: random.Random) -> bytes:
    """A re-sealed packet (valid checksum) with one to four hostile header edits and sometimes a mutated payload."""
    header, stored, raw_len, flags = split(packet)
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        header = _edit(header, rng)
    if rng.random() < 0.3 and stored:
        stored = mutate_bytes(stored, rng)
        raw_len = len(stored) if not flags else raw_len
    if rng.random() < 0.1:
        raw_len = rng.choice([0, raw_len + 1, 2**40, 2**64 - 1])
    try:
        return seal(header, stored, raw_len, flags)
    except (OverflowError, ValueError, TypeError):  # msgpack cannot pack it: fall back to a byte mutation
        return mutate_bytes(packet, rng)


def random_input(rng: random.Random) -> bytes:
    """Random bytes, sometimes behind a valid magic and prefix."""
    body = rng.randbytes(rng.randrange(300))
    if rng.random() < 0.5:
        prefix = wire.PREFIX.pack(
            wire.MAGIC,
            wire.FORMAT_VERSION,
            rng.randrange(2),
            rng.randrange(400),
            rng.choice([0, 0, 64, rng.randrange(400)]),  # header padding
            rng.randrange(400),
            rng.randrange(400),
        )
        body = prefix + body
    return body


def seeds() -> list[bytes]:
    return seed_packets()


def latent_seeds(packets: list[bytes]) -> list[bytes]:
    """The packets of ``packets`` that carry a working memory (what :func:`structured.forge_fields` edits)."""
    return [p for p in packets if split(p)[0].get("kind") == "latent"]
