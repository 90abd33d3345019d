"""Long fuzz of relay/wire/: ``python tests/fuzz/fuzz_wire.py --n 1000000`` (not collected by pytest).

Cycles through random inputs, byte mutations of small valid packets of every kind (only an edit that leaves
the packet unchanged may decode), and forged packets (valid
checksum, hostile header edits, see :mod:`tests.fuzz.mutate`). Every input must decode or raise a PacketError
within ``--max-seconds``; anything else is printed with its reproducer (kind, seed; ``--replay KIND:SEED`` decodes
that one input again) and fails the run. The limit is wall-clock time: pausing the process fails it.
Prints progress and, at the end, the outcome counts by exception type.
"""

from __future__ import annotations

import argparse
import collections
import random
import resource
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from latent_relay.relay import wire  # noqa: E402
from tests.fuzz import mutate  # noqa: E402


def one(kind: str, seed: int, seeds: list[bytes]) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return mutate.random_input(rng)
    packet = seeds[rng.randrange(len(seeds))]
    return mutate.mutate_bytes(packet, rng) if kind == "mutate" else mutate.forge(packet, rng)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="inputs to try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", type=int, default=50_000, help="print progress every N inputs")
    parser.add_argument("--max-seconds", type=float, default=1.0, help="per-input time limit")
    parser.add_argument("--replay", metavar="KIND:SEED", help="decode the one input a failure line names, and exit")
    args = parser.parse_args()

    seeds = mutate.seeds()
    if args.replay:
        kind, _, seed = args.replay.partition(":")
        data = one(kind, int(seed), seeds)
        t0 = time.perf_counter()
        try:
            wire.decode(data, limits=mutate.LIMITS)
            outcome = "decoded"
        except wire.PacketError as e:
            outcome = f"{type(e).__name__}: {e}"
        print(f"{kind}:{seed} ({len(data):,} bytes): {outcome} in {(time.perf_counter() - t0) * 1e3:.1f} ms")
        return 0
    originals = set(seeds)
    kinds = ("random", "mutate", "forge")
    outcomes: collections.Counter[str] = collections.Counter()
    failures = 0
    slowest = 0.0
    start = time.perf_counter()
    for i in range(args.n):
        kind, seed = kinds[i % 3], args.seed * 10**9 + i
        data = one(kind, seed, seeds)
        t0 = time.perf_counter()
        try:
            wire.decode(data, limits=mutate.LIMITS)
            if kind == "mutate" and data not in originals:  # a byte edit must never pass the checksum
                failures += 1
                print(f"ACCEPTED a corrupted packet: kind={kind} seed={seed}", flush=True)
            outcomes[f"{kind}: decoded" + (" (unchanged packet)" if kind == "mutate" else "")] += 1
        except wire.PacketError as e:
            outcomes[f"{kind}: {type(e).__name__}"] += 1
        except Exception:  # noqa: BLE001 - the point of the fuzzer
            failures += 1
            print(f"FAIL kind={kind} seed={seed} (--replay {kind}:{seed})\n{traceback.format_exc()}", flush=True)
        took = time.perf_counter() - t0
        slowest = max(slowest, took)
        if took > args.max_seconds:
            failures += 1
            print(f"SLOW kind={kind} seed={seed}: {took:.2f} s (--replay {kind}:{seed})", flush=True)
        if (i + 1) % args.progress == 0:
            rate = (i + 1) / (time.perf_counter() - start)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
            print(f"{i + 1:>10,} inputs  {rate:,.0f}/s  failures {failures}  max rss {rss} MiB", flush=True)
    elapsed = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"\n{args.n:,} inputs in {elapsed:.0f} s; slowest decode {slowest * 1e3:.1f} ms; max rss {rss} MiB")
    for name, count in sorted(outcomes.items()):
        print(f"  {name:<40} {count:>10,}")
    print(f"failures (non-PacketError or slow): {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
