"""The tasks' answer stops (tasks/stops.py): where each rule fires, that a stopped text scores as the same text
decoded further (the shared data's solutions, written in each task's answer format and fed token by token through
the decoder's TokenPicker), and that the runtime hands the rule to the final node only."""

from __future__ import annotations

import random

import pytest
import torch

from latent_relay.agents.decoding import DecodeConfig, TokenPicker
from latent_relay.agents.runner import AgentOutput
from latent_relay.relay.graph import sequential, single
from latent_relay.relay.memory import KVState
from latent_relay.relay.runtime.node import NodeExecutor
from latent_relay.tasks.data import default_data_dir
from latent_relay.tasks.humaneval import extract_code
from latent_relay.tasks.registry import get_task, task_names
from latent_relay.tasks.stops import CODE_BLOCK, ID, LETTER, NUMBER, answer_stop_for
from tests.tiny_agents import ByteTokenizer, FakeTask

needs_data = pytest.mark.skipif(not default_data_dir().is_dir(), reason="no ../shared/data")


class PieceTokenizer:
    """Token ``i`` is the text ``pieces[i]``: texts are cut into pieces of 1 to 6 characters, as a model's tokens
    would cut them (a piece may hold the end of an answer and what follows it)."""

    eos_token_id = None

    def __init__(self):
        self.pieces: list[str] = []

    def encode(self, text: str, rng: random.Random) -> list[int]:
        ids, start = [], 0
        while start < len(text):
            end = start + rng.randint(1, 6)
            self.pieces.append(text[start:end])
            ids.append(len(self.pieces) - 1)
            start = end
        return ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(self.pieces[i] for i in ids)


def decoded(rule, text: str, seed: int = 0) -> str:
    """What decoding returns when the model writes ``text`` (token by token) under ``rule``."""
    tokenizer = PieceTokenizer()
    ids = tokenizer.encode(text, random.Random(seed))
    picker = TokenPicker(DecodeConfig(), tokenizer, 1, set(), rule)
    for token in ids:
        if picker.done[0]:
            break
        logits = torch.zeros(1, len(tokenizer.pieces))
        logits[0, token] = 1.0
        picker.pick(logits, [0])
    return picker.texts()[0]


# ---------------------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("so it is \\boxed{18}", True),
        ("so it is \\boxed{18", False),
        ("\\boxed{\\frac{3}{4}", False),  # the inner brace closed, the box not yet
        ("\\boxed{\\frac{3}{4}}", True),
        ("\\fbox{7}", True),
        ("I will put it in \\boxed{}.\n", False),  # the format instruction echoed: no number yet
        ("\\boxed{x}", False),
        ("#### 42", False),  # the number may go on
        ("#### 42\n", True),
        ("#### 1,000.\n", True),
        ("####  $ -3.5 \n", True),
        ("#### 1. Add the eggs\n", False),  # a markdown heading, not an answer line
        ("#### Step 2\n", False),
    ],
)
def test_number_rule(text, complete):
    assert NUMBER(text) is complete


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("the answer is \\boxed{C}", True),
        ("\\boxed{(B)}", True),
        ("\\boxed{\\text{D. Oral ulcers}}", True),
        ("\\boxed{\\text{D. Oral ulcers}", False),
        ("\\boxed{C", False),
        ("\\boxed{}", False),
        ("\\boxed{Cholera}", False),
        ("The answer is C.", False),  # the format asks for the box
    ],
)
def test_letter_rule(text, complete):
    assert LETTER(text) is complete


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("```python\ndef f(x):\n    return x\n```", True),
        ("```python\ndef f(x):\n    return x\n``", False),
        ("```python\ndef f(x):\n    return x\n", False),
        ("```\ndef f(x):\n    return x\n```", True),
        ("```python\nimport math\n```", False),  # no function yet: the next block may define it
        ("```bash\ndef f(x):\n```", False),
        ("Use `f` like this:", False),
    ],
)
def test_code_block_rule(text, complete):
    assert CODE_BLOCK(text) is complete


def test_each_task_format_has_its_rule_and_other_formats_none():
    assert {name: get_task(name).answer_stop for name in task_names()} == {
        "gsm8k": NUMBER,
        "humaneval": CODE_BLOCK,
        "kv-retrieval": ID,
        "medqa": LETTER,
        "needle": NUMBER,
    }
    assert answer_stop_for(FakeTask.answer_format) is None and answer_stop_for("") is None


