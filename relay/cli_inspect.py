"""``relay inspect FILE``: a packet's header in human terms (the CLI side of :mod:`latent_relay.relay.wire`)."""

from __future__ import annotations

from latent_relay.relay.memory import Segment
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.wire import (
    DEFAULT_LIMITS,
    DTYPES,
    FLAG_ZSTD,
    FORMAT_VERSION,
    HeaderError,
    Packet,
    PacketError,
    WireLimits,
    decode_packet,
    open_packet,
)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def describe(data: bytes | bytearray | memoryview, *, limits: WireLimits = DEFAULT_LIMITS) -> str:
    """A packet's header in human terms (what ``relay inspect FILE`` prints). Verifies the packet first: a bad
    packet raises a :class:`PacketError` (and nothing else), whose message is one line."""
    try:
        packet = open_packet(data, limits=limits)
        return _render(packet, decode_packet(packet, limits=limits))
    except (PacketError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - decode raises only PacketError; this keeps any slip from a traceback
        raise HeaderError(f"unreadable packet: {type(e).__name__}: {e}".splitlines()[0]) from e


def _render(packet: Packet, message: TextMessage | LatentMessage) -> str:
    h = packet.header
    level = h.get("zstd_level")
    stored = "zstd" if packet.flags & FLAG_ZSTD else "raw"
    if level is not None and not packet.flags & FLAG_ZSTD:
        stored = f"raw (zstd level {level} did not shrink it)"
    elif level is not None:
        stored = f"zstd level {level}"
    lines = [
        f"latent-relay packet, format v{FORMAT_VERSION}: {_size(packet.total)} ({packet.total:,} bytes)",
        f"  kind       {h['kind']}",
        f"  sender     {h['sender']}",
        f"  payload    {stored}; header {_size(packet.header_len)}"
        + (f" + {_size(packet.header_pad)} padding (built in place)" if packet.header_pad else "")
        + f", payload {_size(packet.stored_len)} "
        f"stored / {_size(len(packet.payload))} raw, {len(h.get('frames', []))} frames",
    ]
    if isinstance(message, TextMessage):
        lines.append(f"  texts      {len(message.texts)} ({_size(message.nbytes)} of UTF-8)")
        return "\n".join(lines)
    memory = message.memory
    quant = h.get("quant")
    form = "full-precision KV"
    if h["memory"] == "quantized":
        form = f"int{quant['bits'] if quant else '?'} KIVI (keys per channel, values per token)"
        if quant and quant.get("key_group"):
            form += f", key groups of {quant['key_group']} tokens"
        if quant and quant.get("value_group"):
            form += f", value groups of {quant['value_group']} channels"
    seg = memory.segment.long()
    counts = ", ".join(f"{s.name.lower()} {int((seg == s).sum())}" for s in Segment)
    logical = 2 * h["layers"] * h["batch"] * h["kv_heads"] * h["tokens"] * h["head_dim"]
    logical *= DTYPES[h["dtype"]].itemsize
    lines += [
        f"  model      {h['fingerprint'] or '(no fingerprint)'}",
        f"  memory     {form}; dtype {h['dtype']}",
        f"  shape      {h['layers']} layers x {h['kv_heads']} KV heads x head dim {h['head_dim']}; batch "
        f"{h['batch']}, {h['tokens']} token slots" + (" (per-head positions)" if h["per_head_positions"] else ""),
        f"  tokens     {counts} (over the batch)",
        f"  agents     {', '.join(h['agents']) or '(none)'}",
        f"  recipe     {h['recipe'] or '(full relay)'}",
        f"  size       {_size(logical)} as {h['dtype']} K/V -> {_size(packet.total)} on the wire "
        f"({logical / max(packet.total, 1):.2f}x)",
    ]
    return "\n".join(lines)
