"""Task loaders and scorers: GSM8K, HumanEval (its sandbox: test_sandbox.py), MedQA, data-folder resolution."""

from __future__ import annotations

import pytest

from latent_relay.tasks.data import default_data_dir
from latent_relay.tasks.gsm8k import extract_answer, gold_answer
from latent_relay.tasks.humaneval import build_program, extract_code
from latent_relay.tasks.medqa import extract_letter
from latent_relay.tasks.registry import DataNotFoundError, TaskItem, UnknownTaskError, get_task, task_names
from tests.test_sandbox import ITEM, PROMPT  # one toy HumanEval item for both files

needs_data = pytest.mark.skipif(not default_data_dir().is_dir(), reason="no ../shared/data")


# --- GSM8K -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the total is \\boxed{18}.", 18),
        ("first 3, then \\boxed{1,234} and later 7", 1234),  # boxed wins over the last number
        ("\\boxed{\\$2,500.50}", 2500.5),
        ("\\boxed{\\frac{3}{4}}", 0.75),
        ("\\boxed{\\text{-12}}", -12),
        ("He pays 3 * $4 = $12. Total: $1,000", 1000),
        ("The difference is -5.", -5),
        ("5 - 3 = 2", 2),
        ("It costs 0.25 dollars", 0.25),
        ("that is .5 of it", 0.5),
        ("1{,}000 apples", 1000),
    ],
)
def test_gsm8k_extraction(text, expected):
    assert extract_answer(text) == pytest.approx(expected)


def test_gsm8k_no_number():
    assert extract_answer("I cannot tell.") is None
    assert extract_answer("") is None


def test_gsm8k_gold_and_score():
    item = TaskItem(id="0", question="q", gold=gold_answer("work <<1+1=2>>\n#### 1,200"))
    task = get_task("gsm8k")
    assert item.gold == 1200
    assert task.score(item, "The answer is \\boxed{1200}")
    assert task.score(item, "so 1,200.0 in all")
    assert task.score(item, "$1,200")
    assert not task.score(item, "\\boxed{1201}")
    assert not task.score(item, "1200 and then 5")  # last number rule
    assert not task.score(item, "no idea")
    with pytest.raises(ValueError):
        gold_answer("no marker here")


@needs_data
def test_gsm8k_loader_reads_real_file():
    items = get_task("gsm8k").load(5)
    assert len(items) == 5
    assert items[0].gold == 18 and "ducks" in items[0].question
    assert all(isinstance(it.gold, float) for it in items)
    assert len(get_task("gsm8k").load(None)) == 500


# --- MedQA -------------------------------------------------------------------------------------------------

OPTIONS = {
    "A": "Hemolytic uremic syndrome",
    "B": "Oral ulcers",
    "C": "Colorectal cancer",
    "D": "Pancreatic cancer",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{C}", "C"),
        ("\\boxed{\\text{B}}", "B"),
        ("A 34-year-old man... The answer is D.", "D"),
        ("Answer: (B)", "B"),
        ("I think (A) fits, but on reflection (C).", "C"),
        ("Reasoning...\nE", "E"),
        ("the answer is a hard one. Answer: D", "D"),
        ("The most likely outcome is colorectal cancer.", "C"),  # option text, only one named
        ("A patient with no stated answer", None),
        ("", None),
    ],
)
def test_medqa_letter_extraction(text, expected):
    assert extract_letter(text, OPTIONS) == expected


@needs_data
def test_medqa_loader_reads_real_file_and_scores():
    task = get_task("medqa")
    items = task.load(3)
    assert [it.id for it in items] == ["0", "1", "2"]
    first = items[0]
    assert first.gold == "C"  # "Colorectal cancer" is option C
    assert first.question.count("\nA. ") == 1  # the file repeats the options; the item lists them once
    assert first.question.rstrip().endswith("D. Pancreatic cancer")
    assert task.score(first, "... so \\boxed{C}")
    assert not task.score(first, "\\boxed{A}")
    assert all(it.gold in "ABCDE" for it in task.load(None))


# --- HumanEval ---------------------------------------------------------------------------------------------


