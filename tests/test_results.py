"""Results files and run keys: a record says which run it belongs to, a torn last line is skipped or repaired, a
malformed line names its file and line, one writer at a time, error records retried, each item counted once."""

from __future__ import annotations

import logging

import pytest

from latent_relay.agents.decoding import DecodeConfig
from latent_relay.agents.latent import LatentInput
from latent_relay.agents.models import tiny_model
from latent_relay.agents.runner import ModelRunner
from latent_relay.relay.graph import sequential
from latent_relay.relay.results import (
    ItemResult,
    ResultsFileBusyError,
    ResultsFileError,
    ResultWriter,
    done_items,
    latest_records,
    read_results,
    run_key,
    summarize,
)
from latent_relay.relay.runtime.local import LocalRuntime
from latent_relay.relay.runtime.node import NodeExecutor
from tests.tiny_agents import ITEMS, ByteTokenizer, FakeTask


def _record(item_id: str = "0", **fields) -> ItemResult:
    base = {"task": "gsm8k", "graph": "sequential", "relay": "latent", "model": "m", "model_fingerprint": "f" * 64}
    return ItemResult(item_id=item_id, **{**base, **fields})


def _runtime(seed: int = 0, latent: str = "soft", max_new_tokens: int = 4) -> LocalRuntime:
    loaded = tiny_model("llama", seed)
    runner = ModelRunner.from_loaded(loaded, tokenizer=ByteTokenizer(), latent=LatentInput(latent))
    return LocalRuntime(NodeExecutor(runner, DecodeConfig(max_new_tokens=max_new_tokens)), model_name=loaded.name)


# ------------------------------------------------------------------ run keys
@pytest.mark.parametrize(
    "change",
    [
        {"task": "medqa"},  # GSM8K and MedQA items are both numbered from "0"
        {"model_fingerprint": "e" * 64},  # same model name, other weights / dtype / tokenizer
        {"graph": "hierarchical"},
        {"graph_digest": "0123456789abcdef"},
        {"relay": "text"},
        {"settings": {"latent_steps": 4}},
    ],
)
def test_run_key_tells_runs_apart(change):
    assert run_key(_record(**change)) != run_key(_record())
    assert done_items([_record(**change)], run_key(_record())) == set()


def test_run_key_uses_the_model_name_only_without_a_fingerprint():
    assert run_key(_record(model_fingerprint="", model="a")) != run_key(_record(model_fingerprint="", model="b"))
    assert run_key(_record(model="a")) == run_key(_record(model="b"))  # the fingerprint decides when there is one


def test_records_carry_everything_that_defines_their_run():
    runtime = _runtime()
    graph = sequential("latent", latent_steps=2)
    records = runtime.run(graph, FakeTask(), ITEMS[:2], "latent", batch_size=2)
    r = records[0]
    assert r.error is None, r.error
    assert r.model_fingerprint == runtime.executor.runner.fingerprint != ""
    assert len(r.graph_digest) == 16
    assert r.settings["latent_steps"] == 2
    assert r.settings["latent_input"]["mode"] == "soft"
    assert r.settings["decoding"]["max_new_tokens"] == 4
    template = runtime.record_builder(graph, FakeTask(), "latent").template()
    assert {run_key(x) for x in records} == {run_key(template)}
    # every setting that changes the run changes the key
    other = [
        runtime.record_builder(sequential("latent", latent_steps=3), FakeTask(), "latent"),
        runtime.record_builder(graph, FakeTask(), "latent+h:budget=8"),
        _runtime(seed=1).record_builder(graph, FakeTask(), "latent"),
        _runtime(latent="hidden").record_builder(graph, FakeTask(), "latent"),
        _runtime(max_new_tokens=5).record_builder(graph, FakeTask(), "latent"),
    ]
    keys = {run_key(b.template()) for b in other}
    assert len(keys) == len(other) and run_key(template) not in keys


# ------------------------------------------------------------------ reading
def test_torn_last_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    whole = _record("0").model_dump_json() + "\n"
    path.write_text(whole + _record("1").model_dump_json()[:40])
    with caplog.at_level(logging.WARNING, logger="relay"):
        records = read_results(path)
    assert [r.item_id for r in records] == ["0"]
    assert f"{path} line 2" in caplog.text and "incomplete" in caplog.text


def test_unterminated_whole_last_record_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(_record("0").model_dump_json() + "\n" + _record("1").model_dump_json())
    assert [r.item_id for r in read_results(path)] == ["0", "1"]


@pytest.mark.parametrize("bad", ["{not json", '{"item_id": "3"}', "[1, 2]", '{"item_id": 1'])
def test_malformed_line_elsewhere_is_a_one_line_error_naming_file_and_line(tmp_path, bad):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join([_record("0").model_dump_json(), bad, _record("1").model_dump_json()]) + "\n")
    with pytest.raises(ResultsFileError) as err:
        read_results(path)
    message = str(err.value)
    assert message.startswith(f"{path} line 2: ") and "\n" not in message


# ------------------------------------------------------------------ writing
def test_writer_removes_a_torn_line_before_appending(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    path.write_text(_record("0").model_dump_json() + "\n" + _record("1").model_dump_json()[:40])
    with caplog.at_level(logging.WARNING, logger="relay"), ResultWriter(path) as writer:
        writer.write([_record("2")])
    assert f"{path} line 2" in caplog.text
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and path.read_text().endswith("\n")
    assert [r.item_id for r in read_results(path)] == ["0", "2"]


def test_writer_ends_an_unterminated_whole_record_before_appending(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(_record("0").model_dump_json())
    with ResultWriter(path) as writer:
        writer.write([_record("1")])
    assert [r.item_id for r in read_results(path)] == ["0", "1"]


def test_one_writer_at_a_time(tmp_path):
    path = tmp_path / "r.jsonl"
    first = ResultWriter(path)
    with pytest.raises(ResultsFileBusyError, match="another run"):
        ResultWriter(path)
    first.write([_record("0")])
    first.close()
    with ResultWriter(path) as second:  # the lock goes with the first writer
        second.write([_record("1")])
    assert [r.item_id for r in read_results(path)] == ["0", "1"]


def test_writer_without_a_path_writes_nothing():
    with ResultWriter(None) as writer:
        writer.write([_record("0")])
        assert writer.done(run_key(_record())) == set()


# ------------------------------------------------------------------ resume and summaries
def test_error_records_are_retried_unless_the_user_says_not_to():
    records = [_record("0"), _record("1", error="boom")]
    key = run_key(_record())
    assert done_items(records, key) == {"0"}
    assert done_items(records, key, retry_errors=False) == {"0", "1"}
    retried = [*records, _record("1")]
    assert done_items(retried, key) == {"0", "1"}


def test_summary_counts_each_item_once_by_its_latest_record():
    records = [_record("0", correct=True), _record("1", error="boom"), _record("1", correct=True)]
    assert [r.error for r in latest_records(records)] == [None, None]
    table = summarize(records)
    row = next(line for line in table.splitlines() if line.startswith("latent "))
    assert "2/2 (100%)" in row and row.split()[-1] == "0"  # no error left: the retry replaced it
