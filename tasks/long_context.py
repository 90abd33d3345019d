"""What the synthetic long-context tasks share (RULER-style, arXiv 2404.06654; the needle-in-a-haystack test): seeded
generation without downloads, fitting a document to a requested token count, a grid of lengths x depths, and a
``\\boxed{}`` answer.

**Lengths.** The requested length counts the tokens of an item's whole ``question`` (document and query) as the
agents get it; role prompts and the answer format come on top. Tokens are counted by a tokenizer when a task is
given one (anything with ``encode``, a callable returning ids or a count), else estimated as
``ceil(characters / 4.0)`` (:data:`CHARS_PER_TOKEN`, English prose under a BPE tokenizer). A document is the largest
number of filler *units* (sentences, key-value lines) whose question fits: it is never longer than requested and
short by less than one unit, which is at most :data:`LENGTH_TOLERANCE` tokens under the estimate.

**Determinism.** Item ``i`` of a task with seed ``s`` comes from ``random.Random("<task>:<s>:<i>")`` alone (string
seeds hash the same in every process), so an item is the same whether loaded alone, in a longer list or elsewhere.
Item ``i`` takes cell ``i mod (lengths x depths)`` of the grid, lengths outer.
"""

from __future__ import annotations

import math
import os
import random
import re
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from latent_relay.tasks.base import Task, TaskItem, check_n
from latent_relay.tasks.gsm8k import last_boxed

#: Characters per token of the length estimate (no tokenizer given).
CHARS_PER_TOKEN = 4.0
#: Default grid: context lengths in tokens and needle depths (0 = start of the document, 1 = its end).
LENGTHS = (1024, 2048, 4096, 8192)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Under the estimate, an item's question is at most this many tokens short of the requested length (one unit).
LENGTH_TOLERANCE = 32

TokenCounter = Callable[[str], int]

_SUBJECTS = (
    "The old lighthouse keeper", "A quiet river", "The village baker", "An autumn wind", "The tired cartographer",
    "A small brass clock", "The museum guard", "A flock of starlings", "The night train", "An orchard in bloom",
    "The harbour master", "A wooden bridge", "The librarian", "A patient gardener", "The mountain road",
    "A violin teacher", "The ferry captain", "A silver kettle", "The market square", "A stubborn mule",
)  # fmt: skip
_VERBS = (
    "remembered", "carried", "watched", "painted", "counted", "followed", "mended", "forgot", "described",
    "measured", "guarded", "collected", "admired", "questioned", "repaired", "sketched", "ignored", "welcomed",
    "visited", "studied",
)  # fmt: skip
_OBJECTS = (
    "the letters from the coast", "a map of the northern hills", "the songs of the fishermen", "a basket of pears",
    "the lanterns along the pier", "the stones of the old wall", "a story about the first winter",
    "the colours of the evening sky", "the bells of the chapel", "a box of forgotten photographs",
    "the tracks in the snow", "the names of the ships", "a recipe for barley bread", "the shadows on the square",
    "the clouds above the valley", "a drawer of rusty keys", "the steps to the tower", "the boats in the bay",
    "a row of painted doors", "the paths through the forest",
)  # fmt: skip
_TAILS = (
    "before the first snow", "at the edge of the town", "every morning in spring", "while the tea grew cold",
    "long after the market closed", "on the longest day of the year", "as the tide came in", "without a word",
    "during the harvest festival", "under a grey sky", "in the light of the lamps", "for no reason at all",
    "when the church bells rang", "near the abandoned mill", "with great care", "one quiet afternoon",
    "after the storm had passed", "beside the frozen pond", "until the candles burned low", "at the turn of the road",
)  # fmt: skip


def filler_sentence(rng: random.Random) -> str:
    """One haystack sentence (at most 30 estimated tokens), drawn from ``rng``."""
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """``ceil(len(text) / chars_per_token)``."""
    return math.ceil(len(text) / chars_per_token)


