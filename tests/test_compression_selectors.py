"""Selectors: exact budgets, what is never evicted, original positions, order, padding; against a plain loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latent_relay.compression.scores import compute_scores
from latent_relay.compression.selectors import (
    SELECTORS,
    current_agent_index,
    gather_selection,
    prompt_mask,
    register_selector,
    select_generation_only,
    select_headwise,
    select_layerwise,
)
from latent_relay.relay.memory import KVState, Segment
from tests.compression_fixtures import Layout, build_memory, layouts
from tests.fuzz.packets import memory_tensors


def reference_kept(memory: KVState, scores: torch.Tensor, budget: int, layerwise: bool):
    """Plain-loop top-B per (layer, item, head) over the current agent's prompt: sets of original slots."""
    cur = memory.agents.index("second")
    out = {}
    for li in range(memory.num_layers):
        for b in range(memory.batch_size):
            slots = [
                j
                for j in range(memory.num_tokens)
                if int(memory.segment[b, j]) == Segment.PROMPT and int(memory.agent[b, j]) == cur
            ]
            for h in range(memory.num_kv_heads):
                if layerwise:
                    s = {j: float(scores[li, b, :, j].sum()) for j in slots}
                else:
                    s = {j: float(scores[li, b, h, j]) for j in slots}
                out[li, b, h] = set(sorted(slots, key=lambda j: -s[j])[:budget])
    return out


def check_evicted(memory: KVState, out: KVState, kept: dict, budget: int | None):
    """Every (layer, item, head) of ``out`` holds exactly the non-prompt valid slots plus ``kept``, in the
    original order, with bit-identical K/V, original positions and padding zeroed."""
    cur = memory.agents.index("second")
    pos_in = memory.position_full()
    pos_out = out.position_full()
    for li in range(memory.num_layers):
        for b in range(memory.batch_size):
            others = [
                j
                for j in range(memory.num_tokens)
                if bool(memory.valid[b, j])
                and not (int(memory.segment[b, j]) == Segment.PROMPT and int(memory.agent[b, j]) == cur)
            ]
            n_prompt = sum(
                1
                for j in range(memory.num_tokens)
                if int(memory.segment[b, j]) == Segment.PROMPT and int(memory.agent[b, j]) == cur
            )
            for h in range(memory.num_kv_heads):
                want = sorted(others + sorted(kept[li, b, h]))
                if budget is not None:
                    assert len(kept[li, b, h]) == min(budget, n_prompt)  # exact budget
                n = len(want)
                assert int(out.valid[b].sum()) == n
                assert bool(out.valid[b, :n].all())  # survivors first, then padding
                idx = torch.tensor(want, dtype=torch.long)
                assert torch.equal(out.keys[li][b, h, :n], memory.keys[li][b, h, idx])
                assert torch.equal(out.values[li][b, h, :n], memory.values[li][b, h, idx])
                assert torch.equal(pos_out[li, b, h, :n], pos_in[li, b, h, idx])
                assert torch.equal(out.segment[b, :n], memory.segment[b, idx])
                assert torch.equal(out.agent[b, :n], memory.agent[b, idx])
                rest = slice(n, out.num_tokens)
                assert bool((out.keys[li][b, h, rest] == 0).all()) and bool((out.values[li][b, h, rest] == 0).all())
                assert bool((out.segment[b, rest] == Segment.PAD).all()) and bool((out.agent[b, rest] == -1).all())
                assert bool((pos_out[li, b, h, rest] == 0).all())


@settings(max_examples=25, deadline=None)
@given(layouts(), st.integers(1, 12), st.booleans())
def test_headwise_and_layerwise_match_plain_loop(lay, budget, layerwise):
    memory, obs = build_memory(lay)
    scores = compute_scores(memory, obs)
    prompt = prompt_mask(memory, current_agent_index(memory, obs))
    select = select_layerwise if layerwise else select_headwise
    selection = select(scores, prompt, budget)
    out = gather_selection(memory, selection).memory
    out.validate()
    if out.num_tokens:
        assert out.per_head_positions
    check_evicted(memory, out, reference_kept(memory, scores, budget, layerwise), budget)
    # the sink is kept once, thoughts and history all pass
    for s in (Segment.SINK, Segment.THOUGHT, Segment.TEXT):
        assert torch.equal((out.segment == s).sum(1), (memory.segment == s).sum(1))
    assert 0.0 <= selection.retained_fraction <= 1.0
    if layerwise:  # one set per layer, shared by the heads
        assert selection.keep.shape[2] == 1


