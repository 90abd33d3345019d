"""The synthetic long-context tasks (needle in a haystack, key-value retrieval): seeded and deterministic, documents
that fit the requested token count, needles at their depths, answers scored right / wrong / malformed, answer
stops that agree with the scorers, and registration for ``relay run --task``."""

from __future__ import annotations

import json
import pickle
import re

import pytest

from latent_relay.tasks.kv_retrieval import KVRetrieval
from latent_relay.tasks.long_context import (
    CHARS_PER_TOKEN,
    DEPTHS,
    LENGTH_TOLERANCE,
    LENGTHS,
    CountTokens,
    estimate_tokens,
)
from latent_relay.tasks.needle import Needle
from latent_relay.tasks.registry import get_task, task_names
from latent_relay.tasks.stops import ID, NUMBER, answer_stop_for
from tests.tiny_agents import ByteTokenizer

TASKS = [Needle, KVRetrieval]


class WordTokenizer:
    """A tokenizer stand-in with Hugging Face's ``encode``: words and single punctuation marks."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)


@pytest.fixture(scope="module")
def grids():
    """Every task's default grid (4 lengths x 5 depths), generated once."""
    return {cls.name: cls().load() for cls in TASKS}


# --------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("cls", TASKS)
def test_items_are_deterministic_for_a_seed(cls, grids):
    small = cls(lengths=(1024, 2048), depths=(0.0, 0.5))
    again = cls(lengths=(1024, 2048), depths=(0.0, 0.5)).load(6)
    items = small.load(6)
    assert [(it.id, it.question, it.gold, it.raw) for it in items] == [
        (it.id, it.question, it.gold, it.raw) for it in again
    ]
    assert small.item(3) == items[3]  # an item alone is the item in a list
    other = cls(lengths=(1024, 2048), depths=(0.0, 0.5), seed=1).load(6)
    assert all(a.question != b.question and a.gold != b.gold for a, b in zip(items, other))
    assert items[4].question != items[0].question  # the grid repeats, the content does not
    assert (items[4].raw["length"], items[4].raw["depth"]) == (items[0].raw["length"], items[0].raw["depth"])
    assert len({it.gold for it in grids[cls.name]}) == len(grids[cls.name]) == len(LENGTHS) * len(DEPTHS)
    assert [it.id for it in small.load(3)] == ["0", "1", "2"]
    assert pickle.loads(pickle.dumps(small)).item(2) == items[2]  # a runtime may ship the task


# --------------------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("cls", TASKS)
def test_lengths_land_within_the_stated_tolerance_of_the_estimate(cls, grids):
    for item in grids[cls.name]:
        target = item.raw["length"]
        tokens = estimate_tokens(item.question, CHARS_PER_TOKEN)
        assert item.raw["tokens"] == tokens
        assert target - LENGTH_TOLERANCE < tokens <= target, (item.id, target, tokens)


@pytest.mark.parametrize("cls", TASKS)
@pytest.mark.parametrize(
    ("tokenizer", "tolerance"), [(WordTokenizer(), LENGTH_TOLERANCE), (ByteTokenizer(), 90)]
)  # a byte tokenizer spends ~80 tokens on one key-value line: a unit is its tolerance
def test_lengths_land_within_tolerance_under_a_tokenizer(cls, tokenizer, tolerance):
    task = cls(lengths=(1024, 3000), depths=(0.0, 0.6), tokenizer=tokenizer)
    count = CountTokens(tokenizer)
    for item in task.load():
        target = item.raw["length"]
        assert item.raw["tokens"] == count(item.question)
        assert target - tolerance < item.raw["tokens"] <= target, (item.id, target, item.raw["tokens"])


def test_token_counts_from_a_tokenizer_a_callable_or_the_estimate():
    assert CountTokens()("x" * 9) == 3  # ceil(9 / 4)
    assert CountTokens(chars_per_token=3.0)("x" * 9) == 3
    assert CountTokens(WordTokenizer())("a, b c.") == 5
    assert CountTokens(ByteTokenizer())("héllo") == 6  # a mapping with input_ids
    assert CountTokens(lambda text: 7)("anything") == 7
    with pytest.raises(ValueError, match="chars_per_token"):
        CountTokens(chars_per_token=0)
    with pytest.raises(TypeError, match="tokenizer"):
        CountTokens(tokenizer=3)


# --------------------------------------------------------------------------------------------- content


def test_the_needle_sits_at_its_depth_and_holds_the_answer(grids):
    for item in grids["needle"]:
        context = item.raw["context"]
        needle = f"One of the special magic numbers for {item.raw['key']} is: {item.gold}."
        assert context.count(needle) == 1 and item.question.count(item.gold) == 1
        assert re.fullmatch(r"\d{7}", item.gold)
        assert item.raw["needle_at"] == pytest.approx(item.raw["depth"], abs=0.03)
        assert item.question.endswith(
            f"What is the special magic number for {item.raw['key']} mentioned in the provided text?"
        )


def test_distractor_needles_name_other_keys():
    task = Needle(lengths=(2048,), depths=(0.5,), distractors=3)
    for item in task.load(3):
        keys = item.raw["distractor_keys"]
        assert len(keys) == 3 and item.raw["key"] not in keys
        assert item.raw["context"].count("One of the special magic numbers for") == 4
        assert item.raw["context"].count(item.gold) == 1