# --------------------------------------------------------------------------- stopped texts score the same
@needs_data
def test_gsm8k_solutions_stop_at_the_answer_and_score_the_same():
    task = get_task("gsm8k")
    for item in task.load(None):
        solution = item.raw["answer"]
        work, answer = solution.rsplit("####", 1)
        decoy = "#### 1. The numbers\nI put the result in \\boxed{} at the end.\n" if int(item.id) % 2 else ""
        written = {
            "hashes": f"{decoy}{solution}\n\nThat is the whole answer.",
            "boxed": f"{decoy}{work}So the answer is $\\boxed{{{answer.strip()}}}$.\n\nCheck: 2 + 2 = 4.",
        }
        for form, full in written.items():
            stopped = decoded(NUMBER, full, seed=int(item.id))
            end = full.index("\n", len(decoy + solution) - 1) + 1 if form == "hashes" else full.index("}$.") + 1
            assert end <= len(stopped) <= end + 5 and full.startswith(stopped), (item.id, form, stopped[-40:])
            assert task.score(item, stopped) and task.score(item, full), (item.id, form)


@needs_data
def test_medqa_answers_stop_at_the_boxed_letter_and_score_the_same():
    task = get_task("medqa")
    for n, item in enumerate(task.load(None)):
        letter, option = item.gold, item.raw["parsed_options"][item.gold]
        form = ("{}", "({})", "\\text{{{}}}", "{}. " + option.replace("{", "(").replace("}", ")"))[n % 4]
        boxed = "\\boxed{" + form.format(letter) + "}"
        full = (
            f"I give the letter in \\boxed{{}}.\nThe findings fit option {letter}.\n{boxed}\n\nOption A is less likely."
        )
        stopped = decoded(LETTER, full, seed=n)
        end = full.index(boxed) + len(boxed)
        assert end <= len(stopped) <= end + 5 and full.startswith(stopped), (item.id, stopped[-40:])
        assert task.score(item, stopped) and task.score(item, full), item.id


@needs_data
def test_humaneval_solutions_stop_at_the_closed_block_and_extract_the_same_code():
    task = get_task("humaneval")
    for n, item in enumerate(task.load(None)):
        raw = item.raw
        block = f"```python\n{raw['prompt']}{raw['canonical_solution']}```"
        usage = f"Use it so:\n\n```python\nprint({raw['entry_point']}())\n```\n"
        full = f"Here is `{raw['entry_point']}`:\n\n{block}\n\n{usage}"
        stopped = decoded(CODE_BLOCK, full, seed=n)
        end = full.index(block) + len(block)
        assert end <= len(stopped) <= end + 5 and full.startswith(stopped), (item.id, stopped[-40:])
        # the same code is extracted, so the sandbox runs the same program: the score is the same
        assert extract_code(stopped, raw["entry_point"]) == extract_code(full, raw["entry_point"]), item.id


# ------------------------------------------------------------------------------------- the runtime's part
class RecordingRunner:
    """A runner stand-in that records the answer stop each node step was given."""

    tokenizer = ByteTokenizer()

    def __init__(self):
        self.given: dict[str, object] = {}

    def step(self, memories, prompts, agent, thoughts=0, decode=None, observe=True, answer_stop=None):
        self.given[agent] = answer_stop
        n = len(prompts)
        return AgentOutput(KVState.empty(n, 1, 1, 4), None, ["x"] * n if decode else None, [1] * n)


@pytest.mark.parametrize("task_name", ["gsm8k", "medqa", "humaneval"])
def test_the_final_node_gets_the_tasks_rule_and_no_other_node_does(task_name):
    runner = RecordingRunner()
    executor = NodeExecutor(runner)
    answer_format = get_task(task_name).answer_format
    graph = sequential("text", latent_steps=0)
    inbox = {}
    for name in graph.order:
        out = executor.run(graph, name, ["q"], inbox, answer_format)
        inbox.update(out.outgoing)
    assert runner.given == {
        name: (get_task(task_name).answer_stop if name == graph.final else None) for name in graph.order
    }
    executor.run(single(), "solver", ["q"], {}, FakeTask.answer_format)
    assert runner.given["solver"] is None  # a task without a rule decodes to the end


@needs_data
def test_the_cost_benchmark_stops_every_written_answer():
    from latent_relay.benchmarks.answer_stop_cost import measure, written_answers

    for name in ("gsm8k", "medqa", "humaneval"):
        got = measure(get_task(name).answer_stop, written_answers(name, 3), ByteTokenizer(), repeats=1)
        assert got["stopped"] == 3 and 0 < got["checks"] < got["tokens"], name
