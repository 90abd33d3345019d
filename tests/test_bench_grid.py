"""The benchmark grid: settings parsing, cells, and shared agent steps giving the same records as separate runs."""

from __future__ import annotations

import pytest

from latent_relay.agents.decoding import DecodeConfig
from latent_relay.agents.latent import LatentInput
from latent_relay.agents.models import tiny_model
from latent_relay.agents.runner import ModelRunner
from latent_relay.relay.results import ResultWriter, read_results
from latent_relay.relay.runtime.bench_grid import GridError, Setting, grid_cells, parse_settings, run_grid
from latent_relay.relay.runtime.local import LocalRuntime
from latent_relay.relay.runtime.node import NodeExecutor
from tests.tiny_agents import ITEMS, ByteTokenizer, FakeTask

METHODS = ["single", "text", "latent", "latent+h-obf:budget=4+int8", "latent+l:budget=4+int4"]


def _runtime() -> LocalRuntime:
    loaded = tiny_model("qwen2", 5)
    runner = ModelRunner.from_loaded(loaded, tokenizer=ByteTokenizer(), latent=LatentInput("soft"))
    return LocalRuntime(NodeExecutor(runner, DecodeConfig(max_new_tokens=6)), model_name=loaded.name)


def _fields(r):
    return (r.item_id, r.relay, r.answer, r.output_tokens, r.latent_steps, r.relay_bytes, dict(r.edge_bytes))


# ------------------------------------------------------------------ settings
def test_settings_form_the_product_of_their_values():
    grid, varied = parse_settings(["latent_steps=0,5", "latent_input=soft,hidden", "seed=1"])
    assert varied == ["latent_steps", "latent_input"]
    assert [(s.latent_steps, s.latent_input, s.seed) for s in grid] == [
        (0, "soft", 1),
        (0, "hidden", 1),
        (5, "soft", 1),
        (5, "hidden", 1),
    ]
    assert parse_settings([]) == ([Setting()], [])
    assert Setting(decoding="sample", seed=3, temperature=0.5).decode().model_dump()["greedy"] is False


@pytest.mark.parametrize(
    "spec, words",
    [
        ("steps=1", "name one of"),
        ("latent_steps", "name=v1,v2"),
        ("latent_steps=x", "'x' is not a int"),
        ("latent_input=soft,magic", "not one of soft, hidden, realign"),
        ("latent_steps=5000", "outside 0..4096"),
        ("soft_temperature=0", "must be positive"),
        ("decoding=beam", "not one of greedy, sample"),
    ],
)
def test_bad_settings_are_one_line_errors(spec, words):
    with pytest.raises(GridError, match=words):
        parse_settings([spec])


def test_a_setting_given_twice_is_refused():
    with pytest.raises(GridError, match="twice"):
        parse_settings(["seed=1", "seed=2"])


def test_cells_run_single_once_per_decoding_and_validate_recipes():
    grid, _ = parse_settings(["latent_steps=2,3"])
    cells = grid_cells(FakeTask(), ["sequential", "hierarchical"], ["single", "latent"], grid)
    assert [(c.method, c.graph.name, c.setting.latent_steps) for c in cells] == [
        ("single", "single", 2),  # latent settings mean nothing to one agent: it runs once
        ("latent", "sequential", 2),
        ("latent", "hierarchical", 2),
        ("latent", "sequential", 3),
        ("latent", "hierarchical", 3),
    ]
    seeds, _ = parse_settings(["decoding=sample", "seed=1,2"])
    assert [c.method for c in grid_cells(FakeTask(), ["sequential"], ["single", "latent"], seeds)] == [
        "single",
        "latent",
        "single",
        "latent",
    ]  # a decoding setting does change what the single agent answers
    with pytest.raises(ValueError, match="recipe"):
        grid_cells(FakeTask(), ["sequential"], ["latent+nonsense:budget=2"], grid)


# ------------------------------------------------------------------ shared work
def test_a_grid_gives_each_method_the_records_it_gets_alone_and_shares_upstream_steps():
    """Every recipe starts from the same planner memory: the grid computes it once per batch (observing, as the
    recipes need), full latent relay its own (no observation), and every record equals the method's own run."""
    runtime = _runtime()
    items = ITEMS[:4]
    cells = grid_cells(FakeTask(), ["sequential"], METHODS, [Setting(latent_steps=2, max_new_tokens=6)])
    grid, memo = run_grid(runtime, cells, items, batch_size=2)
    alone = []
    for cell in cells:
        runtime.executor.default_decode = DecodeConfig(max_new_tokens=6)
        alone += runtime.run(cell.graph, FakeTask(), items, cell.method, batch_size=2)
    key = lambda r: (r.relay, r.item_id)  # noqa: E731
    assert [_fields(r) for r in sorted(grid, key=key)] == [_fields(r) for r in sorted(alone, key=key)]
    # per batch of 2: single 1 step, text 4, latent 4, the two recipes 4 each of which the planner once: 1 hit
    assert (memo.hits, memo.misses) == (2 * 1, 2 * (1 + 4 + 4 + 4 + 3))
    assert memo.saved_seconds > 0


