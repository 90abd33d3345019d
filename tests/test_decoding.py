"""Text decoding: greedy, sampling, stop strings, end of sequence, max tokens, the task's answer stop, and
finished items leaving the batch (the same texts and per-item memories as decoding every row to the end)."""

import pytest
import torch

from latent_relay.agents.decode_rows import DecodeRows
from latent_relay.agents.decoding import AnswerStop, DecodeConfig, TokenPicker
from latent_relay.agents.models import tiny_model
from latent_relay.agents.runner import ModelRunner
from latent_relay.relay.memory import KVState, Segment


class CharTokenizer:
    """Token id i is the character chr(97 + i % 26)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def test_greedy_picks_argmax_and_stops_at_eos_and_stop_strings():
    logits = torch.full((2, 26), -5.0)
    logits[0, 2] = 5.0  # 'c'
    logits[1, 25] = 5.0  # 'z' = eos for this picker
    picker = TokenPicker(DecodeConfig(stop=["cc"]), CharTokenizer(), 2, eos_ids={25})
    picker.pick(logits, [0, 1])
    assert picker.finished.tolist() == [False, True]
    picker.pick(logits[:1], [0])  # only the rows of items still decoding
    assert picker.finished.tolist() == [True, True]
    assert picker.texts() == ["cc", ""] and picker.counts() == [2, 0]


def test_sampling_is_seeded_and_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1] + [1e-9] * 23]))
    draws = []
    for _ in range(2):
        picker = TokenPicker(DecodeConfig(greedy=False, temperature=1.0, top_p=0.5, seed=3), CharTokenizer(), 1, set())
        draws.append([int(picker.pick(logits, [0])) for _ in range(20)])
    assert draws[0] == draws[1]
    assert set(draws[0]) == {0}  # only the top token fits in a 0.5 nucleus


def test_each_item_samples_from_its_own_stream_whoever_else_is_in_the_batch():
    logits = torch.zeros(3, 26)  # uniform: every draw comes from the stream
    config = DecodeConfig(greedy=False, temperature=1.0, seed=7)
    full, alone = TokenPicker(config, CharTokenizer(), 3, set()), TokenPicker(config, CharTokenizer(), 3, set())
    for _ in range(30):
        full.pick(logits, [0, 1, 2])
        alone.pick(logits[:1], [2])  # item 2 without items 0 and 1
    assert alone.tokens[2] == full.tokens[2] and len(set(full.tokens[2])) > 5
    assert full.tokens[0] != full.tokens[1]


def test_answer_stop_is_asked_only_after_a_trigger_and_can_be_turned_off():
    asked = []
    rule = AnswerStop("ends-with-c", lambda text: asked.append(text) or text.endswith("c"), triggers="c")
    logits = torch.full((1, 26), -5.0)
    for config, expect in ((DecodeConfig(), ["ac"]), (DecodeConfig(stop_at_answer=False), [])):
        picker, asked[:] = TokenPicker(config, CharTokenizer(), 1, set(), rule), []
        for letter in (0, 0, 2, 0):  # a a c a
            if not picker.done[0]:
                picker.pick(logits.index_fill(1, torch.tensor([letter]), 5.0), [0])
        assert picker.done[0] == bool(expect)
        assert picker.texts() == (["aac"] if expect else ["aaca"]) and asked == (["aac"] if expect else [])


def test_runner_decodes_max_new_tokens_into_text_segment():
    runner = ModelRunner(tiny_model("llama").model, CharTokenizer(), "")
    out = runner.step([None, None], [[1, 2, 3], [4]], "judger", decode=DecodeConfig(max_new_tokens=5))
    assert out.output_tokens == [5, 5] and all(len(t) == 5 for t in out.texts)
    for mem, n in zip(out.memories, (3, 1)):
        assert (mem.segment == 4).sum() == 4  # the last picked token is returned but not fed back
        assert mem.num_tokens == n + 4


# ------------------------------------------------------------------ finished items leave the batch
def decode_every_row(self, memory, cache, logits, config, agent_idx, answer_stop):
    """The decoding loop before items could leave the batch: every row is forwarded at every step, a finished
    row with a PAD slot (the reference the batch-leaving loop must match)."""
    picker = TokenPicker(config, self.tokenizer, memory.batch_size, self._eos_ids(), answer_stop)
    for step in range(config.max_new_tokens):
        items = [b for b in range(memory.batch_size) if not picker.done[b]]
        token = logits.argmax(-1)
        token[items] = picker.pick(logits[items], items)
        alive = ~picker.finished
        if not bool(alive.any()) or step == config.max_new_tokens - 1:
            break
        text = torch.full((memory.batch_size, 1), int(Segment.TEXT))
        memory, hidden, _ = self._forward(memory, cache, self.embed(token[:, None]), alive[:, None], text, agent_idx)
        logits = self.lm_head(hidden)
    return memory, picker.texts(), picker.counts()


PROMPTS = [[5, 9, 1, 7], [3], [11, 2, 8, 8, 6, 1], [20, 4], [17, 17, 3]]


def stopping_at(texts: list[str], lengths: list[int | None]) -> AnswerStop:
    """A rule that finds item b's answer complete after ``lengths[b]`` tokens of its reference text ``texts[b]``."""
    answers = {t[:n] for t, n in zip(texts, lengths) if n is not None}
    return AnswerStop("prefix", lambda text: text in answers)


