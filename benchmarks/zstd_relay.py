"""Where zstd pays on a relay edge: packet bytes, codec throughput and hop time per recipe, on real memories.

A recipe's last step ``zstd[:level=N]`` makes the sender encode the edge's packets with a zstd payload (flags bit 0
of :mod:`latent_relay.relay.wire`); relay bytes then count the compressed packet. Whether that shortens the hop
depends on what zstd saves against what it costs. This builds the critic's working memory the way a sequential
graph does (planner, then critic, each thinking latently, on the first GSM8K items;
:func:`latent_relay.benchmarks.obf_accuracy.critic_memories`), applies each recipe, and encodes and decodes each
item's packet raw and at each zstd level, modes alternating repeat by repeat. Per recipe and mode:

- ``packet KB``: the packet's size as relay bytes count it, mean per item; ``ratio``: raw bytes / these bytes;
- ``enc MB/s`` / ``dec MB/s``: the wire codec's throughput with that payload, in MB (1e6 bytes) of the *raw*
  packet per second, medians over repeats summed over items: encode = copy (raw) or zstd (one thread) + the
  checksum; decode = checksum + views (raw) or checksum + inflate + views;
- ``hop ms``: encode + bytes / link + decode per item, for links of 1, 10 and 100 Gbit/s (modelled), and with
  ``--ray`` the measured trip through Ray's loopback object store (sender actor to receiver actor, the numpy view
  the Ray runtime sends, decode included) plus encode.

The verdict line per recipe gives, per level, the link speed below which zstd shortens the hop (bytes saved / the
codec time it adds): zstd pays on a link slower than that, not on a faster one.

    python -m latent_relay.benchmarks.zstd_relay                               # smollm2-135m, 8 items
    python -m latent_relay.benchmarks.zstd_relay --model qwen2.5-coder-1.5b    # the default model
    python -m latent_relay.benchmarks.zstd_relay --quick                       # smoke test: 2 items, 1 repeat
    python -m latent_relay.benchmarks.zstd_relay --recipe gen --recipe h:budget=16+int4 --level 1 --level 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import torch

from latent_relay.benchmarks.obf_accuracy import critic_memories, memories_header
from latent_relay.compression.recipes import RecipeError, compress, parse_recipe
from latent_relay.relay import wire
from latent_relay.relay.messages import LatentMessage

FULL = "latent (full)"
RECIPES = (FULL, "h-obf:budget=32", "int8", "l-obf:budget=32+int8", "l-obf:budget=32+int4")
LEVELS = (1, 3)
LINKS_GBIT = (1, 10, 100)


@dataclass
class Mode:
    """One way of encoding an edge's packets (``level`` None: raw), summed over items: bytes and median seconds."""

    level: int | None
    raw_bytes: int = 0
    bytes: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    ray_s: list[float] = field(default_factory=list)  # per item: the Ray loopback trip (decode included)
    zstd_packets: int = 0  # packets that zstd shrank (the others stayed raw)

    @property
    def label(self) -> str:
        return "raw" if self.level is None else f"zstd-{self.level}"

    def hop_s(self, items: int, gbit: float) -> float:
        """Mean seconds per item of encode + bytes over a ``gbit`` Gbit/s link + decode."""
        return (self.encode_s + self.decode_s + self.bytes * 8 / (gbit * 1e9)) / items

    def ray_hop_s(self, items: int) -> float:
        return (self.encode_s + sum(self.ray_s)) / items


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(messages: list[LatentMessage], levels: tuple[int, ...], repeats: int, trip=None) -> list[Mode]:
    """Per mode (raw, then each zstd level), bytes and median encode / decode seconds summed over ``messages``;
    ``trip(packet) -> seconds`` (optional) times one Ray loopback trip of a packet."""
    modes = [Mode(None), *(Mode(level) for level in levels)]
    for message in messages:
        packets = {m.level: wire.encode(message, zstd_level=m.level) for m in modes}
        times: dict[int | None, list[tuple[float, float]]] = {m.level: [] for m in modes}
        for i in range(repeats + 1):  # the first round is a warm-up
            for m in modes:
                enc = _seconds(lambda msg=message, level=m.level: wire.encode(msg, zstd_level=level))
                dec = _seconds(lambda packet=packets[m.level]: wire.decode(packet))
                if i:
                    times[m.level].append((enc, dec))
        raw = wire.packet_size(packets[None])
        for m in modes:
            packet = packets[m.level]
            m.raw_bytes += raw
            m.bytes += wire.packet_size(packet)
            m.zstd_packets += bool(wire.open_packet(packet).flags & wire.FLAG_ZSTD)
            m.encode_s += statistics.median(e for e, _ in times[m.level])
            m.decode_s += statistics.median(d for _, d in times[m.level])
            if trip is not None:
                m.ray_s.append(trip(packet))
    return modes


def break_even_gbit(raw: Mode, z: Mode) -> float:
    """The link speed (Gbit/s) below which ``z`` gives a shorter hop than ``raw``: inf where it is faster and
    smaller, 0 where it saves no bytes."""
    saved_bits = (raw.bytes - z.bytes) * 8
    extra_s = (z.encode_s + z.decode_s) - (raw.encode_s + raw.decode_s)
    if saved_bits <= 0:
        return 0.0
    if extra_s <= 0:
        return float("inf")
    return saved_bits / extra_s / 1e9