@pytest.fixture
def fast_humaneval():
    task = get_task("humaneval")
    task.timeout_s = 2.0
    return task


def test_extract_code_prefers_the_block_defining_the_entry_point():
    text = "Here:\n```text\nnot code\n```\n```python\nimport os\n```\n```python\ndef add(a, b):\n    return a+b\n```"
    assert extract_code(text, "add").startswith("def add")
    assert extract_code("```py\nx = 1\n```", "add") == "x = 1\n"
    assert extract_code("    return a + b\n", "add") == "    return a + b\n"  # raw code
    prose = "Here is the code:\nfrom typing import List\ndef add(a, b):\n    return a + b\n"
    assert extract_code(prose, "add").startswith("from typing import List\ndef add")
    unclosed = "```python\ndef add(a, b):\n    return a + b"
    assert extract_code(unclosed, "add").startswith("def add")


def test_build_program_body_full_function_and_unindented_body():
    body = build_program(PROMPT, "    return a + b\n", "add")
    full = build_program(PROMPT, "```python\ndef add(a, b):\n    return a + b\n```", "add")
    flat = build_program(PROMPT, "return a + b", "add")
    for program in (body, full, flat):
        namespace: dict = {}
        exec(compile(program, "p", "exec"), namespace)  # trusted toy code
        assert namespace["add"](2, 3) == 5


def test_humaneval_canonical_solution_passes_and_wrong_one_fails(fast_humaneval):
    assert fast_humaneval.score(ITEM, ITEM.gold)
    assert fast_humaneval.score(ITEM, "```python\ndef add(a, b):\n    return b + a\n```")
    wrong = fast_humaneval.run_tests(ITEM, "    return a - b\n")
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    assert not fast_humaneval.score(ITEM, "I don't know.")


def test_humaneval_infinite_loop_times_out(fast_humaneval):
    result = fast_humaneval.run_tests(ITEM, "    while True:\n        pass\n")
    assert result.status == "timeout"
    assert not result.passed


@needs_data
def test_humaneval_loader_and_real_canonical_solutions(fast_humaneval):
    fast_humaneval.timeout_s = 10.0  # real tests on a busy 2-core machine
    items = fast_humaneval.load(3)
    assert [it.id for it in items] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert "def has_close_elements" in items[0].question
    for item in items:
        assert fast_humaneval.score(item, item.gold), item.id
    assert not fast_humaneval.score(items[0], "    return False\n")


# --- registry and data folder ------------------------------------------------------------------------------


def test_registry():
    assert task_names() == ["gsm8k", "humaneval", "kv-retrieval", "medqa", "needle"]
    assert get_task("GSM8K").name == "gsm8k"
    for name in task_names():
        assert get_task(name).answer_format
    with pytest.raises(
        UnknownTaskError, match="unknown task 'mmlu'; choose one of gsm8k, humaneval, kv-retrieval, medqa"
    ):
        get_task("mmlu")


def test_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as err:
        get_task("gsm8k").load(2, data_dir=missing)
    message = str(err.value)
    assert str(missing) in message and "--data-dir" in message and "RELAY_DATA_DIR" in message
    assert "\n" not in message
    assert isinstance(err.value, FileNotFoundError)
    monkeypatch.setenv("RELAY_DATA_DIR", str(missing))
    with pytest.raises(DataNotFoundError, match="from RELAY_DATA_DIR"):
        get_task("medqa").load(1)


def test_missing_data_file_is_a_clear_error(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(DataNotFoundError, match="gsm8k/test.jsonl not found"):
        get_task("gsm8k").load(1, data_dir=tmp_path)


def test_env_var_and_explicit_dir_are_used(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    monkeypatch.setenv("RELAY_DATA_DIR", str(tmp_path))
    items = get_task("gsm8k").load(None)
    assert [(it.question, it.gold) for it in items] == [("1+1?", 2.0)]
    monkeypatch.setenv("RELAY_DATA_DIR", str(tmp_path / "elsewhere"))
    assert len(get_task("gsm8k").load(None, data_dir=tmp_path)) == 1  # explicit beats the environment
