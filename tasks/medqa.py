"""MedQA (USMLE-style multiple choice, LatentMAS's file): the answer is an option letter A-E."""

from __future__ import annotations

import os
import re

from latent_relay.tasks.base import Task, TaskItem, check_n
from latent_relay.tasks.data import data_file, read_json

LETTERS = "ABCDE"
#: A boxed letter, `\boxed{C}`, `\boxed{(C)}` or `\boxed{\text{C. ...}}` (decoding's stop rule reads it too).
BOXED_LETTER = re.compile(r"\\boxed\{\s*(?:\\text(?:bf)?\{\s*)?\(?([A-E])\)?(?![A-Za-z])")
_STATED = re.compile(  # keywords in any case, the letter itself upper case
    r"(?i:answer|correct option|correct choice|best option|best choice)\s*(?i:is|would be|should be)?"
    r"\s*[:\-]?\s*(?i:option\s*)?[(*\[]*([A-E])(?![A-Za-z])"
)
_PARENS = re.compile(r"\(([A-E])\)")
_ALONE = re.compile(r"^\s*[*\[(]*([A-E])[)\].:*]*\s*$", re.MULTILINE)
_OPTION_LINE = re.compile(r"^\s*([A-E])[.)]\s+(.+?)\s*$", re.MULTILINE)


def extract_letter(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter an answer picks, most explicit form first; None when it names none.

    Order: the last `\\boxed{X}`, the last "answer is X" / "Answer: X", the last "(X)", the last line that is
    only a letter, and finally, when `options` (letter -> text) are given and exactly one option's text
    appears in the answer, that option.
    """
    text = text or ""
    for pattern in (BOXED_LETTER, _STATED, _PARENS, _ALONE):
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    if options:
        lowered = text.lower()
        named = [letter for letter, option in options.items() if option and option.lower() in lowered]
        if len(named) == 1:
            return named[0]
    return None


def split_question(question: str) -> str:
    """The case stem, without the option list(s) that follow it (LatentMAS's file repeats them)."""
    match = re.search(r"\n\s*A[.)]\s", question)
    return question[: match.start()].rstrip() if match else question.strip()


def parse_options(row: dict) -> dict[str, str]:
    """letter -> option text, from the `options` list ("A. text") or, failing that, the question text."""
    options: dict[str, str] = {}
    for entry in row.get("options") or []:
        match = re.match(r"\s*([A-E])[.)]\s*(.*)", str(entry), re.DOTALL)
        if match:
            options[match.group(1)] = match.group(2).strip()
    if not options:
        for letter, option in _OPTION_LINE.findall(row.get("question", "")):
            options.setdefault(letter, option)
    return options


def gold_letter(row: dict, options: dict[str, str]) -> str:
    answer = str(row.get("answer", "")).strip()
    if len(answer) == 1 and answer.upper() in LETTERS:
        return answer.upper()
    matching = [letter for letter, option in options.items() if option.strip().lower() == answer.lower()]
    if len(matching) != 1:
        raise ValueError(f"MedQA item {row.get('idx')!r}: answer {answer!r} matches {len(matching)} options")
    return matching[0]


class MedQA(Task):
    name = "medqa"
    answer_format = "Reason briefly, then give the letter of the correct option in \\boxed{}."
    relative_path = "medqa/medqa.json"

    def load(self, n: int | None = None, data_dir: str | os.PathLike | None = None) -> list[TaskItem]:
        check_n(n)
        rows = read_json(data_file(self.relative_path, data_dir))
        if not isinstance(rows, list):
            raise ValueError(f"{self.relative_path}: expected a JSON list of questions")
        items = []
        for i, row in enumerate(rows[:n] if n is not None else rows):
            options = parse_options(row)
            listed = "\n".join(f"{letter}. {text}" for letter, text in sorted(options.items()))
            items.append(
                TaskItem(
                    id=str(row.get("idx", i)),
                    question=f"{split_question(row['question'])}\n{listed}",
                    gold=gold_letter(row, options),
                    raw={**row, "parsed_options": options},
                )
            )
        return items

    def score(self, item: TaskItem, answer_text: str) -> bool:
        return extract_letter(answer_text, item.raw.get("parsed_options")) == item.gold
