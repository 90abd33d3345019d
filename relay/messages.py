"""Messages that travel along graph edges: decoded text, or latent working memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from latent_relay.relay.memory import KVState


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

    ``memory`` is a :class:`KVState`, or the packed form a quantizing recipe produced (it has ``nbytes`` and
    ``dequantize() -> KVState``). ``recipe`` is the canonical recipe string that was applied ("" for full relay).
    """

    sender: str
    memory: Any
    recipe: str = ""
    metrics: dict = field(default_factory=dict)

    def unpacked(self) -> KVState:
        mem = self.memory
        return mem if isinstance(mem, KVState) else mem.dequantize()

    @property
    def nbytes(self) -> int:
        return int(self.memory.nbytes)
