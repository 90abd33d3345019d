"""A wire packet's trip between two Ray actors, and a whole relay hop between two hosts (issue 4).

``python -m latent_relay.benchmarks.ray_transport [--repeats N] [--quick]``

1. The trip, as bytes and as the numpy view the Ray runtime sends.
The Ray runtime (:mod:`latent_relay.relay.runtime.ray_runtime`) moves packets from the host that encoded them to the
host that decodes them through Ray's object store. A ``bytes`` object travels inside Ray's pickle stream: it is copied
into the store and copied out again on the receiving side. A numpy array travels out of band: it is copied into the
store and the receiver gets a read-only view of the store's memory, which :func:`latent_relay.relay.wire.decode` reads
in place. This times one trip per form (sender returns the packet, receiver decodes it), alternating the forms
repeat by repeat on one loopback-only cluster, for packets of an ``h-obf:budget=32,rank=2`` memory (and its
``+int8`` form) of the shapes in :mod:`latent_relay.benchmarks.codec`; it reports medians and the median per-repeat
ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

from latent_relay.benchmarks.codec import SHAPES, make_cache

HOP_RECIPES = ("h-obf:budget=32,rank=2", "h-obf:budget=32,rank=2+int8")


class Sender:
    """Holds one encoded packet and hands it out as ``bytes`` or as a numpy view."""

    def __init__(self, packet: bytes):
        self.packet = packet

    def send(self, form: str):
        from latent_relay.relay.runtime.host import out_of_band

        return self.packet if form == "bytes" else out_of_band(self.packet)


class Receiver:
    """Decodes what it is given (the packet arrives resolved from the object store)."""

    def take(self, packet) -> int:
        from latent_relay.relay.wire import decode

        message = decode(packet)
        return int(message.memory.num_layers)


class HopSender:
    """A sending host: holds a cache of one :data:`latent_relay.benchmarks.codec.SHAPES` shape; each hop compresses
    and encodes it and returns the packet as the runtime sends it, with the sender's time stamps."""

    def __init__(self, shape: int):
        import torch

        from latent_relay.relay.runtime.allocator import retain_freed_memory
        from latent_relay.relay.threads import available_cpus

        retain_freed_memory()
        torch.set_num_threads(available_cpus())  # an actor without CPUs reserved starts with one torch thread
        self.memory, self.observation = make_cache(SHAPES[shape])

    def hop(self, recipe: str):
        from latent_relay.compression.recipes import compress
        from latent_relay.relay.messages import LatentMessage
        from latent_relay.relay.runtime.host import out_of_band
        from latent_relay.relay.wire import PacketArena, encode

        arena = PacketArena()  # as a host sends: the memory is built inside its packet
        start = time.perf_counter()
        packed, _ = compress(self.memory, self.observation, recipe, allocate=arena.allocate)
        compressed = time.perf_counter()
        packet = encode(LatentMessage("planner", packed, recipe), into=arena)
        encoded = time.perf_counter()
        return out_of_band(packet), (start, compressed, encoded)


class HopReceiver:
    """A receiving host: decodes the packet (and dequantizes a quantized memory), then lets it go."""

    def __init__(self):
        from latent_relay.relay.runtime.allocator import retain_freed_memory

        retain_freed_memory()

    def take(self, sent) -> tuple[float, ...]:
        from latent_relay.compression.quant import unpack
        from latent_relay.relay.wire import decode

        arrived = time.perf_counter()
        packet, stamps = sent
        message = decode(packet)
        decoded = time.perf_counter()
        if message.recipe.endswith(("int8", "int4")):
            unpack(message)
        dequantized = time.perf_counter()
        del message, packet, sent
        freed = time.perf_counter()
        return (*stamps, arrived, decoded, dequantized, freed)


def hop_steps(stamps: tuple[float, ...]) -> dict[str, float]:
    """Seconds per step of one hop from its seven time stamps (see :class:`HopSender`, :class:`HopReceiver`);
    giving the packet back counts with decode, as in :mod:`latent_relay.benchmarks.codec`."""
    start, compressed, encoded, arrived, decoded, dequantized, freed = stamps
    return {
        "compress": compressed - start,
        "encode": encoded - compressed,
        "transport": arrived - encoded,
        "decode": decoded - arrived + freed - dequantized,
        "dequantize": dequantized - decoded,
        "hop": freed - start,
    }


