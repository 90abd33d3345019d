"""The answer-length table (benchmarks/answer_lengths.py): nearest-rank percentiles, and answers at the budget
counted as cut off, per relay mode, with the accuracy of each group."""

from __future__ import annotations

from types import SimpleNamespace

from latent_relay.benchmarks.answer_lengths import length_lines, percentile
from latent_relay.relay.item_result import ItemResult


def words(text, add_special_tokens=False):  # a tokenizer stand-in: one token per word
    return SimpleNamespace(input_ids=text.split())


def record(relay: str, n_words: int, correct: bool, budget: int = 10, error: str | None = None) -> ItemResult:
    return ItemResult(
        item_id=str(n_words),
        task="gsm8k",
        graph="sequential",
        relay=relay,
        answer=" ".join(["w"] * n_words),
        correct=correct,
        error=error,
        settings={"decoding": {"max_new_tokens": budget}},
    )


def test_percentile_is_nearest_rank():
    values = list(range(1, 11))
    assert percentile(values, 90) == 9 and percentile(values, 100) == 10 and percentile(values, 1) == 1
    assert percentile([5], 50) == 5


def test_lengths_per_mode_with_cut_off_answers_counted_apart():
    records = [
        record("text", 4, True),
        record("text", 9, False),  # budget - 1: cut off
        record("text", 10, True),  # at the budget: cut off
        record("latent", 2, True),
        record("latent", 3, False, error="boom"),  # errors are not answers
    ]
    lines = length_lines(records, words)
    text = next(line for line in lines if line.startswith("text"))
    assert text.split() == ["text", "3", "8", "9", "10", "10", "10", "67%", "1/2", "1/1"]
    latent = next(line for line in lines if line.startswith("latent"))
    assert latent.split()[:2] == ["latent", "1"] and latent.split()[-3:] == ["0%", "0/0", "1/1"]