@settings(max_examples=15, deadline=None)
@given(layouts())
def test_generation_only_drops_the_whole_current_prompt(lay):
    memory, obs = build_memory(lay)
    selection = select_generation_only(prompt_mask(memory, current_agent_index(memory, obs)))
    out = gather_selection(memory, selection).memory
    kept = {(li, b, h): set() for li in range(lay.layers) for b in range(lay.batch) for h in range(lay.heads)}
    check_evicted(memory, out, kept, budget=None)
    assert not out.per_head_positions  # one shared token set: positions stay [B, T]
    assert selection.retained_fraction == (0.0 if sum(lay.prompts) else 1.0)
    # the other agent's prompt is history: it passes
    assert torch.equal(
        ((out.segment == Segment.PROMPT) & (out.agent == 0)).sum(1), torch.full((lay.batch,), lay.history)
    )


def test_positions_stay_original_and_new_tokens_continue_after_the_largest():
    memory, obs = build_memory(Layout(prompts=(12, 7), left_pad=(0, 2)))
    scores = compute_scores(memory, obs)
    out = gather_selection(memory, select_headwise(scores, prompt_mask(memory, 1), 3)).memory
    assert torch.equal(out.next_position(), memory.next_position())  # thoughts are last and kept
    for li in range(out.num_layers):  # order kept: valid positions strictly increase along slots
        for b in range(out.batch_size):
            for h in range(out.num_kv_heads):
                p = out.position[li, b, h][out.valid[b]]
                assert bool((p[1:] > p[:-1]).all())


def test_padding_and_nan_scores_are_never_selected():
    memory, obs = build_memory(Layout(prompts=(5, 2)))
    scores = compute_scores(memory, obs)
    scores[..., ~memory.valid] = 1e9  # padding with huge scores
    scores[0, 0, 0, memory.valid[0].nonzero()[-1]] = float("nan")
    prompt = prompt_mask(memory, 1)
    selection = select_headwise(scores, prompt, 4)
    assert not bool((selection.keep & ~prompt[None, :, None, :]).any())
    assert selection.kept.tolist() == [4, 2]


def test_observation_agent_absent_evicts_nothing_and_without_observation_uses_last_writer():
    memory, obs = build_memory(Layout())
    assert current_agent_index(memory, None) == 1
    obs.agent = "nobody"
    assert current_agent_index(memory, obs) == -1
    selection = select_headwise(compute_scores(memory, obs), prompt_mask(memory, -1), 2)
    out = gather_selection(memory, selection).memory
    assert torch.equal(out.valid.sum(1), memory.valid.sum(1))
    assert selection.retained_fraction == 1.0


@settings(max_examples=15, deadline=None)
@given(layouts(), st.booleans())
def test_gather_into_allocated_tensors_is_the_same_memory(lay, layerwise):
    """An allocator (a sender's PacketArena) gets the memory's shapes in tensor order and the new memory is made of
    its tensors, bit-identical to a gather without it; an allocator that returns other shapes is refused."""
    memory, obs = build_memory(lay)
    scores = compute_scores(memory, obs)
    prompt = prompt_mask(memory, current_agent_index(memory, obs))
    selection = (select_layerwise if layerwise else select_headwise)(scores, prompt, 3)
    plain = gather_selection(memory, selection).memory
    asked, made = [], []

    def allocate(shapes, device):
        asked.extend(shapes)
        made.extend(torch.full(shape, 7, dtype=dtype, device=device) for shape, dtype in shapes)
        return made

    out = gather_selection(memory, selection, allocate).memory
    tensors = memory_tensors(out)
    assert [(tuple(t.shape), t.dtype) for t in tensors] == [(tuple(s), d) for s, d in asked]
    assert all(t is m for t, m in zip(tensors, made, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(tensors, memory_tensors(plain), strict=True))
    with pytest.raises(ValueError, match="allocator"):
        gather_selection(memory, selection, lambda shapes, device: [torch.empty(1) for _ in shapes])


def test_selector_registry_names_the_scored_selectors(monkeypatch):
    from pydantic import ValidationError

    from latent_relay.compression.methods import ScoredEviction

    assert SELECTORS["head"] is select_headwise and SELECTORS["layer"] is select_layerwise
    with pytest.raises(ValueError, match="already registered as 'head'"):
        register_selector("head", select_layerwise)
    with pytest.raises(ValidationError, match="unknown selector 'first'"):
        ScoredEviction(selector="first")

    def first_tokens(scores, prompt, budget):
        return select_headwise(-torch.arange(scores.shape[-1], dtype=torch.float32).expand_as(scores), prompt, budget)

    monkeypatch.setitem(SELECTORS, "first", first_tokens)
    memory, obs = build_memory(Layout(prompts=(12, 7)))
    evicted = ScoredEviction(selector="first", budget=2).evict(memory, obs)
    prompt = evicted.selection.prompt
    for b in range(memory.batch_size):
        first_two = prompt[b].nonzero().squeeze(1)[:2]
        kept = evicted.selection.keep[:, b].nonzero()[:, -1].unique()
        assert torch.equal(kept, first_two)
