"""A wire packet's trip between two Ray actors, as bytes and as the numpy view the Ray runtime sends (issue 4).

``python -m benchmarks.ray_transport [--repeats N] [--quick]``

The Ray runtime (:mod:`relay.runtime.ray_runtime`) moves packets from the host that encoded them to the host that
decodes them through Ray's object store. A ``bytes`` object travels inside Ray's pickle stream: it is copied into
the store and copied out again on the receiving side. A numpy array travels out of band: it is copied into the
store and the receiver gets a read-only view of the store's memory, which :func:`relay.wire.decode` reads in
place. This times one trip per form (sender returns the packet, receiver decodes it), alternating the forms
repeat by repeat on one loopback-only cluster, for packets of an ``h-obf:budget=32,rank=2`` memory (and its
``+int8`` form) of the shapes in :mod:`benchmarks.codec`; it reports medians and the median per-repeat ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.codec import SHAPES, make_cache


class Sender:
    """Holds one encoded packet and hands it out as ``bytes`` or as a numpy view."""

    def __init__(self, packet: bytes):
        self.packet = packet

    def send(self, form: str):
        from relay.runtime.ray_runtime import out_of_band

        return self.packet if form == "bytes" else out_of_band(self.packet)


class Receiver:
    """Decodes what it is given (the packet arrives resolved from the object store)."""

    def take(self, packet) -> int:
        from relay.wire import decode

        message = decode(packet)
        return int(message.memory.num_layers)


def packets(quick: bool) -> list[tuple[str, bytes]]:
    from compression import compress
    from relay.messages import LatentMessage
    from relay.wire import encode

    out = []
    for shape in SHAPES[:1] if quick else SHAPES:
        memory, observation = make_cache(shape)
        for recipe in ("h-obf:budget=32,rank=2", "h-obf:budget=32,rank=2+int8"):
            packed, _ = compress(memory, observation, recipe)
            out.append((f"{shape.name} {recipe}", encode(LatentMessage("planner", packed, recipe))))
    return out


def main(argv: list[str] | None = None) -> None:
    from relay.runtime.ray_runtime import start_local_cluster

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
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