def test_the_key_sits_at_its_depth_and_maps_to_the_answer(grids):
    for item in grids["kv-retrieval"]:
        data = json.loads(item.raw["context"].split("JSON data:\n", 1)[1])
        keys = list(data)
        assert len(keys) == item.raw["pairs"] and data[item.raw["key"]] == item.gold
        assert keys.index(item.raw["key"]) == round(item.raw["depth"] * (len(keys) - 1)) == item.raw["index"]
        assert item.question.count(item.gold) == 1
        assert f'Key: "{item.raw["key"]}"' in item.raw["query"]


# --------------------------------------------------------------------------------------------- scoring


NEEDLE_ANSWERS = [
    ("The special magic number is \\boxed{4821097}.", True),
    ("\\boxed{4,821,097}", True),
    ("\\boxed{\\text{4821097}}", True),
    ("It says the number for amber-falcon is 4821097.", True),  # no box: the last number of the text
    ("\\boxed{4821096}", False),
    ("I saw 4821097 but the answer is \\boxed{1234567}", False),  # the box wins
    ("\\boxed{48210970}", False),
    ("", False),
    ("I could not find it.", False),
    ("\\boxed{}", False),
    ("\\boxed{482109", False),  # unclosed: the text's last number, which is cut short
]


@pytest.mark.parametrize(("text", "correct"), NEEDLE_ANSWERS)
def test_needle_answers_are_scored(text, correct):
    task = get_task("needle")
    item = task.item(0)
    item = type(item)(id=item.id, question=item.question, gold="4821097", raw=item.raw)
    assert task.score(item, text) is correct


GOLD_ID = "3deee5e7-f5a5-4942-b01a-ef1244e8c5a8"
OTHER_ID = "aa9bebf9-43a5-4d33-8e35-383158830f14"
KV_ANSWERS = [
    (f"\\boxed{{{GOLD_ID}}}", True),
    (f'The value is \\boxed{{"{GOLD_ID.upper()}"}}', True),
    (f"The value associated with the key is {GOLD_ID}.", True),
    (f"\\boxed{{{OTHER_ID}}}", False),
    (f"{GOLD_ID} is close but \\boxed{{{OTHER_ID}}}", False),
    (f"\\boxed{{{GOLD_ID[:-1]}}}", False),  # a truncated id is no id
    ("", False),
    ("\\boxed{the value}", False),
    ("I do not know.", False),
]


@pytest.mark.parametrize(("text", "correct"), KV_ANSWERS)
def test_kv_answers_are_scored(text, correct):
    task = get_task("kv-retrieval")
    item = task.item(0)
    item = type(item)(id=item.id, question=item.question, gold=GOLD_ID, raw=item.raw)
    assert task.score(item, text) is correct


def test_the_real_golds_score_and_others_do_not(grids):
    for name, items in grids.items():
        task = get_task(name)
        for item, other in zip(items, items[1:] + items[:1]):
            assert task.score(item, f"Found it: \\boxed{{{item.gold}}}")
            assert not task.score(item, f"Found it: \\boxed{{{other.gold}}}")


# --------------------------------------------------------------------------------------------- stops


def _stopped(rule, text: str) -> str:
    """What decoding keeps: the shortest prefix ending on a trigger character at which the rule holds."""
    for end in range(1, len(text) + 1):
        if text[end - 1] in rule.triggers and rule(text[:end]):
            return text[:end]
    return text


def test_each_task_has_an_answer_stop_and_a_stopped_text_scores_the_same():
    assert get_task("needle").answer_stop is NUMBER
    assert get_task("kv-retrieval").answer_stop is ID
    assert answer_stop_for(KVRetrieval.answer_format) is ID
    for name, answers in (("needle", NEEDLE_ANSWERS), ("kv-retrieval", KV_ANSWERS)):
        task = get_task(name)
        item = task.item(0)
        item = type(item)(id="0", question="", gold="4821097" if name == "needle" else GOLD_ID, raw={})
        for text, _ in answers:
            full = text + " Let me double-check: that is my final answer."
            stopped = _stopped(task.answer_stop, full)
            assert full.startswith(stopped) and task.score(item, stopped) == task.score(item, full), (name, text)


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        (f"\\boxed{{{GOLD_ID}}}", True),
        (f"\\boxed{{{GOLD_ID}", False),
        ("\\boxed{not an id}", False),
        (f"the id {GOLD_ID} then", False),  # no box yet: the model may still box an answer
    ],
)
def test_id_rule(text, complete):
    assert ID(text) is complete


# --------------------------------------------------------------------------------------------- registry, errors


def test_registered_for_relay_run(tmp_path):
    assert {"needle", "kv-retrieval"} <= set(task_names())
    assert get_task("KV-Retrieval").name == "kv-retrieval"
    assert len(get_task("needle").load(2, data_dir=tmp_path / "nowhere")) == 2  # generated: no data folder needed
    for name in ("needle", "kv-retrieval"):
        assert "\\boxed{}" in get_task(name).answer_format


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lengths": (0,)}, "lengths must be positive"),
        ({"lengths": ()}, "lengths must be positive"),
        ({"depths": (1.5,)}, "depths must lie in"),
        ({"chars_per_token": -1.0}, "chars_per_token"),
    ],
)
@pytest.mark.parametrize("cls", TASKS)
def test_bad_parameters_are_named(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_too_short_a_length_and_bad_counts_are_named():
    with pytest.raises(ValueError, match="distractors"):
        Needle(distractors=-1)
    for cls in TASKS:
        with pytest.raises(ValueError, match="length 10 is too short"):
            cls(lengths=(10,)).load(1)
        with pytest.raises(ValueError, match="n must be a non-negative"):
            cls().load(-1)
