"""Scorers against plain-loop references: latent attention, SnapKV pooling, value-aware factors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from latent_relay.compression.scores import (
    compute_scores,
    latent_attention_scores,
    output_value_norms,
    pool_scores,
    value_norms,
)
from latent_relay.relay.memory import MemoryError_
from latent_relay.relay.observation import Observation
from tests.compression_fixtures import Layout, build_memory, layouts


@settings(max_examples=15, deadline=None)
@given(layouts())
def test_latent_attention_is_group_sum_over_thoughts(lay):
    memory, obs = build_memory(lay)
    got = latent_attention_scores(obs, memory)
    b_, l_, h_, m_, t_ = obs.attention.shape
    for li in range(l_):
        for b in range(b_):
            for h in range(h_):
                want = torch.zeros(t_)
                for i in range(m_):
                    want += obs.attention[b, li, h, i]
                want = want * obs.group_size * memory.valid[b]
                torch.testing.assert_close(got[li, b, h], want)


@pytest.mark.parametrize("kernel", [1, 2, 3, 7])
def test_pooling_matches_manual_average(kernel):
    scores = torch.rand(2, 3, 1, 11)
    got = pool_scores(scores, kernel)
    assert got.shape == scores.shape
    if kernel == 1:
        assert torch.equal(got, scores)
        return
    half = kernel // 2
    for idx in range(scores.shape[-1]):
        window = [scores[..., j] for j in range(idx - half, idx - half + kernel) if 0 <= j < scores.shape[-1]]
        want = torch.stack(window, -1).sum(-1) / kernel  # zero padding counts in the average (SnapKV)
        torch.testing.assert_close(got[..., idx], want)


def test_value_norms_match_manual():
    memory, _ = build_memory(Layout())
    for kind, p in (("l1", 1), ("l2", 2)):
        got = value_norms(memory, kind)
        for li, v in enumerate(memory.values):
            for b in range(v.shape[0]):
                for h in range(v.shape[1]):
                    for t in range(v.shape[2]):
                        want = float(v[b, h, t].abs().pow(p).sum() ** (1 / p))
                        assert abs(float(got[li, b, h, t]) - want) < 1e-5


def test_output_projection_norm_uses_the_query_heads_of_each_group():
    lay = Layout(heads=2, head_dim=4)
    memory, obs = build_memory(lay)
    g, hidden, d = 3, 5, lay.head_dim
    w_o = [torch.randn(hidden, lay.heads * g * d) for _ in range(lay.layers)]
    got = output_value_norms(memory, w_o)
    for li, v in enumerate(memory.values):
        for b in range(v.shape[0]):
            for h in range(lay.heads):
                for t in range(v.shape[2]):
                    want = sum(
                        float((w_o[li][:, q * d : (q + 1) * d] @ v[b, h, t]).abs().sum())
                        for q in range(h * g, (h + 1) * g)
                    )
                    assert abs(float(got[li, b, h, t]) - want) < 1e-4 * max(1.0, want)
    full = compute_scores(memory, obs, value="wo", output_proj=w_o)
    torch.testing.assert_close(full, latent_attention_scores(obs, memory) * got)


def test_pool_then_value_weight_and_padding_zero():
    memory, obs = build_memory(Layout())
    got = compute_scores(memory, obs, pool=3, value="l2")
    want = pool_scores(latent_attention_scores(obs, memory), 3, memory.valid) * value_norms(memory, "l2")
    want = want * memory.valid[None, :, None, :]
    torch.testing.assert_close(got, want)
    assert bool((got.permute(1, 3, 0, 2)[~memory.valid] == 0).all())


@pytest.mark.parametrize("kernel", [2, 3, 7])
def test_pooling_a_padded_batch_pools_each_item_without_its_padding(kernel):
    memory, obs = build_memory(Layout(batch=3, prompts=(12, 7, 2), left_pad=(0, 2, 1)))
    valid = memory.valid
    got = pool_scores(latent_attention_scores(obs, memory), kernel, valid)
    assert bool(valid.logical_not().any())  # the batch really is padded
    for b in range(memory.batch_size):
        alone = latent_attention_scores(obs, memory)[:, b : b + 1][..., valid[b]]
        assert torch.equal(got[:, b][..., valid[b]], pool_scores(alone, kernel)[:, 0])
        assert bool((got[:, b][..., ~valid[b]] == 0).all())


def test_mismatched_observation_and_missing_projection_raise():
    memory, obs = build_memory(Layout())
    short = Observation(obs.attention[..., :-1], obs.agent, obs.group_size)
    with pytest.raises(MemoryError_, match="does not match"):
        latent_attention_scores(short, memory)
    with pytest.raises(MemoryError_, match="output_proj"):
        compute_scores(memory, obs, value="wo")