def run_both(runner, monkeypatch, config, answer_stop, memories):
    """The step with items leaving the batch (and the batch size of each of its forwards), and the step with
    every row decoded to the end."""
    rows, forward = [], runner.decoder.forward
    with monkeypatch.context() as patch:
        patch.setattr(runner.decoder, "forward", lambda **kw: rows.append(len(kw["position_ids"])) or forward(**kw))
        leaving = runner.step(memories, PROMPTS, "judger", decode=config, answer_stop=answer_stop)
    with monkeypatch.context() as patch:
        patch.setattr(ModelRunner, "_decode", decode_every_row)
        every = runner.step(memories, PROMPTS, "judger", decode=config, answer_stop=answer_stop)
    return leaving, every, rows


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("with_memory", [False, True])
def test_finished_items_leave_the_batch_with_the_same_texts_and_memories(arch, with_memory, monkeypatch):
    loaded = tiny_model(arch, seed=1)
    loaded.model.generation_config.eos_token_id = None  # only the answer stop and the budget end an item
    runner = ModelRunner(loaded.model, CharTokenizer(), loaded.fingerprint)
    memories = None
    if with_memory:  # items arrive with working memories of different lengths (left-padded in the batch)
        first = runner.step([None] * 5, [p[::-1] * (b + 1) for b, p in enumerate(PROMPTS)], "planner", thoughts=3)
        memories = first.memories
    config = DecodeConfig(max_new_tokens=12)
    reference = runner.step(memories or [None] * 5, PROMPTS, "judger", decode=config).texts
    lengths = [3, None, 1, 7, 12]  # stops after 3 tokens, never, after the first, after 7, at the budget's last
    rule = stopping_at(reference, lengths)
    assert len({t[:3] for t in reference}) == 5  # the rule tells the items apart

    leaving, every, rows = run_both(runner, monkeypatch, config, rule, memories or [None] * 5)

    assert leaving.texts == every.texts == [t[:n] if n else t for t, n in zip(reference, lengths)]
    assert leaving.output_tokens == every.output_tokens == [3, 12, 1, 7, 12]
    for a, b in zip(leaving.memories, every.memories, strict=True):
        assert torch.equal(a.segment, b.segment) and torch.equal(a.agent, b.agent)
        assert torch.equal(a.position, b.position)
        for ka, kb, va, vb in zip(a.keys, b.keys, a.values, b.values):
            # the same up to float rounding: a matmul over fewer rows may sum in another order
            torch.testing.assert_close(ka, kb, rtol=0, atol=1e-6)
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-6)
    # the batch: as wide as before, a finished row's later slots are PAD with zero keys and values
    assert leaving.batch_memory.num_tokens == every.batch_memory.num_tokens
    assert torch.equal(leaving.batch_memory.valid, every.batch_memory.valid)
    pad = ~leaving.batch_memory.valid
    assert all(float(k[pad[:, None, :, None].expand_as(k)].abs().sum()) == 0 for k in leaving.batch_memory.keys)
    # the prefill, then 11 decode forwards: item 2 left after its first token, item 0 after 3, item 3 after 7
    assert rows == [5] + [4, 4] + [3] * 4 + [2] * 5