def test_decoding_seeds_share_the_thinking_agents():
    """Under two sampling seeds only the final agent's decoding differs: the upstream agents run once."""
    runtime = _runtime()
    grid, _ = parse_settings(["decoding=sample", "seed=1,2", "latent_steps=2", "max_new_tokens=6"])
    cells = grid_cells(FakeTask(), ["sequential"], ["latent"], grid)
    records, memo = run_grid(runtime, cells, ITEMS[:2], batch_size=2)
    assert (memo.hits, memo.misses) == (3, 5)
    assert {r.settings["decoding"]["seed"] for r in records} == {1, 2}
    assert runtime.executor.default_decode == DecodeConfig(max_new_tokens=6)  # restored after the grid


def test_a_grid_resumes_per_cell(tmp_path):
    runtime = _runtime()
    out = tmp_path / "bench.jsonl"
    setting = [Setting(latent_steps=2, max_new_tokens=6)]
    with ResultWriter(out) as writer:
        first, _ = run_grid(
            runtime, grid_cells(FakeTask(), ["sequential"], ["latent"], setting), ITEMS[:2], writer=writer
        )
    with ResultWriter(out) as writer:
        cells = grid_cells(FakeTask(), ["sequential"], ["latent", "text"], setting)
        again, _ = run_grid(runtime, cells, ITEMS[:3], writer=writer, resume=True)
    assert sorted((r.relay, r.item_id) for r in again) == [
        ("latent", "q2"),
        ("text", "q0"),
        ("text", "q1"),
        ("text", "q2"),
    ]
    assert len(read_results(out)) == 2 + 4


def test_the_answerer_of_the_reader_graph_never_prefills_the_document():
    from dataclasses import dataclass, field

    from latent_relay.relay.graph import build_graph

    @dataclass(frozen=True)
    class LongItem:
        id: str
        question: str
        gold: str
        raw: dict = field(default_factory=dict, compare=False)

    runtime = _runtime()
    seen = {}
    run = runtime.executor.run

    def spy(graph, name, questions, *args, **kwargs):
        seen[name] = list(questions)
        return run(graph, name, questions, *args, **kwargs)

    runtime.executor.run = spy
    items = [LongItem("d0", "lorem ipsum " * 20 + "\n\nWhat is 2+2?", "4", {"query": "What is 2+2?"})]
    records = runtime.run(build_graph("reader", "latent+h:budget=4", 2), FakeTask(), items, "latent+h:budget=4")
    assert records[0].error is None and records[0].relay_bytes > 0
    assert seen == {"reader": [items[0].question], "answerer": ["What is 2+2?"]}


def test_final_views_share_the_upstream_agents_and_say_so_in_their_settings():
    """``final_view`` changes only what the judger attends to: the three upstream agents run once for all views,
    and the judger on the thoughts-only view prefills on fewer memory tokens than on the whole memory."""
    runtime = _runtime()
    prefixes = []
    step = runtime.executor.runner.step

    def spy(memories, prompts, agent, **kwargs):
        if agent == "judger":
            prefixes.append([int(m.valid_tokens().sum()) for m in memories])
        return step(memories, prompts, agent, **kwargs)

    runtime.executor.runner.step = spy
    grid, varied = parse_settings(["final_view=all,thoughts,last", "latent_steps=2", "max_new_tokens=4"])
    cells = grid_cells(FakeTask(), ["sequential"], ["latent"], grid)
    records, memo = run_grid(runtime, cells, ITEMS[:2], batch_size=2)
    assert varied == ["final_view"] and (memo.hits, memo.misses) == (6, 6)
    assert [r.settings.get("final_view") for r in records] == [None, None, "thoughts", "thoughts", "last", "last"]
    whole, thoughts, last = prefixes
    assert all(t < w for t, w in zip(thoughts, whole)) and all(x < w for x, w in zip(last, whole))
    assert all(t == 4 + 3 * 2 for t in thoughts)  # the 4 sink tokens and 2 thoughts of each of the 3 agents
    assert len({r.relay_bytes for r in records if r.item_id == "q0"}) == 1  # what was sent is the same
