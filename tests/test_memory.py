"""KVState <-> DynamicCache, positions after eviction gaps, concatenation and batching."""

import pytest
import torch

from latent_relay.agents.cache import read_back, to_cache
from latent_relay.agents.models import tiny_model
from latent_relay.agents.runner import ModelRunner
from latent_relay.relay.batch import split_items, split_observation, stack_items
from latent_relay.relay.memory import (
    IncompatibleMemoryError,
    KVState,
    MemoryError_,
    Segment,
    check_same_model,
    concat_memories,
)
from latent_relay.relay.observation import Observation
from tests.fuzz.packets import make_memory, memory_tensors

ARCHS = ["llama", "qwen2", "qwen3"]


def _memory_from(model, ids: torch.Tensor, fingerprint="fp") -> KVState:
    out = model(input_ids=ids, use_cache=True)
    cache = out.cache
    b, t = ids.shape
    empty = KVState.empty(b, len(cache.layers), cache.layers[0].keys.shape[1], cache.layers[0].keys.shape[3])
    seg = torch.full((b, t), int(Segment.PROMPT))
    return read_back(empty, cache, seg, torch.zeros(b, t, dtype=torch.long), torch.arange(t).expand(b, t), ["a"])


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_round_trip_gives_same_logits_as_full_sequence(arch):
    model = tiny_model(arch).model
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(input_ids=ids).logits[:, 8:]
    memory = _memory_from(model, ids[:, :8])
    cache = to_cache(memory)
    assert [layer.keys.shape[2] for layer in cache.layers] == [8] * memory.num_layers
    out = model(input_ids=ids[:, 8:], cache=cache, position_ids=torch.arange(8, 12).expand(2, 4))
    torch.testing.assert_close(out.logits, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_after_eviction_continues_after_largest_original_position(arch):
    loaded = tiny_model(arch)
    model = loaded.model
    runner = ModelRunner(model, None, "")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    new = [int(x) for x in torch.randint(0, 256, (4,), generator=torch.Generator().manual_seed(3))]
    memory = _memory_from(model, ids, fingerprint="")
    kept = torch.tensor([0, 1, 2, 5, 6, 9])  # slots 3, 4, 7, 8 evicted; the last token (position 9) survives
    evicted = KVState(
        keys=[k[:, :, kept] for k in memory.keys],
        values=[v[:, :, kept] for v in memory.values],
        segment=memory.segment[:, kept],
        agent=memory.agent[:, kept],
        position=memory.position[:, kept],
        agents=memory.agents,
    )
    assert int(evicted.next_position()) == 10
    out = runner.step([evicted], [new], "b")
    got = out.memories[0]
    assert got.position[0, -4:].tolist() == [10, 11, 12, 13]
    # reference: the whole sequence in one forward, new tokens masked off the evicted slots
    seq = torch.cat([ids, torch.tensor([new])], dim=1)
    allowed = torch.ones(14, 14).tril().bool()
    allowed[10:, torch.tensor([3, 4, 7, 8])] = False
    mask = torch.zeros(1, 1, 14, 14).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = model(input_ids=seq, attention_mask=mask, use_cache=True).cache
    for layer in range(got.num_layers):
        torch.testing.assert_close(got.keys[layer][:, :, -4:], ref.layers[layer].keys[:, :, 10:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            got.values[layer][:, :, -4:], ref.layers[layer].values[:, :, 10:], atol=1e-5, rtol=1e-4
        )


def test_batched_step_equals_single_items_and_padding_never_travels():
    runner = ModelRunner(tiny_model("qwen2").model, None, "")
    prompts = [list(range(5, 17)), list(range(30, 35)), list(range(40, 48))]
    batched = runner.step([None] * 3, prompts, "a", thoughts=3, observe=True)
    for b, p in enumerate(prompts):
        single = runner.step([None], [p], "a", thoughts=3, observe=True)
        m, s = batched.memories[b], single.memories[0]
        assert m.num_tokens == len(p) + 3 and bool(m.valid.all())
        for k1, k2 in zip(m.keys + m.values, s.keys + s.values):
            torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            batched.observations[b].attention, single.observations[0].attention, atol=1e-5, rtol=1e-4
        )
    # a second agent on the ragged memories: still equal to one-at-a-time
    second = runner.step(batched.memories, [[1, 2, 3], [4, 5], [6]], "b", thoughts=2)
    alone = runner.step([batched.memories[1]], [[4, 5]], "b", thoughts=2)
    torch.testing.assert_close(second.memories[1].keys[0], alone.memories[0].keys[0], atol=1e-5, rtol=1e-4)


def test_segments_owners_and_sink():
    runner = ModelRunner(tiny_model("llama").model, None, "")
    out = runner.step([None], [list(range(10, 20))], "planner", thoughts=2)
    m = out.memories[0]
    assert m.segment[0].tolist() == [1] * 4 + [2] * 6 + [3] * 2
    out2 = runner.step(out.memories, [list(range(3))], "critic", thoughts=1)
    m2 = out2.memories[0]
    assert m2.agents == ["planner", "critic"]
    assert m2.agent[0].tolist() == [0] * 12 + [1] * 4
    assert (m2.segment[0] == Segment.SINK).sum() == 4  # the sink is only the first agent's


def test_concat_and_stack_split_round_trip():
    runner = ModelRunner(tiny_model("llama").model, None, "")
    a = runner.step([None], [list(range(10, 16))], "x").memories[0]
    b = runner.step([None], [list(range(20, 23))], "y").memories[0]
    both = concat_memories([a, b])
    assert both.num_tokens == 9 and both.agents == ["x", "y"] and both.agent[0].tolist() == [0] * 6 + [1] * 3
    assert int(both.next_position()) == 6
    stacked = stack_items([a, b])
    assert stacked.num_tokens == 6 and int(stacked.valid[1].sum()) == 3
    parts = split_items(stacked)
    for orig, back in zip([a, b], parts):
        assert back.agents == ["x", "y"] or back.agents == orig.agents
        torch.testing.assert_close(back.keys[0], orig.keys[0])
        assert back.position.tolist() == orig.position.tolist()


def test_bad_memories_are_refused():
    m = KVState.empty(1, 2, 2, 8)
    with pytest.raises(MemoryError_):
        KVState(keys=m.keys, values=m.values[:1], segment=m.segment, agent=m.agent, position=m.position)
    runner = ModelRunner(tiny_model("llama").model, None, "fp-runner")
    other = tiny_model("llama").model
    foreign = ModelRunner(other, None, "fp-other").step([None], [[1, 2, 3]], "a").memories[0]
    with pytest.raises(IncompatibleMemoryError, match="fp-other"):
        runner.step([foreign], [[4]], "b")


@pytest.mark.parametrize(
    "change",
    [
        lambda k, v: (k[:1] + [k[1][:, :, :2]], v),  # one layer's keys with fewer tokens
        lambda k, v: (k[:1] + [torch.zeros(1, 2, 3, 4)], v),  # one layer's head dim differs
        lambda k, v: ([x[:, :, :2] for x in k], [x[:, :, :2] for x in v]),  # every layer alike, tokens wrong
        lambda k, v: (k, [x[:, :1] for x in v]),  # every layer alike, values with other heads than keys
        lambda k, v: ([x[0] for x in k], [x[0] for x in v]),  # every layer alike, not 4-d
    ],
)
def test_every_layer_is_checked_against_the_token_table(change):
    m = KVState(
        keys=[torch.zeros(1, 2, 3, 8)] * 2,
        values=[torch.zeros(1, 2, 3, 8)] * 2,
        segment=torch.zeros(1, 3, dtype=torch.int8),
        agent=torch.zeros(1, 3, dtype=torch.int16),
        position=torch.arange(3)[None],
    )
    keys, values = change(m.keys, m.values)
    with pytest.raises(MemoryError_):
        KVState(keys=keys, values=values, segment=m.segment, agent=m.agent, position=m.position)


def test_check_same_model_is_one_rule():
    check_same_model("model-a", "model-a")
    check_same_model("", "model-b")  # an unknown fingerprint matches anything
    check_same_model("model-a", "")
    with pytest.raises(IncompatibleMemoryError, match="model-b"):
        check_same_model("model-a", "model-b", "a packet's memory")
    a, b = make_memory(fingerprint="model-a"), make_memory(fingerprint="model-b")
    with pytest.raises(IncompatibleMemoryError, match="model-b"):
        concat_memories([a, b])
    with pytest.raises(IncompatibleMemoryError, match="model-b"):
        stack_items([a.select_items([0]), b.select_items([0])])


@pytest.mark.parametrize("per_head", [False, True])
def test_split_items_into_allocated_tensors_is_the_same_and_drops_padding(per_head):
    """Each item is asked for in wire order (the frame spec), written straight into what its allocator made, and
    equals the split without allocators; PAD slots and PAD observation columns never travel."""
    memory = make_memory(batch=2, tokens=6, layers=2, per_head=per_head)  # item 0 has one PAD slot
    plain = split_items(memory)
    assert [m.num_tokens for m in plain] == [5, 6] and all(bool(m.valid.all()) for m in plain)
    made, asked = [], []

    def allocate(shapes, device):
        asked.append([(tuple(s), d) for s, d in shapes])
        made.append([torch.full(shape, 7, dtype=dtype, device=device) for shape, dtype in shapes])
        return made[-1]

    items = split_items(memory, [allocate, None])
    assert asked == [[(tuple(t.shape), t.dtype) for t in memory_tensors(plain[0])]]
    assert all(t is m for t, m in zip(memory_tensors(items[0]), made[0], strict=True))
    for got, want in zip(items, plain, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(memory_tensors(got), memory_tensors(want), strict=True))
    keep = memory.valid[0]
    assert torch.equal(items[0].keys[1], memory.keys[1][:1, :, keep])
    attention = torch.rand(2, 2, 2, 3, 6)
    parts = split_observation(Observation(attention, "planner", 2), memory)
    assert [p.attention.shape[-1] for p in parts] == [5, 6] and parts[0].group_size == 2
    assert torch.equal(parts[0].attention, attention[:1][..., keep])
    assert split_observation(None, memory) is None


def _tagged_memory() -> KVState:
    """Two items: sink, a's prompt and thoughts, then b's prompt and thoughts (item 1 has a padded first slot)."""
    seg = torch.tensor(
        [
            [Segment.SINK, Segment.PROMPT, Segment.THOUGHT, Segment.PROMPT, Segment.PROMPT, Segment.THOUGHT],
            [Segment.PAD, Segment.SINK, Segment.THOUGHT, Segment.PROMPT, Segment.THOUGHT, Segment.THOUGHT],
        ],
        dtype=torch.int8,
    )
    agent = torch.tensor([[0, 0, 0, 1, 1, 1], [-1, 0, 0, 1, 1, 1]], dtype=torch.int16)
    keys = [torch.arange(2 * 2 * 6 * 4, dtype=torch.float32).reshape(2, 2, 6, 4) + 1 for _ in range(2)]
    values = [k * 10 for k in keys]
    position = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 4]])
    return KVState(keys, values, seg, agent, position, agents=["a", "b"], fingerprint="fp")


