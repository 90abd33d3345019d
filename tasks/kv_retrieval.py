"""Key-value retrieval (Liu et al., "Lost in the Middle", arXiv 2307.03172; RULER's hardest retrieval kind,
arXiv 2404.06654): a JSON object of random UUIDs mapped to random UUIDs, as many pairs as the length holds; the
question names one key, at the requested depth among the pairs (0 = first pair, 1 = last); the answer is its
value, in ``\\boxed{}``. Every key is as alike to the others as text can be, which makes it the task where attention
settles latest (ASL, arXiv 2601.07667, selects around layer 25 of 32 on it).
"""

from __future__ import annotations

import json
import random
import re
import uuid
from typing import Any

from latent_relay.tasks.long_context import LongContextTask, boxed_or_text, fit_units, last_match

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_HEADER = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"


def random_id(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng``."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def json_object(pairs: list[tuple[str, str]]) -> str:
    """One pair a line, as ``json.dumps(..., indent=1)`` would print it."""
    return json.dumps(dict(pairs), indent=1)


class KVRetrieval(LongContextTask):
    name = "kv-retrieval"
    answer_format = "Answer with the value alone (the id, exactly as written), in \\boxed{}."

    def generate(self, rng: random.Random, length: int, depth: float) -> tuple[str, str, str, dict[str, Any]]:
        limit = max(length // 4, 1)  # a pair line takes at least 4 tokens (quotes, colon, comma) under any tokenizer
        pairs = [(random_id(rng), random_id(rng)) for _ in range(limit)]

        def target(n: int) -> int:
            return round(depth * (n - 1)) if n else 0

        def query(n: int) -> str:
            return f'Key: "{pairs[target(n)][0]}"\nThe value associated with the specified key is:'

        n, _, _ = fit_units(lambda n: f"{_HEADER}{json_object(pairs[:n])}\n\n{query(n)}", length, self.count, limit)
        if n == 0:
            raise ValueError(f"length {length} is too short for one key-value pair")
        key, value = pairs[target(n)]
        return f"{_HEADER}{json_object(pairs[:n])}", query(n), value, {"key": key, "pairs": n, "index": target(n)}

    def extract(self, answer_text: str) -> str | None:
        return extract_id(answer_text)


def extract_id(text: str) -> str | None:
    """The last UUID of the boxed answer (or of the whole text without a box), lower-cased; None if none."""
    found = last_match(_UUID, boxed_or_text(text))
    return None if found is None else found.lower()
