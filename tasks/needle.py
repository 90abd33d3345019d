"""Needle in a haystack (Kamradt's test as RULER's ``niah_single``, arXiv 2404.06654): a magic number hidden at a
chosen depth in seeded filler prose; the answer is the 7-digit number, in ``\\boxed{}``.

``distractors`` adds other keys' magic numbers at random depths (RULER's multi-key variant); the question names
one key. Depth ``d`` puts the needle after ``round(d * n)`` of the ``n`` filler sentences (0 = first, 1 = last);
``raw["needle_at"]`` is where it landed as a fraction of the document's characters.
"""

from __future__ import annotations

import random
import re
from typing import Any

from latent_relay.tasks.long_context import (
    LongContextTask,
    boxed_or_text,
    filler_sentence,
    fit_units,
    last_match,
)

_ADJECTIVES = (
    "amber", "brisk", "cobalt", "dusty", "elder", "frosty", "gentle", "hollow", "ivory", "jolly", "keen", "lunar",
    "mellow", "nimble", "olive", "proud", "quiet", "rustic", "silent", "tidal", "umber", "velvet", "wild", "young",
)  # fmt: skip
_NOUNS = (
    "falcon", "harbor", "meadow", "lantern", "orchid", "compass", "glacier", "willow", "anchor", "beacon", "canyon",
    "dolphin", "ember", "fjord", "garnet", "heron", "island", "juniper", "kestrel", "lagoon", "marble", "nectar",
)  # fmt: skip
_NUMBER = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d])|(?<![\d.,])\d+(?![\d])")


def magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def needle_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def needle_sentence(key: str, number: str) -> str:
    return f"One of the special magic numbers for {key} is: {number}."


class Needle(LongContextTask):
    name = "needle"
    answer_format = "Answer with the special magic number alone, in \\boxed{}."

    def __init__(self, *, distractors: int = 0, **grid: Any) -> None:
        """``distractors``: other needles (other keys, other numbers) hidden in the haystack; ``grid``: the
        :class:`~latent_relay.tasks.long_context.LongContextTask` options (lengths, depths, seed, tokenizer, ...)."""
        super().__init__(**grid)
        if distractors < 0:
            raise ValueError(f"distractors must be a non-negative number of other needles, got {distractors}")
        self.distractors = distractors

    def generate(self, rng: random.Random, length: int, depth: float) -> tuple[str, str, str, dict[str, Any]]:
        keys: list[str] = []
        while len(keys) < 1 + self.distractors:  # distinct keys: the question names exactly one needle
            key = needle_key(rng)
            if key not in keys:
                keys.append(key)
        numbers = [magic_number(rng) for _ in keys]
        needles = [needle_sentence(k, v) for k, v in zip(keys, numbers)]
        pool = [filler_sentence(rng) for _ in range(length)]  # a sentence is at least one token: enough
        others = [rng.random() for _ in needles[1:]]  # depths of the distractors
        query = f"What is the special magic number for {keys[0]} mentioned in the provided text?"

        def document(n: int) -> str:
            sentences = list(pool[:n])
            placed = sorted([(depth, needles[0]), *zip(others, needles[1:])], key=lambda p: -p[0])
            for at, sentence in placed:  # deepest first, so earlier insertions do not shift later ones
                sentences.insert(round(at * n), sentence)
            return " ".join(sentences)

        n, _, _ = fit_units(lambda n: f"{document(n)}\n\n{query}", length, self.count, len(pool))
        context = document(n)
        raw = {"key": keys[0], "sentences": n, "needle_at": context.index(needles[0]) / max(len(context), 1)}
        if self.distractors:
            raw["distractor_keys"] = keys[1:]
        return context, query, numbers[0], raw

    def extract(self, answer_text: str) -> str | None:
        return extract_number(answer_text)


def extract_number(text: str) -> str | None:
    """The last whole number of the boxed answer (or of the whole text without a box), digits only (thousands
    commas dropped); None if none."""
    found = last_match(_NUMBER, boxed_or_text(text))
    return None if found is None else found.replace(",", "")