def _tokens(memory: KVState, b: int) -> list[tuple[int, int, float]]:
    """Item ``b``'s real slots as (segment, position, first key value)."""
    valid = memory.valid[b]
    return [
        (int(s), int(p), float(k))
        for s, p, k in zip(memory.segment[b][valid], memory.position[b][valid], memory.keys[0][b, 0, valid, 0])
    ]


def test_memory_views_keep_sink_and_thoughts_or_the_last_sender_at_their_positions():
    from latent_relay.relay.memory import memory_view

    memory = _tagged_memory()
    full = {b: _tokens(memory, b) for b in (0, 1)}
    assert memory_view(memory, "all") is memory
    thoughts = memory_view(memory, "thoughts")
    keep = {int(Segment.SINK), int(Segment.THOUGHT)}
    for b in (0, 1):
        assert _tokens(thoughts, b) == [t for t in full[b] if t[0] in keep]
    assert thoughts.num_tokens == 5  # one slot is padding in both items now, and dropped
    assert thoughts.next_position().tolist() == memory.next_position().tolist()
    last = memory_view(memory, "last", "b")
    assert _tokens(last, 0) == [full[0][0], *full[0][3:]] and _tokens(last, 1) == [full[1][0], *full[1][2:]]
    assert not bool(last.keys[0][~last.valid[:, None, :, None].expand_as(last.keys[0])].any())  # padding is zero
    assert _tokens(memory_view(memory, "last", "nobody"), 0) == [full[0][0]]
    with pytest.raises(MemoryError_, match="unknown memory view"):
        memory_view(memory, "everything")
