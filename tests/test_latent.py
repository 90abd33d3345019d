"""Latent thoughts: realignment, soft tokens, observations."""

import pytest
import torch

from latent_relay.agents.latent import LatentInput, realignment_matrix
from latent_relay.agents.models import tiny_model
from latent_relay.agents.runner import ModelRunner


def test_realignment_matrix_is_the_ridge_solution():
    g = torch.Generator().manual_seed(0)
    w_out, w_in = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    lam = 1e-2
    w_a = realignment_matrix(w_out, w_in, lam)
    # normal equations of argmin ||W_out W - W_in||^2 + lam ||W||^2
    torch.testing.assert_close((w_out.T @ w_out + lam * torch.eye(16)) @ w_a, w_out.T @ w_in, atol=1e-3, rtol=1e-4)
    ref = torch.linalg.lstsq(
        torch.cat([w_out, lam**0.5 * torch.eye(16)]), torch.cat([w_in, torch.zeros(16, 16)])
    ).solution
    torch.testing.assert_close(w_a, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(realignment_matrix(w_in, w_in, 1e-5), torch.eye(16), atol=1e-3)  # tied: ~identity


def test_hidden_modes_rescale_to_mean_input_norm_and_soft_mode_is_expected_embedding():
    g = torch.Generator().manual_seed(1)
    w_in, w_out = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    h, logits = torch.randn(3, 8, generator=g), torch.randn(3, 50, generator=g)
    mu = w_in.norm(dim=-1).mean()
    for mode in ("hidden", "realign"):
        e = LatentInput(mode).next_embedding(h, logits, w_in, w_out)
        torch.testing.assert_close(e.norm(dim=-1), mu.expand(3), atol=1e-4, rtol=1e-4)
    e = LatentInput("soft", temperature=0.5).next_embedding(h, logits, w_in, w_out)
    torch.testing.assert_close(e, torch.softmax(logits / 0.5, -1) @ w_in)
    with pytest.raises(ValueError):
        LatentInput("nope")


@pytest.mark.parametrize("mode", ["soft", "hidden", "realign"])
def test_observation_rows_are_distributions_over_existing_slots(mode):
    loaded = tiny_model("qwen3")
    runner = ModelRunner.from_loaded(loaded, latent=LatentInput(mode))
    first = runner.step([None, None], [list(range(3, 12)), list(range(40, 45))], "planner", thoughts=2)
    out = runner.step(first.memories, [[7, 8, 9], [1, 2]], "critic", thoughts=4, observe=True)
    for b, obs in enumerate(out.observations):
        mem = out.memories[b]
        assert obs.attention.shape == (1, mem.num_layers, mem.num_kv_heads, 4, mem.num_tokens)
        assert obs.agent == "critic" and obs.group_size == 2
        sums = obs.attention.sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
        assert bool((obs.attention >= 0).all())
        t = mem.num_tokens
        for i in range(4):  # thought i sees slots up to and including itself, nothing later
            assert float(obs.attention[..., i, t - 4 + i + 1 :].abs().sum()) == 0.0
    assert runner.model.config._attn_implementation != "eager" or loaded.model.config._attn_implementation == "eager"


def test_continuation_logprobs_match_a_plain_forward_and_ignore_batch_padding():
    loaded = tiny_model("llama")
    runner = ModelRunner.from_loaded(loaded)
    prompts, continuations = [list(range(3, 12)), [40, 41]], [[5, 6, 7], [9, 10, 11, 12]]
    got = runner.continuation_logprobs([None, None], prompts, continuations, "critic")
    for p, c, logprobs in zip(prompts, continuations, got, strict=True):
        with torch.inference_mode():
            logits = loaded.model(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1]
        assert logprobs.shape == (len(c), logits.shape[-1])
        torch.testing.assert_close(logprobs, torch.log_softmax(logits.float(), -1), atol=1e-4, rtol=1e-4)
    first = runner.step([None, None], prompts, "planner", thoughts=2)
    critic_prompts = [[7, 8], [1, 2, 3]]
    both = runner.continuation_logprobs(first.memories, critic_prompts, continuations, "critic")
    for b in range(2):
        alone = runner.continuation_logprobs([first.memories[b]], [critic_prompts[b]], [continuations[b]], "critic")
        torch.testing.assert_close(both[b], alone[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="continuation"):
        runner.continuation_logprobs([None], [[1, 2]], [[]], "critic")


def test_soft_tokens_of_a_bf16_model_convert_the_embedding_once():
    """The fp32 copy of a bf16 embedding is made once (it cost more than a thought's forward at every thought), and
    the soft token is exactly what converting it each time gives."""
    gen = torch.Generator().manual_seed(0)
    w_in = torch.randn(50, 8, generator=gen).bfloat16()
    logits, hidden = torch.randn(3, 50, generator=gen), torch.zeros(3, 8, dtype=torch.bfloat16)
    latent = LatentInput("soft", temperature=0.7)
    first = latent.next_embedding(hidden, logits, w_in, w_in)
    copy = latent._float_embedding(w_in)
    expected = (torch.softmax(logits / 0.7, dim=-1) @ w_in.float()).to(torch.bfloat16)
    assert torch.equal(first, expected) and latent._float_embedding(w_in) is copy
    w_in.add_(1)  # changed weights (a new version) are converted again
    assert latent._float_embedding(w_in) is not copy
