"""Long fuzz of relay/wire/: ``python tests/fuzz/fuzz_wire.py --n 1000000`` (not collected by pytest).

Cycles through random inputs, byte mutations of small valid packets of every kind (only an edit that leaves the
packet unchanged may decode), forged packets (valid checksum, one to four hostile header edits,
:mod:`tests.fuzz.mutate`) and structured forgeries (several dimension and quantization fields at once, frame table
and payload to match, zstd bombs; :mod:`tests.fuzz.structured`), all decoded at the default limits. The property:
every input decodes or raises a PacketError, within ``--max-seconds``, and no decode allocates more than the input
carries: no input is built with more than a few MB of payload, so the address space is capped at what the process
holds plus :data:`MARGIN` (far below the decoded-size limit), and a decoder that allocates what a header or a zstd
frame merely declares gets a MemoryError, which fails. Anything else is printed with its reproducer (kind, seed;
``--replay KIND:SEED`` decodes that one input again) and fails the run. The time limit is wall-clock time: pausing
the process fails it. Prints progress and, at the end, the rate, the outcome counts by exception type and the
number of distinct error kinds (exception type and message with its numbers and names blanked).
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import resource
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from latent_relay.relay import wire  # noqa: E402
from tests.fuzz import mutate, structured  # noqa: E402

KINDS = ("random", "mutate", "forge", "fields")
MARGIN = 1 << 30  # address space allowed beyond what the process holds when fuzzing starts


def one(kind: str, seed: int, seeds: list[bytes], latent: list[bytes]) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return mutate.random_input(rng)
    if kind == "fields":
        return structured.forge_fields(latent[rng.randrange(len(latent))], rng, mutate.LIMITS)
    packet = seeds[rng.randrange(len(seeds))]
    return mutate.mutate_bytes(packet, rng) if kind == "mutate" else mutate.forge(packet, rng)


def error_kind(error: Exception) -> str:
    """An error's type and message template: numbers, quoted names and type names blanked."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", str(error))
    text = re.sub(r"-?\d[\d,._]*", "N", text)
    return f"{type(error).__name__}: {text}"


def cap_address_space() -> int:
    """Cap the address space at its size now plus :data:`MARGIN`; return the cap."""
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
    cap = size + MARGIN
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return cap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="inputs to try")
    parser.add_argument("--minutes", type=float, default=0, help="stop after this long (0: no time budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", type=int, default=50_000, help="print progress every N inputs")
    parser.add_argument("--max-seconds", type=float, default=1.0, help="per-input time limit")
    parser.add_argument("--replay", metavar="KIND:SEED", help="decode the one input a failure line names, and exit")
    args = parser.parse_args()

    seeds = mutate.seeds()
    latent = mutate.latent_seeds(seeds)
    if args.replay:
        kind, _, seed = args.replay.partition(":")
        data = one(kind, int(seed), seeds, latent)
        t0 = time.perf_counter()
        try:
            wire.decode(data, limits=mutate.LIMITS)
            outcome = "decoded"
        except wire.PacketError as e:
            outcome = f"{type(e).__name__}: {e}"
        print(f"{kind}:{seed} ({len(data):,} bytes): {outcome} in {(time.perf_counter() - t0) * 1e3:.1f} ms")
        return 0
    wire.decode(seeds[1])  # lazy imports and first allocations before the cap
    cap = cap_address_space() if sys.platform == "linux" else 0
    print(f"decoded-size limit {mutate.LIMITS.max_decoded_bytes:,} bytes; address space capped at {cap:,}", flush=True)
    originals = set(seeds)
    outcomes: collections.Counter[str] = collections.Counter()
    kinds_seen: collections.Counter[str] = collections.Counter()
    failures = done = 0
    slowest = 0.0
    start = time.perf_counter()
    deadline = start + args.minutes * 60 if args.minutes else float("inf")
    for i in range(args.n):
        if time.perf_counter() > deadline:
            break
        kind, seed = KINDS[i % len(KINDS)], args.seed * 10**9 + i
        data = one(kind, seed, seeds, latent)
        t0 = time.perf_counter()
        try:
            wire.decode(data, limits=mutate.LIMITS)
            if kind == "mutate" and data not in originals:  # a byte edit must never pass the checksum
                failures += 1
                print(f"ACCEPTED a corrupted packet: kind={kind} seed={seed}", flush=True)
            outcomes[f"{kind}: decoded" + (" (unchanged packet)" if kind == "mutate" else "")] += 1
        except wire.PacketError as e:
            outcomes[f"{kind}: {type(e).__name__}"] += 1
            kinds_seen[error_kind(e)] += 1
        except Exception:  # noqa: BLE001 - the point of the fuzzer
            failures += 1
            outcomes[f"{kind}: FAILED ({sys.exc_info()[0].__name__})"] += 1
            kinds_seen[f"FAILED {error_kind(sys.exc_info()[1])}"] += 1
            detail = traceback.format_exc() if failures <= 20 else error_kind(sys.exc_info()[1])
            print(f"FAIL kind={kind} seed={seed} (--replay {kind}:{seed})\n{detail}", flush=True)
        done += 1
        took = time.perf_counter() - t0
        slowest = max(slowest, took)
        if took > args.max_seconds:
            failures += 1
            print(f"SLOW kind={kind} seed={seed}: {took:.2f} s (--replay {kind}:{seed})", flush=True)
        if done % args.progress == 0:
            rate = done / (time.perf_counter() - start)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
            print(f"{done:>10,} inputs  {rate:,.0f}/s  failures {failures}  max rss {rss} MiB", flush=True)
    elapsed = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"\n{done:,} inputs in {elapsed:.0f} s ({done / elapsed:,.0f}/s); slowest decode {slowest * 1e3:.1f} ms; "
          f"max rss {rss} MiB")  # fmt: skip
    for name, count in sorted(outcomes.items()):
        print(f"  {name:<40} {count:>10,}")
    print(f"distinct error kinds (type and message template): {len(kinds_seen)}")
    for name, count in kinds_seen.most_common(15):
        print(f"  {count:>9,}  {name[:140]}")
    print(f"failures (non-PacketError, allocation over the limit, or slow): {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
