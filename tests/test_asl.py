"""ASL (arXiv 2601.07667): the rank-variance rule on constructed ranks, its depth scaling, the window scores and the
``asl`` relay selector, each against its plain-loop twin in compression/asl_reference.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latent_relay.compression.asl import (
    AslLayers,
    choose_layer,
    rank_variance,
    selection_layer,
    stability_ratios,
    token_ranks,
    window_attention_scores,
)
from latent_relay.compression.asl_reference import (
    rank_variance_reference,
    select_asl_reference,
    selection_layer_reference,
    token_ranks_reference,
    window_attention_scores_reference,
)
from latent_relay.compression.recipes import RecipeError, compress, compress_batch, parse_recipe
from latent_relay.compression.scores import compute_scores
from latent_relay.compression.selectors import (
    SELECTORS,
    current_agent_index,
    gather_selection,
    prompt_mask,
    select_asl,
    select_headwise,
)
from latent_relay.relay.batch import split_items, split_observation
from latent_relay.relay.observation import Observation
from tests.compression_fixtures import Layout, build_memory
from tests.test_compression_selectors import check_evicted

# ------------------------------------------------------------------------------------------------ depth scaling


@pytest.mark.parametrize(
    ("layers", "l_min", "l_obs"),
    [(32, 10, 8), (36, 11, 9), (28, 9, 7), (24, 8, 6), (64, 20, 16), (16, 5, 4), (8, 3, 2), (2, 1, 2), (1, 1, 2)],
)
def test_paper_constants_scale_with_depth(layers, l_min, l_obs):
    assert AslLayers.for_depth(layers) == AslLayers(l_min=l_min, l_obs=l_obs)


def test_bad_layer_constants_are_named():
    with pytest.raises(ValueError, match="l_obs must be at least 2"):
        AslLayers(l_min=4, l_obs=1)
    with pytest.raises(ValueError, match="l_min must be at least l_obs - 1"):
        AslLayers(l_min=2, l_obs=8)
    with pytest.raises(ValueError, match="num_layers"):
        AslLayers.for_depth(0)


# ------------------------------------------------------------------------------------------------ ranks and V


def test_ranks_of_constructed_scores():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 7.0, float("nan")])
    cand = torch.tensor([True, True, True, True, False, True])
    assert token_ranks(scores, cand).tolist() == [4, 1, 3, 2, 0, 5]  # tie -> earlier slot; NaN last; 7.0 no candidate
    assert token_ranks_reference([0.1, 0.9, 0.5, 0.9, 7.0, -1e30], cand.tolist()) == [4, 1, 3, 2, 0, 5]


def test_rank_variance_of_constructed_rank_matrices():
    ranks = torch.tensor([[1, 2, 3, 0], [2, 1, 3, 0], [1, 3, 2, 0]])
    # top 1: U = {slot 0 (first in layers 0 and 2), slot 1 (first in layer 1)}
    # Var(1, 2, 1) = 2/9, Var(2, 1, 3) = 2/3 -> V = 4/9
    assert float(rank_variance(ranks, 1)) == pytest.approx(4 / 9)
    # top 2 adds slot 2 (second in layer 2): Var(3, 3, 2) = 2/9 -> V = (2/9 + 6/9 + 2/9) / 3
    assert float(rank_variance(ranks, 2)) == pytest.approx(10 / 27)
    assert rank_variance_reference(ranks.tolist(), 2) == pytest.approx(10 / 27)
    assert float(rank_variance(torch.tensor([[1, 2, 3]] * 4), 2)) == 0.0  # identical ranks: no variance
    assert math.isnan(float(rank_variance(torch.zeros(3, 5, dtype=torch.long), 2)))  # no candidates: no U
    batched = torch.stack([ranks, ranks.flip(0)], dim=1)  # [layers, items, T], per-item top
    assert rank_variance(batched, torch.tensor([1, 2])).tolist() == pytest.approx([4 / 9, 10 / 27])


A, B = [1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]


def _ratios(rows: list[list[int]], top: int = 3) -> torch.Tensor:
    ranks = torch.tensor(rows)
    return stability_ratios(ranks, top, AslLayers.for_depth(len(rows)))


def test_stability_ratio_and_the_first_layer_below_tau():
    rows = [A, B, A, B, A, A, A, A]  # 8 layers: l_min = 3, l_obs = 2; window (l - 1, l)
    rho = _ratios(rows)
    assert [math.isnan(x) for x in rho[:3].tolist()] == [True] * 3
    assert rho[3:].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]  # layers 3, 4 disagree like layer 3; from 5 on identical
    assert int(selection_layer(rho, 0.3)) == 5
    star, _ = selection_layer_reference(rows, 3, 0.3, AslLayers.for_depth(8))
    assert star == 5


def test_tau_decides_between_partial_and_full_settling():
    # ratio 1 at l_min, then a window that disagrees on one pair of the top 3 only (half the variance)
    c = [1, 2, 3, 4, 5, 6]
    d = [1, 2, 4, 3, 5, 6]  # slots 2 and 3 swap
    e = [2, 1, 4, 3, 5, 6]  # slots 0, 1 and 2, 3 swap
    rows = [c, e, c, e, d, d, c, c]
    rho = _ratios(rows)
    ref = selection_layer_reference(rows, 3, 0.3, AslLayers.for_depth(8))[1]
    assert rho[3:].tolist() == pytest.approx(ref[3:])
    assert rho[3] == 1.0 and 0 < rho[4] < 1 and rho[5] == 0.0
    half = float(rho[4])
    assert int(selection_layer(rho, min(0.99, half + 0.01))) == 4  # a loose tau selects the partly settled layer
    assert int(selection_layer(rho, max(0.01, half - 0.01))) == 5  # a strict one waits for the identical window


def test_no_layer_when_the_ratio_never_drops_below_tau():
    rho = _ratios([A, B] * 6)
    assert rho[4:].tolist() == [1.0] * 8  # 12 layers: l_min = 4, l_obs = 3
    assert int(selection_layer(rho, 0.3)) == -1
    assert int(selection_layer(_ratios([A, B]), 0.99)) == -1  # 2 layers: rho(1) = 1
    assert int(selection_layer(_ratios([A]), 0.99)) == -1  # 1 layer: no ratio at all


def test_already_stable_first_window_selects_l_min():
    rho = _ratios([A, B, A, A, A, B, A, A])  # V(3) = 0 (layers 2, 3 agree): rho(3) = 0, rho(5) = inf
    assert rho[3] == 0.0 and rho[5] == math.inf
    assert int(selection_layer(rho, 0.3)) == 3


@pytest.mark.parametrize("tau", [0, 1, -0.5, 1.5, float("nan"), "0.3", True])
def test_bad_tau_is_named(tau):
    with pytest.raises(ValueError, match="tau must be a number in"):
        selection_layer(torch.zeros(4, 1), tau)
    with pytest.raises(ValueError, match="tau must be a number in"):
        select_asl(torch.rand(2, 1, 1, 5), torch.ones(1, 5, dtype=torch.bool), 2, tau=tau)


def test_bad_budget_is_named():
    with pytest.raises(ValueError, match="budget must be a positive number"):
        select_asl(torch.rand(2, 1, 1, 5), torch.ones(1, 5, dtype=torch.bool), 0)
    for recipe, option in (("asl:tau=1.0,budget=4", "tau"), ("asl:budget=0", "budget"), ("asl-obf:tau=0", "tau")):
        with pytest.raises(RecipeError, match=f"option '{option}' of method"):
            parse_recipe(recipe)
    with pytest.raises(RecipeError, match="unknown option 'tau' for method 'h'"):
        parse_recipe("h:tau=0.3")


def _settling(layers: int, batch: int, t: int, settle: list[int], seed: int) -> torch.Tensor:
    """Per-layer scores ``[L, B, T]`` whose ranks are random until layer ``settle[b]``, then fixed."""
    gen = torch.Generator().manual_seed(seed)
    final = torch.rand(batch, t, generator=gen)
    noise = torch.rand(layers, batch, t, generator=gen)
    after = torch.arange(layers)[:, None] >= torch.tensor(settle)[None, :]
    return torch.where(after[..., None], final[None], noise)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 20), st.integers(1, 3), st.integers(1, 24), st.integers(1, 8), st.floats(0.05, 0.95), st.data())
def test_choose_layer_matches_plain_loop(layers, batch, t, top, tau, data):
    settle = data.draw(st.lists(st.integers(0, layers), min_size=batch, max_size=batch))
    scores = _settling(layers, batch, t, settle, data.draw(st.integers(0, 999)))
    cand = torch.rand(batch, t, generator=torch.Generator().manual_seed(t)) < 0.8
    star, ranks = choose_layer(scores, cand[None], torch.full((batch,), top), tau)
    for b in range(batch):
        rows = [token_ranks_reference(scores[li, b].tolist(), cand[b].tolist()) for li in range(layers)]
        assert ranks[:, b].tolist() == rows
        want, rho = selection_layer_reference(rows, top, tau, AslLayers.for_depth(layers))
        got = stability_ratios(ranks[:, b : b + 1], top, AslLayers.for_depth(layers))[:, 0].tolist()
        assert got == pytest.approx(rho, nan_ok=True)
        assert int(star[b]) == want


# ------------------------------------------------------------------------------------------------ window scores


@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 2),
    st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    st.integers(1, 20),
    st.integers(1, 6),
    st.sampled_from([1, 3, 7]),
    st.integers(0, 4),
    st.integers(0, 999),
)
def test_window_scores_match_the_full_attention_loop(batch, heads, t, w, pool, pad, seed):
    h, h_kv = heads
    w = min(w, t)
    pad = min(pad, t - w)  # the window is real tokens: left padding only
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, h, t, 8, generator=gen)
    keys = torch.randn(batch, h_kv, t, 8, generator=gen)
    valid = torch.ones(batch, t, dtype=torch.bool)
    valid[-1, :pad] = False  # the last item is left-padded
    got = window_attention_scores(queries[:, :, -w:], keys, valid=valid, pool=pool)
    want = window_attention_scores_reference(queries, keys, w, valid=valid, pool=pool)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert bool((got[~valid] == 0).all())
    if pool == 1:  # every window query spreads one unit of attention per head
        assert float(got.sum()) == pytest.approx(batch * h * w, rel=1e-5)


def test_window_scores_of_a_model_layer_rank_the_tokens_of_its_full_attention():
    """Layer by layer, the window scores give the ranks a full causal attention would; then L* is picked."""
    gen = torch.Generator().manual_seed(1)
    layers, t, w = 12, 40, 6
    per_layer = []
    for _ in range(layers):
        q, k = torch.randn(1, 4, t, 16, generator=gen), torch.randn(1, 2, t, 16, generator=gen)
        per_layer.append(window_attention_scores(q[:, :, -w:], k))
        torch.testing.assert_close(per_layer[-1], window_attention_scores_reference(q, k, w), rtol=1e-5, atol=1e-5)
    cand = torch.zeros(1, t, dtype=torch.bool)
    cand[:, : t - w] = True  # the window itself is always kept: only earlier tokens compete
    star, ranks = choose_layer(torch.stack(per_layer), cand[None], 8)
    assert bool((ranks[:, :, t - w :] == 0).all()) and ranks.max() == t - w
    assert -1 <= int(star) < layers


def test_window_scores_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="not a multiple"):
        window_attention_scores(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="window"):
        window_attention_scores(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="do not match"):
        window_attention_scores(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 5, 8))


# ------------------------------------------------------------------------------------------------ the selector


def _settling_observation(lay: Layout, settle: list[int]) -> tuple:
    """A memory and an observation whose head-summed attention ranks settle at layer ``settle[b]`` of item b."""
    memory, obs = build_memory(lay)
    scores = _settling(lay.layers, lay.batch, memory.num_tokens, settle, lay.seed)  # [L, B, T]
    heads = torch.rand(
        lay.layers, lay.batch, lay.heads, memory.num_tokens, generator=torch.Generator().manual_seed(lay.seed + 1)
    )
    heads = heads * 0.01 + scores[:, :, None, :]  # per-head noise too small to change the summed ranks
    att = heads.permute(1, 0, 2, 3)[:, :, :, None, :].expand(-1, -1, -1, max(lay.thoughts, 1), -1)
    att = att * memory.valid[:, None, None, None, :]
    return memory, Observation(att.contiguous().float(), obs.agent, lay.group_size)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 14), st.integers(1, 12), st.floats(0.1, 0.9), st.integers(0, 2**16), st.data())
def test_asl_selector_matches_plain_loop_and_meets_the_budget(layers, budget, tau, seed, data):
    lay = Layout(
        batch=2, layers=layers, heads=2, prompts=(data.draw(st.integers(0, 16)), 9), left_pad=(0, 2), seed=seed
    )
    settle = data.draw(st.lists(st.integers(0, layers), min_size=2, max_size=2))
    memory, obs = _settling_observation(lay, settle)
    scores = compute_scores(memory, obs)
    prompt = prompt_mask(memory, current_agent_index(memory, obs))
    selection = select_asl(scores, prompt, budget, tau)
    kept, stars = select_asl_reference(scores, prompt, budget, tau)
    assert selection.layer.tolist() == stars
    for (li, b, h), want in kept.items():
        assert set(selection.keep[li, b, min(h, selection.keep.shape[2] - 1)].nonzero().flatten().tolist()) == want
    assert selection.kept.tolist() == [min(budget, p) for p in lay.prompts]
    out = gather_selection(memory, selection).memory
    out.validate()
    check_evicted(memory, out, kept, budget)  # exact budget per (layer, item, head), original positions and order


def test_deeper_layers_share_the_set_chosen_at_the_selection_layer():
    lay = Layout(batch=2, layers=12, heads=3, prompts=(16, 12), left_pad=(0, 1))
    memory, obs = _settling_observation(lay, [6, 12])  # item 0 settles at layer 6, item 1 never
    scores = compute_scores(memory, obs)
    prompt = prompt_mask(memory, 1)
    selection = select_asl(scores, prompt, 4, 0.3)
    star = selection.layer.tolist()
    assert 6 < star[0] < 12 and star[1] == -1
    deep = selection.keep[star[0] + 1 :, 0]  # [layers, heads, T]
    assert bool((deep == deep[:1, :1]).all())  # one set for every deeper layer and head
    summed = scores[star[0], 0].sum(0).masked_fill(~prompt[0], float("-inf"))
    assert set(deep[0, 0].nonzero().flatten().tolist()) == set(summed.topk(4).indices.tolist())
    head = select_headwise(scores, prompt, 4)  # up to L*, and for the item without L* everywhere: per head
    assert torch.equal(selection.keep[: star[0] + 1, 0], head.keep[: star[0] + 1, 0])
    assert torch.equal(selection.keep[:, 1], head.keep[:, 1])


def test_asl_is_registered_and_reports_the_selection_layer():
    assert SELECTORS["asl"] is select_asl
    recipe = parse_recipe("asl:tau=0.3,budget=32+int8")
    assert recipe.canonical == "asl:tau=0.3,budget=32+int8" and recipe.steps[0].selector == "asl"
    assert parse_recipe("asl:budget=8").canonical == "asl:tau=0.3,budget=8"  # tau defaults to the paper's
    assert parse_recipe("asl:budget=8").steps[0].pool == 7  # SnapKV pooling kernel 7, as the paper
    assert parse_recipe("asl-obf:budget=8").canonical == "asl-obf:tau=0.3,budget=8,rank=2"
    lay = Layout(batch=1, layers=12, prompts=(16,), left_pad=(0,))
    memory, obs = _settling_observation(lay, [5])
    _, metrics = compress(memory, obs, "asl:tau=0.3,budget=4,pool=1")
    assert 5 < metrics["selection_layer"] < 12 and metrics["kept_prompt_tokens"] == 4


def test_asl_on_a_batch_is_asl_per_item():
    lay = Layout(batch=3, layers=12, prompts=(16, 5, 11), left_pad=(0, 2, 1), history=2)
    memory, obs = _settling_observation(lay, [4, 8, 12])
    for recipe in ("asl:tau=0.3,budget=4", "asl-obf:tau=0.5,budget=3,solver=exact"):
        packed, metrics = compress_batch(memory, obs, recipe)
        layers = [m["selection_layer"] for m in metrics]
        assert len(set(layers)) > 1  # the items select at different layers
        for item, item_obs, got, got_metrics in zip(
            split_items(memory), split_observation(obs, memory), packed, metrics
        ):
            want, want_metrics = compress(item, item_obs, recipe)
            assert got_metrics["selection_layer"] == want_metrics["selection_layer"]
            for a, b in zip(got.values, want.values, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            for a, b in zip(got.keys, want.keys, strict=True):
                assert torch.equal(a, b)
