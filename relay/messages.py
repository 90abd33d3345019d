"""Messages that travel along graph edges: decoded text, or latent working memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from latent_relay.relay.memory import KVState
from latent_relay.relay.quantized import QuantizedMemory


@dataclass
class TextMessage:
    """Text relay (TextMAS): each batch item's decoded text, labelled by the sending role."""

    sender: str
    texts: list[str]

    @property
    def nbytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)


@dataclass
class LatentMessage:
    """Latent relay: the sender's working memory, possibly compressed by an edge recipe.

    ``memory`` is a :class:`KVState`, or the packed form a quantizing recipe produced (a
    :class:`~latent_relay.relay.quantized.QuantizedMemory`; the receiver turns either into the memory it prefills on
    with :func:`latent_relay.compression.quant.unpack`). ``recipe`` is the canonical recipe string that was applied
    ("" for full relay).
    """

    sender: str
    memory: KVState | QuantizedMemory
    recipe: str = ""
    metrics: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(self.memory.nbytes)
