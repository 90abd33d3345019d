"""Text decoding: greedy, sampling, stop strings, end of sequence, max tokens."""

import torch

from latent_relay.agents.decoding import DecodeConfig, TokenPicker
from latent_relay.agents.models import tiny_model
from latent_relay.agents.runner import ModelRunner


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
    alive = torch.ones(2, dtype=torch.bool)
    picker.pick(logits, alive)
    assert picker.finished.tolist() == [False, True]
    picker.pick(logits, alive & ~picker.finished)
    assert picker.finished.tolist() == [True, True]
    assert picker.texts() == ["cc", ""] and picker.counts() == [2, 0]


def test_sampling_is_seeded_and_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1] + [1e-9] * 23]))
    draws = []
    for _ in range(2):
        picker = TokenPicker(DecodeConfig(greedy=False, temperature=1.0, top_p=0.5, seed=3), CharTokenizer(), 1, set())
        draws.append([int(picker.pick(logits, torch.ones(1, dtype=torch.bool))) for _ in range(20)])
    assert draws[0] == draws[1]
    assert set(draws[0]) == {0}  # only the top token fits in a 0.5 nucleus


def test_runner_decodes_max_new_tokens_into_text_segment():
    runner = ModelRunner(tiny_model("llama").model, CharTokenizer(), "")
    out = runner.step([None, None], [[1, 2, 3], [4]], "judger", decode=DecodeConfig(max_new_tokens=5))
    assert out.output_tokens == [5, 5] and all(len(t) == 5 for t in out.texts)
    for mem, n in zip(out.memories, (3, 1)):
        assert (mem.segment == 4).sum() == 4  # the last picked token is returned but not fed back
        assert mem.num_tokens == n + 4
