"""Wire format: messages as self-describing, checksummed, size-limited packets (issue 4).

A packet is one contiguous buffer (all integers little-endian)::

    0   magic  b"LRLY"              4 bytes
    4   format version              u16
    6   flags (bit 0: zstd payload) u16, other bits zero
    8   header length               u32
    12  header padding              u32, a multiple of 64 (zero unless the packet was built in place)
    16  stored payload length       u64
    24  raw payload length          u64 (after decompression)
    32  header                      msgpack map
        zero padding to a 64-byte boundary, then the header padding's zero bytes
    P   payload                     tensor frames, each at the next 64-byte boundary (or one zstd frame of them)
    end checksum                    16 bytes

The header names the message kind, sender, model fingerprint, dtype, layers, KV heads, head dim, the token
table's agents, the applied recipe, quantization parameters and, per frame, dtype / shape / offset / size.
The token table (segment, agent, position) and every key / value tensor (or the packed codes, scales and zeros
of a KIVI-quantized memory, :mod:`latent_relay.relay.quantized`) are frames, in the one order the frame spec lists
(:func:`frames.memory_frames`): the table, then per layer its key and value frames. The header implies every
frame's dtype, shape and offset, so a decoder accepts exactly one frame table (compared in one step) and builds
each per-layer column of frames as one strided view of the payload. Encoding writes each payload byte once,
straight into the new packet, checksumming it while it is in cache (:mod:`.encode`). A sender can also build the
memory inside the packet in the first place (:class:`PacketArena`): then encoding writes only the header and the
checksum around frames already in place, and the header padding fills the room it reserved for the header.
Decoding is zero-copy where the buffer alignment allows: tensors are views of the packet (or of the decompressed
payload); a misaligned buffer is copied once.

The checksum is XXH3-128 over the fixed prefix, the header and the XXH3-128 of each 4 MiB chunk of the payload
(a hash tree of depth one, so that large payloads are hashed by parallel threads), so a flipped bit anywhere is
caught before the header is parsed. The header is msgpack read with strict settings (``raw=False``,
``strict_map_key=True``, no ext types, bounded lengths); nothing is unpickled or evaluated. Hard limits
(:class:`WireLimits`) bound the header size, the decoded size (a zstd bomb is refused from its declared sizes
before anything is inflated), layers, heads, tokens, groups and frames; the payload length a header implies is
computed in Python integers, held to the decoded-size limit (so no product of header fields can overflow) and must
equal the one the prefix declares before a zstd payload is inflated. The decoded-size limit defaults to what the
host can hold (a quarter of its memory, at most 16 GiB; :func:`~.format.default_max_decoded_bytes`). Every problem
raises a :class:`PacketError`.

The package, one idea per module: :mod:`.format` (constants, limits, errors), :mod:`.checksum` (the tree digest),
:mod:`.frames` (the frame spec and its placement), :mod:`.encode`, :mod:`.arena` (packets built in place),
:mod:`.header` (a header's fields, within the limits, and the payload they imply) and :mod:`.decode`. What a
packet says in human terms (``relay inspect``) is the CLI's (:mod:`latent_relay.relay.cli_inspect`); the checksum's
tuning constants are :mod:`.checksum`'s.
"""

from latent_relay.relay.wire.arena import PacketArena
from latent_relay.relay.wire.checksum import DIGEST_SEED, DIGEST_SIZE
from latent_relay.relay.wire.decode import Packet, decode, decode_packet, open_packet
from latent_relay.relay.wire.encode import encode, encoded_size, packet_size
from latent_relay.relay.wire.format import (
    ALIGN,
    DEFAULT_LIMITS,
    DTYPE_NAMES,
    DTYPES,
    FLAG_ZSTD,
    FLOAT_NAMES,
    FORMAT_VERSION,
    MAGIC,
    PREFIX,
    ChecksumError,
    HeaderError,
    LimitExceededError,
    ModelMismatchError,
    PacketError,
    TruncatedPacketError,
    UnsupportedVersionError,
    WireLimits,
)
from latent_relay.relay.wire.frames import Frame, MemoryDims, memory_frames

__all__ = [
    "ALIGN",
    "DEFAULT_LIMITS",
    "DIGEST_SEED",
    "DIGEST_SIZE",
    "DTYPES",
    "DTYPE_NAMES",
    "FLAG_ZSTD",
    "FLOAT_NAMES",
    "FORMAT_VERSION",
    "MAGIC",
    "PREFIX",
    "ChecksumError",
    "Frame",
    "HeaderError",
    "LimitExceededError",
    "MemoryDims",
    "ModelMismatchError",
    "Packet",
    "PacketArena",
    "PacketError",
    "TruncatedPacketError",
    "UnsupportedVersionError",
    "WireLimits",
    "decode",
    "decode_packet",
    "encode",
    "encoded_size",
    "memory_frames",
    "open_packet",
    "packet_size",
]