def verdict(recipe: str, modes: list[Mode], items: int, ray: bool) -> str:
    raw, parts = modes[0], []
    pays_on: list[str] = []
    for z in modes[1:]:
        gbit = break_even_gbit(raw, z)
        where = "never" if gbit == 0 else "on every link" if gbit == float("inf") else f"below {gbit:.2f} Gbit/s"
        parts.append(f"{z.label} x{raw.bytes / z.bytes:.3f} pays {where}")
        pays_on += [f"{z.label} at {g} Gbit/s" for g in LINKS_GBIT if z.hop_s(items, g) < raw.hop_s(items, g)]
        if ray and z.ray_hop_s(items) < raw.ray_hop_s(items):
            pays_on.append(f"{z.label} on Ray loopback")
    conclusion = f"shortens the hop: {', '.join(pays_on)}" if pays_on else "shortens no hop here: keep it off"
    return f"{recipe}: {'; '.join(parts)} -> {conclusion}"


def ray_trip(repeats: int):
    """A function timing one packet's trip from a sender actor to a receiver actor that decodes it (median of
    ``repeats``, after a warm-up), on a loopback-only Ray cluster started here, and the function that stops it."""
    import ray

    from latent_relay.benchmarks.ray_transport import Receiver, Sender
    from latent_relay.relay.runtime.cluster import start_local_cluster

    start_local_cluster(num_cpus=2, object_store_memory=512 << 20)
    receiver = ray.remote(num_cpus=0)(Receiver).remote()
    sender_cls = ray.remote(num_cpus=0)(Sender)

    def trip(packet) -> float:
        sender = sender_cls.remote(bytes(packet))
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            ray.get(receiver.take.remote(sender.send.remote("numpy")))
            if i:
                times.append(time.perf_counter() - start)
        ray.kill(sender)
        return statistics.median(times)

    return trip, ray.shutdown


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a bundled model (default smollm2-135m, for speed)")
    ap.add_argument("--items", type=int, default=8, help="GSM8K items (from the first; one memory each)")
    ap.add_argument("--thoughts", type=int, default=10, help="latent thoughts per agent")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per packet and mode (medians)")
    ap.add_argument("--level", type=int, action="append", dest="levels", help="zstd level (repeatable; default 1, 3)")
    ap.add_argument(
        "--recipe",
        action="append",
        dest="recipes",
        metavar="RECIPE",
        help=f"a recipe without zstd, or 'full' (repeatable; default: {', '.join(RECIPES)})",
    )
    ap.add_argument("--ray", action="store_true", help="also time the trip through Ray's loopback object store")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 items, 4 thoughts, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.thoughts, args.repeats = 2, 4, 1
    levels = tuple(args.levels or LEVELS)
    for level in levels:
        if not 1 <= level <= 19:
            ap.error(f"zstd level {level} is not in 1..19")
    recipes = [FULL if r in ("full", "latent", FULL) else r for r in (args.recipes or RECIPES)]
    for recipe in recipes:  # a malformed recipe fails here, before the model loads
        try:
            if recipe != FULL and parse_recipe(recipe).zstd_level is not None:
                ap.error(f"recipe {recipe!r} has a zstd step: give it without one (--level sets the levels)")
        except RecipeError as e:
            ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    name, cases = critic_memories(args.model, args.items, args.thoughts, args.data_dir)
    print(
        f"{memories_header(name, cases, args.thoughts)}, critic memories of "
        f"{statistics.fmean(m.num_tokens for m, _ in cases):.0f} tokens on average; built in "
        f"{time.perf_counter() - start:.0f} s; {torch.get_num_threads()} torch threads"
    )
    trip, stop = ray_trip(args.repeats) if args.ray else (None, None)
    results: list[tuple[str, list[Mode]]] = []
    try:
        for recipe in recipes:
            messages = []
            for memory, observation in cases:
                if recipe == FULL:
                    messages.append(LatentMessage("critic", memory))
                else:
                    packed, _ = compress(memory, observation, recipe)
                    messages.append(LatentMessage("critic", packed, parse_recipe(recipe).canonical))
            results.append((recipe, measure(messages, levels, args.repeats, trip)))
    finally:
        if stop is not None:
            stop()

    n = len(cases)
    links = "".join(f"{f'hop ms {g}G':>12}" for g in LINKS_GBIT) + (f"{'hop ms Ray':>12}" if args.ray else "")
    print(
        f"\nmedians of {args.repeats} repeats per packet; MB/s of raw packet bytes; hop = encode + bytes / link "
        f"+ decode, mean per item{'; Ray: encode + measured loopback trip (decode included)' if args.ray else ''}"
    )
    columns = f"{'packet KB':>11}{'ratio':>8}{'zstd pkts':>10}{'enc MB/s':>10}{'dec MB/s':>10}"
    print(f"{'recipe':<24}{'mode':<8}{columns}{links}")
    for recipe, modes in results:
        for m in modes:
            hops = "".join(f"{m.hop_s(n, g) * 1e3:>12.3f}" for g in LINKS_GBIT)
            hops += f"{m.ray_hop_s(n) * 1e3:>12.3f}" if args.ray else ""
            zstd = f"{m.zstd_packets}/{n}" if m.level is not None else "-"
            print(
                f"{recipe if m.level is None else '':<24}{m.label:<8}{m.bytes / n / 1e3:>11.1f}"
                f"{m.raw_bytes / m.bytes:>8.3f}{zstd:>10}{m.raw_bytes / m.encode_s / 1e6:>10.0f}"
                f"{m.raw_bytes / m.decode_s / 1e6:>10.0f}{hops}"
            )
    print("\nverdict (zstd pays on links slower than its break-even speed):")
    for recipe, modes in results:
        print(verdict(recipe, modes, n, args.ray))
    print(f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