@dataclass(frozen=True)
class CountTokens:
    """How a task counts tokens: the estimate without ``tokenizer``; ``len(tokenizer.encode(text,
    add_special_tokens=False))`` for a tokenizer with ``encode`` (Hugging Face); else ``tokenizer(text)`` giving a
    count, a list of ids or a mapping with ``input_ids``. Picklable when the tokenizer is."""

    tokenizer: Any = None
    chars_per_token: float = CHARS_PER_TOKEN

    def __post_init__(self) -> None:
        if not self.chars_per_token > 0:
            raise ValueError(f"chars_per_token must be positive, got {self.chars_per_token}")
        if self.tokenizer is not None and not (hasattr(self.tokenizer, "encode") or callable(self.tokenizer)):
            raise TypeError(f"a tokenizer has encode() or is callable, got {type(self.tokenizer).__name__}")

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return estimate_tokens(text, self.chars_per_token)
        if hasattr(self.tokenizer, "encode"):
            try:
                return len(self.tokenizer.encode(text, add_special_tokens=False))
            except TypeError:
                return len(self.tokenizer.encode(text))
        out = self.tokenizer(text)
        if isinstance(out, int):
            return out
        return len(out["input_ids"] if hasattr(out, "keys") else out)


def fit_units(build: Callable[[int], str], target: int, count: TokenCounter, limit: int) -> tuple[int, str, int]:
    """The largest ``n <= limit`` with ``count(build(n)) <= target`` (``build`` grows with ``n``):
    ``(n, text, tokens)``. Exponential then binary search: about ``2 log2(n)`` counts of whole documents."""
    text = build(0)
    tokens = count(text)
    if tokens > target:
        raise ValueError(f"length {target} is too short: the question alone takes {tokens} tokens")
    if count(build(limit)) <= target:
        return limit, build(limit), count(build(limit))
    lo, hi = 0, 1
    while hi < limit and count(build(hi)) <= target:
        lo, hi = hi, min(hi * 2, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(build(mid)) <= target:
            lo = mid
        else:
            hi = mid
    text = build(lo)
    return lo, text, count(text)


def boxed_or_text(text: str) -> str:
    """The content of the last closed ``\\boxed{...}``, or the whole text when there is none."""
    box = last_boxed(text or "", ("\\boxed{",), closed=True)
    return text or "" if box is None else box


class LongContextTask(Task):
    """A seeded synthetic task over a grid of context lengths (tokens) and depths; ``data_dir`` is not used.

    ``load(None)`` gives one item per grid cell; ``load(n)`` the first ``n`` items, cycling through the grid.
    ``tokenizer`` (optional) counts tokens exactly; else the ``chars_per_token`` estimate (module docstring)."""

    def __init__(
        self,
        lengths: Sequence[int] = LENGTHS,
        depths: Sequence[float] = DEPTHS,
        seed: int = 0,
        tokenizer: Any = None,
        chars_per_token: float = CHARS_PER_TOKEN,
    ) -> None:
        if not lengths or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in lengths):
            raise ValueError(f"lengths must be positive token counts, got {list(lengths)}")
        if not depths or any(not 0.0 <= float(d) <= 1.0 for d in depths):
            raise ValueError(f"depths must lie in [0, 1] (0 = start, 1 = end), got {list(depths)}")
        self.lengths, self.depths, self.seed = tuple(lengths), tuple(float(d) for d in depths), int(seed)
        self.count: TokenCounter = CountTokens(tokenizer, chars_per_token)

    @property
    def grid(self) -> list[tuple[int, float]]:
        return [(length, depth) for length in self.lengths for depth in self.depths]

    def load(self, n: int | None = None, data_dir: str | os.PathLike | None = None) -> list[TaskItem]:
        check_n(n)
        return [self.item(i) for i in range(len(self.grid) if n is None else n)]

    def item(self, index: int) -> TaskItem:
        """Item ``index``: the same for a given seed wherever it is made."""
        length, depth = self.grid[index % len(self.grid)]
        rng = random.Random(f"{self.name}:{self.seed}:{index}")
        context, query, gold, raw = self.generate(rng, length, depth)
        question = f"{context}\n\n{query}"
        raw = {"context": context, "query": query, "length": length, "depth": depth, "seed": self.seed, **raw}
        raw["tokens"] = self.count(question)
        return TaskItem(id=str(index), question=question, gold=gold, raw=raw)

    @abstractmethod
    def generate(self, rng: random.Random, length: int, depth: float) -> tuple[str, str, str, dict[str, Any]]:
        """``(document, query, gold answer, extra raw fields)`` whose ``document + "\\n\\n" + query`` fits ``length``
        tokens (:func:`fit_units` with ``self.count``)."""

    @abstractmethod
    def extract(self, answer_text: str) -> str | None:
        """The answer an output gives, normalised like the gold; None if it gives none of the right shape."""

    def score(self, item: TaskItem, answer_text: str) -> bool:
        return self.extract(answer_text or "") == item.gold


def last_match(pattern: re.Pattern[str], text: str) -> str | None:
    found = pattern.findall(text)
    return found[-1] if found else None