def print_hops(shapes: list[int], repeats: int) -> None:
    """Time ``repeats`` hops per (shape, recipe) between a sender and a receiver actor and print the table."""
    import ray

    sender_cls, receiver_cls = ray.remote(num_cpus=0)(HopSender), ray.remote(num_cpus=0)(HopReceiver)
    print(f"\nrelay hop between two hosts (ms, medians of {repeats} hops; share = (encode + decode) / hop)")
    print(
        f"{'hop':<42}{'compress':>9}{'encode':>8}{'transport':>10}{'decode':>8}{'dequant':>8}{'hop':>8}"
        f"{'share':>7}{'(per hop)':>12}{'in-process share':>18}"
    )
    receiver = receiver_cls.remote()
    for shape in shapes:
        sender = sender_cls.remote(shape)
        for recipe in HOP_RECIPES:
            steps = []
            for i in range(repeats + 1):  # the first hop is a warm-up
                stamps = ray.get(receiver.take.remote(sender.hop.remote(recipe)))
                if i:
                    steps.append(hop_steps(stamps))
            shares = [(s["encode"] + s["decode"]) / s["hop"] for s in steps]
            local = [(s["encode"] + s["decode"]) / (s["hop"] - s["transport"]) for s in steps]
            ms = {k: statistics.median(s[k] for s in steps) * 1e3 for k in steps[0]}
            print(
                f"{SHAPES[shape].name + ' ' + recipe:<42}{ms['compress']:>9.1f}{ms['encode']:>8.2f}"
                f"{ms['transport']:>10.2f}{ms['decode']:>8.2f}{ms['dequantize']:>8.2f}{ms['hop']:>8.1f}"
                f"{statistics.median(shares):>7.1%}{f'{min(shares):.1%}-{max(shares):.1%}':>12}"
                f"{statistics.median(local):>18.1%}"
            )
        ray.kill(sender)
    ray.kill(receiver)


def packets(quick: bool) -> list[tuple[str, bytes]]:
    from latent_relay.compression.recipes import compress
    from latent_relay.relay.messages import LatentMessage
    from latent_relay.relay.wire import encode

    out = []
    for shape in SHAPES[:1] if quick else SHAPES:
        memory, observation = make_cache(shape)
        for recipe in ("h-obf:budget=32,rank=2", "h-obf:budget=32,rank=2+int8"):
            packed, _ = compress(memory, observation, recipe)
            out.append((f"{shape.name} {recipe}", encode(LatentMessage("planner", packed, recipe))))
    return out


def main(argv: list[str] | None = None) -> None:
    from latent_relay.relay.runtime.ray_runtime import start_local_cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="only the Qwen2.5-0.5B-shaped packets")
    args = ap.parse_args(argv)
    cases = packets(args.quick)
    start_local_cluster(num_cpus=2, object_store_memory=512 << 20)
    import ray

    sender_cls, receiver_cls = ray.remote(num_cpus=0)(Sender), ray.remote(num_cpus=0)(Receiver)
    print(f"loopback Ray {ray.__version__}; medians of {args.repeats} trips per form (forms alternate)")
    print(f"{'packet':<42}{'MB':>7}{'bytes ms':>10}{'numpy ms':>10}{'numpy / bytes':>15}")
    try:
        receiver = receiver_cls.remote()
        for label, packet in cases:
            sender = sender_cls.remote(packet)
            times: dict[str, list[float]] = {"bytes": [], "numpy": []}
            for i in range(args.repeats + 1):  # the first round is a warm-up
                for form in times:
                    start = time.perf_counter()
                    ray.get(receiver.take.remote(sender.send.remote(form)))
                    if i:
                        times[form].append(time.perf_counter() - start)
            ratio = statistics.median(n / b for b, n in zip(times["bytes"], times["numpy"], strict=True))
            b_ms, n_ms = (statistics.median(times[f]) * 1e3 for f in ("bytes", "numpy"))
            print(f"{label:<42}{len(packet) / 1e6:>7.1f}{b_ms:>10.1f}{n_ms:>10.1f}{ratio:>15.2f}")
            ray.kill(sender)
        ray.kill(receiver)
        print_hops([0] if args.quick else list(range(len(SHAPES))), args.repeats)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
