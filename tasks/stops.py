"""When a final answer is complete: each task's stop rule, so decoding can end an item as soon as its answer is
written in the task's format, and scoring the stopped text gives what scoring it decoded further would.

- GSM8K: a closed ``\\boxed{...}`` (or ``\\fbox{...}``) holding a number, or a ``#### N`` line once the line ends.
- MedQA: a closed ``\\boxed{...}`` holding an option letter (:data:`latent_relay.tasks.medqa.BOXED_LETTER`).
- HumanEval: a closed fenced Python block that defines a function.
- Needle in a haystack: a closed ``\\boxed{...}`` holding a number (GSM8K's rule).
- Key-value retrieval: a closed ``\\boxed{...}`` holding a UUID.

A rule sees the item's whole text so far and is asked only after a token that holds one of its triggers (the last
character of a complete answer: ``}``, the newline that ends a ``#### N`` line, the closing fence's backtick).
Rules are found by the task's answer format (:func:`answer_stop_for`), the one thing the runtimes hand to a node.
The stopped text is the answer's first complete form: a model that would revise it later is not waited for.
"""

from __future__ import annotations

import re

from latent_relay.relay.decode_config import AnswerStop
from latent_relay.tasks.gsm8k import GSM8K, last_boxed
from latent_relay.tasks.humaneval import HumanEval
from latent_relay.tasks.kv_retrieval import KVRetrieval, extract_id
from latent_relay.tasks.medqa import BOXED_LETTER, MedQA
from latent_relay.tasks.needle import Needle

_HASHES_LINE = re.compile(r"####[ \t]*\$?[ \t]*-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)[ \t]*\.?[ \t]*\r?\n")
_CLOSED_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_DEFINES = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+\w+[ \t]*\(", re.MULTILINE)
PYTHON_FENCES = {"", "python", "py", "python3", "py3"}  # the fence languages HumanEval's extract_code reads


def number_complete(text: str) -> bool:
    """GSM8K: a closed box with a digit in it, or a ``#### N`` line ended by a newline."""
    box = last_boxed(text, closed=True)
    if box is not None and any(c.isdigit() for c in box):
        return True
    return _HASHES_LINE.search(text) is not None


def letter_complete(text: str) -> bool:
    """MedQA: the last ``\\boxed{...}`` is closed and names an option letter the scorer reads."""
    box = last_boxed(text, ("\\boxed{",), closed=True)
    return box is not None and BOXED_LETTER.match(f"\\boxed{{{box}}}") is not None


def id_complete(text: str) -> bool:
    """Key-value retrieval: the last ``\\boxed{...}`` is closed and holds a UUID the scorer reads."""
    box = last_boxed(text, ("\\boxed{",), closed=True)
    return box is not None and extract_id(box) is not None


def code_block_complete(text: str) -> bool:
    """HumanEval: a fenced Python block (closed) that defines a function."""
    return any(lang.lower() in PYTHON_FENCES and _DEFINES.search(body) for lang, body in _CLOSED_FENCE.findall(text))


NUMBER = AnswerStop("number", number_complete, triggers="}\n")
LETTER = AnswerStop("letter", letter_complete, triggers="}")
CODE_BLOCK = AnswerStop("code-block", code_block_complete, triggers="`")
ID = AnswerStop("id", id_complete, triggers="}")

#: answer format (the final agent's instruction) -> its stop rule
BY_FORMAT: dict[str, AnswerStop] = {
    GSM8K.answer_format: NUMBER,
    MedQA.answer_format: LETTER,
    HumanEval.answer_format: CODE_BLOCK,
    Needle.answer_format: NUMBER,
    KVRetrieval.answer_format: ID,
}


def answer_stop_for(answer_format: str | None) -> AnswerStop | None:
    """The stop rule of a task's answer format; None for a format without one (decoding then runs to the end)."""
    return BY_FORMAT.get(answer_format or "")
