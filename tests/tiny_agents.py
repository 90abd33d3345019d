"""Stand-ins that let the runtimes run on tiny random models: a byte tokenizer, task items and a GSM8K-like task."""

from __future__ import annotations

from dataclasses import dataclass

VOCAB = 256


class ByteTokenizer:
    """A tokenizer stand-in for tiny models: UTF-8 bytes modulo the vocabulary."""

    chat_template = None
    pad_token_id = None
    eos_token_id = None

    def __call__(self, text: str) -> dict:
        return {"input_ids": [b % VOCAB for b in text.encode("utf-8")]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    gold: str


class FakeTask:
    """GSM8K-like: a word problem, an integer answer, correct when the answer text contains it."""

    name = "gsm8k-like"
    answer_format = "End with: The answer is <number>."

    def score(self, item: Item, text: str) -> bool:
        return item.gold in text


ITEMS = [
    Item(f"q{i}", f"Tom has {i + 2} apples and buys {3 * i + 1} more. How many now?", str(4 * i + 3)) for i in range(8)
]
