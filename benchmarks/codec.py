"""Wire codec throughput and the serialization share of a relay hop (issue 4).

``python -m latent_relay.benchmarks.codec [--repeats N] [--quick]``

1. Encode and decode throughput of :mod:`latent_relay.relay.wire` for raw, zstd-1 and zstd-3 payloads, next to a plain
   memory copy of the same bytes (``bytes(memoryview)`` and ``torch.cat`` + ``clone`` of the tensors), in GB/s
   of cache bytes (medians over repeats). Encode = one copy into the packet + the chunked XXH3-128 checksum;
   decode = checksum check + zero-copy ``torch.frombuffer`` views (raw) or inflate + views (zstd). The raw
   codec and the memory copy are timed in alternation and their ratio is the median of per-repeat ratios.
2. The hop: ``compression.compress`` with ``h-obf:budget=32,rank=2`` (and ``+int8``) + encode + decode (+ the
   receiver's dequantization for ``+int8``), timed step after step in every repeat, and the share of the hop
   spent in the wire codec (encode + decode): the median of the per-repeat shares, and their range. As a host
   sends it, the memory is built inside its packet (:class:`latent_relay.relay.wire.PacketArena`: encode writes only the
   header and the checksum around it; a quantized memory is still copied); the ``(copied)`` row is the same fp32
   hop with the memory copied into a new packet, for comparison.
   Decode includes giving the packet's memory back once the message is dropped. ``encode faults`` counts the page
   faults of one encode (median): the packet is a fresh ``bytes`` object whose pages the operating system maps
   in as encode writes them, a cost of the C allocator and the machine (high on a small VM) more than of the
   codec. The hops are timed twice: with the C library's default allocator settings, then as a model host runs
   them (:func:`latent_relay.relay.runtime.allocator.retain_freed_memory`: freed packet memory is kept for the next
   packet).

Caches are random, shaped like Qwen2.5-0.5B (24 layers, 2 KV heads, head dim 64, 600 tokens, batch 4, fp32)
and Qwen3-4B (36 layers, 8 KV heads, head dim 128, 540 tokens = 500 prompt + 40 thoughts, batch 1, fp32).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from dataclasses import dataclass

import torch

from latent_relay.relay import wire
from latent_relay.relay.memory import KVState, Segment
from latent_relay.relay.messages import LatentMessage
from latent_relay.relay.observation import Observation
from latent_relay.relay.runtime.allocator import retain_freed_memory


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    heads: int
    head_dim: int
    tokens: int
    batch: int
    query_heads: int
    thoughts: int = 40


SHAPES = [
    Shape("Qwen2.5-0.5B", 24, 2, 64, 600, 4, 14),
    Shape("Qwen3-4B", 36, 8, 128, 540, 1, 32),  # batch 1 keeps the run short on a small CPU box
]


def make_cache(s: Shape, seed: int = 0) -> tuple[KVState, Observation]:
    """A random cache: sink (4) + the planner's prompt + its latent thoughts, with a matching observation."""
    g = torch.Generator().manual_seed(seed)
    shape = (s.batch, s.heads, s.tokens, s.head_dim)
    keys = [torch.randn(shape, generator=g) for _ in range(s.layers)]
    values = [torch.randn(shape, generator=g) for _ in range(s.layers)]
    segment = torch.full((s.batch, s.tokens), int(Segment.PROMPT), dtype=torch.int8)
    segment[:, :4] = Segment.SINK
    segment[:, -s.thoughts :] = Segment.THOUGHT
    memory = KVState(
        keys=keys,
        values=values,
        segment=segment,
        agent=torch.zeros(s.batch, s.tokens, dtype=torch.int16),
        position=torch.arange(s.tokens).expand(s.batch, -1).clone(),
        agents=["planner"],
        fingerprint=f"bench/{s.name}",
    )
    logits = torch.randn(s.batch, s.layers, s.heads, s.thoughts, s.tokens, generator=g)
    attention = torch.softmax(logits, dim=-1)
    return memory, Observation(attention, "planner", s.query_heads // s.heads)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(_seconds(fn) for _ in range(repeats))


def codec_rows(memory: KVState, repeats: int) -> tuple[list[tuple[str, float, float, float, float]], float]:
    """(mode, encode s, decode s, packet bytes, logical bytes) per mode, plus the memory-copy baselines, and the
    median over repeats of (memcpy s) / (raw encode s + raw decode s).

    The memory copy and the raw codec are timed in alternation, repeat by repeat, so that both see the same
    machine state (fresh large buffers cost page faults whose price drifts on a VM); their ratio is the median of
    the per-repeat ratios."""
    logical = memory.nbytes
    message = LatentMessage("planner", memory, "")
    raw_packet = wire.encode(message)
    view = memoryview(raw_packet)
    wire.decode(raw_packet)
    copies, encodes, decodes = [], [], []
    for _ in range(repeats + 1):  # the first round is a warm-up
        copies.append(_seconds(lambda: bytes(view)))
        encodes.append(_seconds(lambda: wire.encode(message)))
        decodes.append(_seconds(lambda packet=raw_packet: wire.decode(packet)))
    copies, encodes, decodes = copies[1:], encodes[1:], decodes[1:]
    ratio = statistics.median(c / (e + d) for c, e, d in zip(copies, encodes, decodes, strict=True))
    rows = [("memcpy bytes(memoryview)", statistics.median(copies), 0.0, len(raw_packet), logical)]
    view.release()
    clone_s = median_seconds(lambda: [t.clone() for t in (*memory.keys, *memory.values)], repeats)
    rows.append(("memcpy tensor.clone", clone_s, 0.0, logical, logical))
    rows.append(("raw", statistics.median(encodes), statistics.median(decodes), len(raw_packet), logical))
    del raw_packet
    for label, level in (("zstd-1", 1), ("zstd-3", 3)):
        packet = wire.encode(message, zstd_level=level)
        enc = median_seconds(lambda level=level: wire.encode(message, zstd_level=level), repeats)
        dec = median_seconds(lambda packet=packet: wire.decode(packet), repeats)
        rows.append((label, enc, dec, len(packet), logical))
        del packet
    return rows, ratio


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hop_rows(memory: KVState, observation: Observation, repeats: int) -> list[tuple]:
    """(label, compress s, encode s, decode s, dequantize s, packet bytes, per-repeat serialization shares, encode
    page faults, hop s) of one relay hop, or (label, error); the label is the recipe, ``(copied)`` for the fp32 hop
    without a :class:`latent_relay.relay.wire.PacketArena`.

    Decode is the wire codec alone (checks + zero-copy views); dequantize is the receiving half of a quantizing
    recipe (``unpack``: int codes back to floats), timed apart because it is recipe work, not serialization.
    The four steps are timed one after another in each repeat, so that all see the same machine state; the
    share is the median of the per-repeat shares (encode + decode) / (compress + encode + decode + dequantize).
    """
    from latent_relay.compression.quant import unpack
    from latent_relay.compression.recipes import compress

    rows: list[tuple] = []
    fp32 = "h-obf:budget=32,rank=2"
    cases = ((fp32, fp32, True), (f"{fp32}+int8", f"{fp32}+int8", True), (f"{fp32} (copied)", fp32, False))
    for label, recipe, in_place in cases:
        try:
            compress(memory, observation, recipe)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking the codec
            rows.append((label, f"{type(e).__name__}: {str(e)[:150]}"))
            continue
        quantized = recipe.endswith(("int8", "int4"))
        steps: list[tuple[float, float, float, float]] = []
        faults: list[int] = []
        for _ in range(repeats + 1):  # the first round is a warm-up
            arena = wire.PacketArena() if in_place else None
            start = time.perf_counter()
            packed, _ = compress(memory, observation, recipe, allocate=arena.allocate if arena else None)
            compressed = time.perf_counter()
            before = _minor_faults()
            packet = wire.encode(LatentMessage("planner", packed, recipe), into=arena)
            encoded = time.perf_counter()
            faults.append(_minor_faults() - before)
            received = wire.decode(packet)
            decoded = time.perf_counter()
            if quantized:
                unpack(received)
            dequantized = time.perf_counter()
            size = len(packet)
            del received, packet, packed, arena  # the packet's memory goes back: counted with decode
            freed = time.perf_counter()
            decode = decoded - encoded + freed - dequantized
            steps.append((compressed - start, encoded - compressed, decode, dequantized - decoded))
        steps = steps[1:]
        shares = [(e + d) / (c + e + d + q) for c, e, d, q in steps]
        comp, enc, dec, deq = (statistics.median(column) for column in zip(*steps))
        hop = statistics.median(sum(step) for step in steps)
        rows.append((label, comp, enc, dec, deq, size, shares, statistics.median(faults[1:]), hop))
    return rows


def _minor_faults() -> int:
    """Page faults of this process so far (a fresh packet's pages are faulted in as encode writes them)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def print_hops(memory: KVState, observation: Observation, repeats: int, allocator: str) -> None:
    """The hop table of one cache (see :func:`hop_rows`), run with ``allocator``."""
    print(f"hop, {allocator}:")
    print(
        f"{'hop recipe':<34}{'compress s':>11}{'encode s':>10}{'decode s':>10}{'dequant s':>10}{'hop s':>8}"
        f"{'packet MB':>10}{'serialization share':>21}{'(per repeat)':>14}{'encode faults':>16}"
    )
    try:
        hops = hop_rows(memory, observation, repeats)
    except ImportError as e:
        hops = [("(any)", f"compression.compress unavailable: {e}")]
    for row in hops:
        if len(row) == 2:
            print(f"{row[0]:<34}compress failed ({row[1]}); hop share not measured: compare the raw codec")
            print(f"{'':<34}row above with 'memcpy tensor.clone' (a cache-sized memory copy) instead")
            continue
        recipe, comp, enc, dec, deq, size, shares, faults, hop = row
        spread = f"{min(shares):.1%}-{max(shares):.1%}"
        print(
            f"{recipe:<34}{comp:>11.3f}{enc:>10.4f}{dec:>10.4f}{deq:>10.4f}{hop:>8.3f}{size / 1e6:>10.2f}"
            f"{statistics.median(shares):>21.1%}{spread:>14}{faults:>16,.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="only the Qwen2.5-0.5B-shaped cache")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; "
        f"medians of {args.repeats} repeats; GB = 1e9 bytes of fp32 cache"
    )
    shapes = SHAPES[:1] if args.quick else SHAPES
    for shape in shapes:
        memory, observation = make_cache(shape)
        gb = memory.nbytes / 1e9
        print(
            f"\n{shape.name}-shaped cache: {shape.layers} layers x {shape.heads} KV heads x "
            f"{shape.head_dim}, {shape.tokens} tokens, batch {shape.batch}, fp32 = {gb * 1e3:.1f} MB"
        )
        rows, raw_ratio = codec_rows(memory, args.repeats)
        copy_rate = gb / rows[0][1]
        print(
            f"{'mode':<26}{'packet MB':>10}{'ratio':>7}{'encode GB/s':>13}{'decode GB/s':>13}"
            f"{'enc+dec GB/s':>14}{'vs memcpy':>11}"
        )
        for mode, enc, dec, size, logical in rows:
            both = gb / (enc + dec)
            dec_s = f"{gb / dec:>13.2f}" if dec else f"{'-':>13}"
            print(
                f"{mode:<26}{size / 1e6:>10.1f}{logical / size:>7.2f}{gb / enc:>13.2f}{dec_s}{both:>14.2f}"
                f"{both / copy_rate:>10.0%}"
            )
        print(f"raw encode + decode vs memcpy, median of per-repeat ratios (timed in alternation): {raw_ratio:.0%}")
        print_hops(memory, observation, args.repeats, "the default allocator")
        del memory, observation
    applied = retain_freed_memory()
    how = "applied" if applied else "not glibc, so nothing changed"
    print(
        f"\nThe hops again, as a model host runs them: retain_freed_memory() {how}"
        " (latent_relay.relay.runtime.allocator)"
    )
    for shape in shapes:
        memory, observation = make_cache(shape)
        print(f"\n{shape.name}-shaped cache")
        print_hops(memory, observation, args.repeats, "freed packet memory kept for reuse")
        del memory, observation


if __name__ == "__main__":
    main()
