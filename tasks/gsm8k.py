"""GSM8K grade-school math: the answer is `\\boxed{...}` if present, else the last number in the text."""

from __future__ import annotations

import math
import os
import re

from latent_relay.tasks.base import Task, TaskItem, check_n
from latent_relay.tasks.data import data_file, read_jsonl

_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_FRAC = re.compile(r"\\d?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")
_SLASH = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)(?![\w.])")


def last_boxed(text: str, macros: tuple[str, ...] = ("\\boxed{", "\\fbox{"), *, closed: bool = False) -> str | None:
    """The contents of the last `\\boxed{...}` (or another of ``macros``), braces balanced; None if there is none.
    An unclosed box gives the rest of the text, or None with ``closed`` (a stop rule waits for the closing brace)."""
    start = max(text.rfind(m) for m in macros)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None if closed else text[begin:]  # unclosed: take the rest


def _clean(text: str) -> str:
    """Drop thousands separators written the LaTeX way, currency and spacing macros."""
    for junk in ("{,}", "\\,", "\\!", "\\$", "\\%"):
        text = text.replace(junk, "," if junk == "{,}" else "")
    return text.replace("$", "")


def _to_float(number: str) -> float:
    return float(number.replace(",", ""))


def parse_number(text: str) -> float | None:
    """The last number in `text` (thousands commas, `$`, signs and decimals allowed); None if none."""
    text = _clean(text)
    matches = _NUMBER.findall(text)
    return _to_float(matches[-1]) if matches else None


def _parse_boxed(content: str) -> float | None:
    content = _clean(content)
    frac = _FRAC.search(content) or _SLASH.search(content)
    if frac:
        denominator = _to_float(frac.group(2))
        if denominator != 0:
            return _to_float(frac.group(1)) / denominator
    return parse_number(content)


def extract_answer(text: str) -> float | None:
    """The model's numeric answer: from the last `\\boxed{}` if any, else the last number in the text."""
    boxed = last_boxed(text)
    if boxed is not None:
        value = _parse_boxed(boxed)
        if value is not None:
            return value
    return parse_number(text)


def gold_answer(solution: str) -> float:
    """The number after `####` in a GSM8K worked solution."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution without a '#### <number>' line: {solution[-80:]!r}")
    value = parse_number(solution.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"GSM8K solution whose '####' line has no number: {solution[-80:]!r}")
    return value


def numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


class GSM8K(Task):
    name = "gsm8k"
    answer_format = "Reason step by step, then put the final answer (a single number) in \\boxed{}."
    relative_path = "gsm8k/test.jsonl"

    def load(self, n: int | None = None, data_dir: str | os.PathLike | None = None) -> list[TaskItem]:
        check_n(n)
        path = data_file(self.relative_path, data_dir)
        items = []
        for i, row in enumerate(read_jsonl(path, n)):
            gold = gold_answer(row["answer"])
            items.append(TaskItem(id=str(i), question=row["question"], gold=gold, raw=row))
        return items

    def score(self, item: TaskItem, answer_text: str) -> bool:
        predicted = extract_answer(answer_text or "")
        return predicted is not None and numbers_equal(predicted, float(item.gold))