def test_sampled_items_draw_the_same_tokens_whether_or_not_others_left(monkeypatch):
    loaded = tiny_model("llama", seed=2)
    loaded.model.generation_config.eos_token_id = None
    runner = ModelRunner(loaded.model, CharTokenizer(), loaded.fingerprint)
    config = DecodeConfig(max_new_tokens=10, greedy=False, temperature=1.5, seed=4)
    reference = runner.step([None] * 5, PROMPTS, "judger", decode=config).texts
    rule = stopping_at(reference, [2, None, 4, None, None])
    stopped = runner.step([None] * 5, PROMPTS, "judger", decode=config, answer_stop=rule).texts
    assert stopped == [reference[0][:2], reference[1], reference[2][:4], reference[3], reference[4]]


@pytest.mark.parametrize("per_head", [False, True])
def test_rows_that_leave_come_back_in_item_order_padded_on_the_right(per_head):
    gen = torch.Generator().manual_seed(0)
    b, layers, heads, width = 4, 2, 2, 5

    def memory(batch, tokens):
        keys = [torch.randn(batch, heads, tokens, 3, generator=gen) for _ in range(layers)]
        position = torch.arange(tokens).expand(batch, tokens)
        if per_head:
            position = position[None, :, None].expand(layers, batch, heads, tokens).clone()
        table = torch.full((batch, tokens), int(Segment.TEXT))
        return KVState(keys, [k + 1 for k in keys], table, torch.zeros_like(table), position, ["judger"])

    start = memory(b, width)
    rows = DecodeRows(b)
    running, keep = rows.leave(start, [False, True, False, True])  # items 1 and 3 finish
    assert keep == [0, 2] and rows.items == [0, 2] and running.batch_size == 2
    new = memory(2, 2)  # the remaining rows decode two more tokens
    grown = KVState(
        [torch.cat([k, n], 2) for k, n in zip(running.keys, new.keys)],
        [torch.cat([v, n], 2) for v, n in zip(running.values, new.values)],
        torch.cat([running.segment, new.segment], 1),
        torch.cat([running.agent, new.agent], 1),
        torch.cat([running.position, new.position + width], -1),
        ["judger"],
    )
    whole = rows.whole(grown)
    assert whole.batch_size == b and whole.num_tokens == width + 2
    assert whole.valid.tolist() == [[True] * 7, [True] * 5 + [False] * 2, [True] * 7, [True] * 5 + [False] * 2]
    for item in range(b):
        got = whole.select_items([item])
        expect = start.select_items([item]) if item in (1, 3) else grown.select_items([rows.items.index(item)])
        for g, e in zip(got.keys + got.values, expect.keys + expect.values):
            assert torch.equal(g[:, :, : e.shape[2]], e) and not g[:, :, e.shape[2] :].any()
        assert torch.equal(got.position[..., : expect.num_tokens], expect.position)
        assert not got.position[..., expect.num_tokens :].any() and (got.agent[0, expect.num_tokens :] == -1).all()
    assert DecodeRows(2).whole(grown) is grown  # nothing left: the memory comes back as it is
