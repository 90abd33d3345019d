"""HumanEval: extract Python code from a completion and run the problem's `check` tests in the sandbox."""

from __future__ import annotations

import os
import re
import textwrap

from latent_relay.tasks.base import Task, TaskItem, check_n
from latent_relay.tasks.data import data_file, read_jsonl
from latent_relay.tasks.sandbox import DEFAULT_MEMORY_BYTES, RunResult, run_python

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_LANGS = {"", "python", "py", "python3", "py3"}


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The code in a completion: the fenced Python block that defines `entry_point` (else the first Python
    block, else all blocks joined), or the raw text when there are no fences."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion or "")]
    python = [body for lang, body in blocks if lang in _PY_LANGS]
    if not python:
        return _strip_leading_prose(completion or "", entry_point)
    if entry_point:
        defining = [body for body in python if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", body)]
        if defining:
            return defining[0]
    return python[0]


_CODE_START = re.compile(r"^(?:async\s+def|def|class|import|from|@)\b", re.MULTILINE)


def _strip_leading_prose(text: str, entry_point: str | None) -> str:
    """Unfenced text that defines `entry_point` after some prose ("Here is the code:"): the code part."""
    if not entry_point or not re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", text) or _compiles(text):
        return text
    start = _CODE_START.search(text)
    return text[start.start() :] if start else text


def _compiles(source: str) -> bool:
    try:
        compile(source, "<candidate>", "exec")  # compiles only; nothing runs (and catches a stray `return`)
    except (SyntaxError, ValueError):
        return False
    return True


def build_program(prompt: str, completion: str, entry_point: str) -> str:
    """The full candidate module: the prompt (imports, helpers, signature) plus the completion's code.

    A completion that defines `entry_point` itself is appended after the prompt, so its definition wins while
    the prompt's imports and helper functions stay available; otherwise it is the function body and is
    appended to the prompt (re-indented when it came without indentation).
    """
    code = extract_code(completion, entry_point)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return f"{prompt}\n    pass\n\n{code}\n"
    body = code if code.startswith(("    ", "\t")) else code.lstrip("\n")
    program = prompt + body
    if not _compiles(program):
        indented = prompt + textwrap.indent(textwrap.dedent(body), "    ")
        if _compiles(indented):
            program = indented
    return program + "\n"


def check_code(test: str, entry_point: str) -> str:
    """The test code that runs after the candidate module: the item's `check` and its call. It is compiled on its
    own, so nothing in a completion (an unclosed string, a stray indent) can change how it parses."""
    return f"{test}\n\ncheck({entry_point})\n"


class HumanEval(Task):
    name = "humaneval"
    answer_format = (
        "Write the complete Python function (signature included, with any imports it needs) in a single "
        "```python code block."
    )
    relative_path = "humaneval/HumanEval.jsonl"

    def __init__(self, timeout_s: float = 10.0, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes

    def load(self, n: int | None = None, data_dir: str | os.PathLike | None = None) -> list[TaskItem]:
        check_n(n)
        items = []
        for row in read_jsonl(data_file(self.relative_path, data_dir), n):
            question = f"Complete the following Python function.\n\n```python\n{row['prompt']}```"
            gold = row["canonical_solution"]
            items.append(TaskItem(id=row["task_id"], question=question, gold=gold, raw=row))
        return items

    def run_tests(self, item: TaskItem, answer_text: str) -> RunResult:
        """Run the item's `check(entry_point)` on the completion: passed (the tests ran to the end) / failed /
        timeout, and why."""
        raw = item.raw
        program = build_program(raw["prompt"], answer_text or "", raw["entry_point"])
        return run_python(
            program,
            tests=check_code(raw["test"], raw["entry_point"]),
            timeout_s=self.timeout_s,
            memory_bytes=self.memory_bytes,
        )

    def score(self, item: TaskItem, answer_text: str) -> bool:
        return self.run_tests(item, answer_text).passed
