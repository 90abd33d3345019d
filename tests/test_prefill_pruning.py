"""Prefill pruning (ASL, FastKV-like, GemFilter-like, per-layer SnapKV) on tiny random Llama, Qwen2 and Qwen3 models,
against plain forwards and the plain-loop references of :mod:`latent_relay.agents.prefill_reference`."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from latent_relay.agents.models import tiny_model
from latent_relay.agents.prefill_pruning import (
    METHODS,
    PrunedPrefill,
    PruneSettings,
    UnsupportedArchitectureError,
    WindowRule,
    decode_step,
    greedy_decode,
    prune_prefill,
)
from latent_relay.agents.prefill_reference import (
    continue_from_layer,
    full_forward,
    top_slots_reference,
    window_scores_reference,
)
from latent_relay.compression.asl import choose_layer, window_attention_scores

ARCHS = ("llama", "qwen2", "qwen3")
RULE = WindowRule(window_attention_scores, choose_layer)
LAYERS, T, WINDOW, POOL, BUDGET = 8, 48, 4, 7, 16
ATOL = 1e-5


@cache
def model(arch: str):
    return tiny_model(arch, 0, num_layers=LAYERS).model


def prompt(seed: int = 1, length: int = T) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@cache
def scores_of(arch: str, seed: int = 1) -> list[list[float]]:
    return window_scores_reference(model(arch), prompt(seed), WINDOW, POOL)


def settings(method: str, **kw) -> PruneSettings:
    return PruneSettings(method, **{"budget": BUDGET, "window": WINDOW, "pool": POOL, **kw})


def same_kv(result: PrunedPrefill, kv, layers=None, slots=None):
    for i in layers if layers is not None else range(len(kv)):
        key, value = kv[i]
        if slots is not None:
            key, value = key[:, :, slots], value[:, :, slots]
        assert torch.allclose(result.cache.layers[i].keys, key, atol=ATOL), f"keys of layer {i}"
        assert torch.allclose(result.cache.layers[i].values, value, atol=ATOL), f"values of layer {i}"


def reference_star(scores: list[list[float]], tau: float) -> int:
    candidates = torch.ones(1, T, dtype=torch.bool)
    candidates[:, T - WINDOW :] = False
    star, _ = choose_layer(torch.tensor(scores)[:, None], candidates, BUDGET - WINDOW, tau)
    return int(star[0])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [None, T + 7])
def test_without_pruning_it_is_the_plain_forward(arch, method, budget):
    ids = prompt()
    result = prune_prefill(model(arch), ids, settings(method, budget=budget), RULE)
    logits, kv, _ = full_forward(model(arch), ids)
    assert torch.allclose(result.logits, logits, atol=ATOL)
    same_kv(result, kv)
    assert result.kv_tokens() == [T] * LAYERS and result.next_position == T and result.layer == -1
    assert all(torch.equal(p, torch.arange(T)) for p in result.positions)


@pytest.mark.parametrize("arch", ARCHS)
def test_asl_that_selects_no_layer_prunes_nothing(arch):
    ids = prompt()
    tau = 1e-9  # rho never drops this low on random weights
    assert reference_star(scores_of(arch), tau) == -1
    result = prune_prefill(model(arch), ids, settings("asl", tau=tau, early_kv="full"), RULE)
    logits, kv, _ = full_forward(model(arch), ids)
    assert result.layer == -1 and result.kept is None
    assert torch.allclose(result.logits, logits, atol=ATOL)
    same_kv(result, kv)


@pytest.mark.parametrize("arch", ARCHS)
def test_per_layer_snapkv_keeps_each_layers_own_top(arch):
    ids = prompt()
    reference = scores_of(arch)
    result = prune_prefill(model(arch), ids, settings("snapkv"), RULE)
    assert torch.allclose(torch.stack(result.scores), torch.tensor(reference), atol=1e-5)
    _, kv, _ = full_forward(model(arch), ids)
    assert result.kv_tokens() == [BUDGET] * LAYERS and result.next_position == T
    for i in range(LAYERS):
        kept = top_slots_reference(reference[i], WINDOW, BUDGET)
        assert result.positions[i].tolist() == kept
        same_kv(result, kv, [i], kept)
    assert len({tuple(p.tolist()) for p in result.positions}) > 1  # layers choose differently


@cache
def _selecting_prompt(arch: str) -> tuple[list[int], list[list[float]], float, int]:
    """A prompt on which ASL (tau 0.95) selects a layer before the last, with its reference scores."""
    for seed in range(40):
        ids = prompt(seed)
        reference = scores_of(arch, seed)
        star = reference_star(reference, 0.95)
        if 0 <= star < LAYERS - 1:
            return ids, reference, 0.95, star
    raise AssertionError(f"no prompt makes ASL select a layer on tiny {arch}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_asl_layer_is_choose_layer_of_the_reference_scores(arch, seed):
    ids = prompt(seed)
    reference = scores_of(arch, seed)
    for tau in (0.3, 0.8, 0.95):
        assert prune_prefill(model(arch), ids, settings("asl", tau=tau), RULE).layer == reference_star(reference, tau)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("early_kv", ["snapkv", "full"])
def test_asl_continues_with_the_survivors_at_their_original_positions(arch, early_kv):
    ids, reference, tau, star = _selecting_prompt(arch)
    result = prune_prefill(model(arch), ids, settings("asl", tau=tau, early_kv=early_kv), RULE)
    assert result.layer == star
    kept = top_slots_reference(reference[star], WINDOW, BUDGET)
    assert result.kept.tolist() == kept
    _check_propagated(arch, ids, result, star, kept, reference, early_kv)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("early_kv", ["snapkv", "full"])
def test_fastkv_selects_at_its_fixed_layer(arch, early_kv):
    ids = prompt()
    reference = scores_of(arch)
    result = prune_prefill(model(arch), ids, settings("fastkv", layer=3, early_kv=early_kv), RULE)
    kept = top_slots_reference(reference[3], WINDOW, BUDGET)
    assert result.layer == 3 and result.kept.tolist() == kept
    _check_propagated(arch, ids, result, 3, kept, reference, early_kv)


def _check_propagated(arch, ids, result, star, kept, reference, early_kv):
    logits, kv, hidden = full_forward(model(arch), ids)
    for i in range(star + 1):  # layers up to the selection layer: full, or each its own top
        own = list(range(T)) if early_kv == "full" else top_slots_reference(reference[i], WINDOW, BUDGET)
        assert result.positions[i].tolist() == own
        same_kv(result, kv, [i], own)
    for i in range(star + 1, LAYERS):  # deeper layers: the survivors, original positions
        assert result.positions[i].tolist() == kept
    expected = [T if early_kv == "full" else BUDGET] * (star + 1) + [BUDGET] * (LAYERS - star - 1)
    assert result.kv_tokens() == expected and result.next_position == T
    tail_logits, tail_kv = continue_from_layer(model(arch), hidden[star + 1][:, kept], kept, star + 1)
    assert torch.allclose(result.logits, tail_logits, atol=ATOL)
    for j, (key, value) in enumerate(tail_kv):
        assert torch.allclose(result.cache.layers[star + 1 + j].keys, key, atol=ATOL)
        assert torch.allclose(result.cache.layers[star + 1 + j].values, value, atol=ATOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_gemfilter_reruns_the_model_on_the_selected_ids(arch):
    ids = prompt()
    reference = scores_of(arch)
    result = prune_prefill(model(arch), ids, settings("gemfilter", layer=2), RULE)
    kept = top_slots_reference(reference[2], WINDOW, BUDGET)
    assert result.layer == 2 and result.kept.tolist() == kept and len(result.scores) == 3
    logits, kv, _ = full_forward(model(arch), [ids[j] for j in kept])
    assert torch.allclose(result.logits, logits, atol=ATOL)
    same_kv(result, kv)
    assert result.kv_tokens() == [BUDGET] * LAYERS and result.next_position == BUDGET
    assert all(torch.equal(p, torch.arange(BUDGET)) for p in result.positions)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["asl", "fastkv"])
def test_eager_attention_gives_the_same_result(arch, method):
    """Under eager attention the walk passes its own causal mask (sdpa runs mask-free with is_causal)."""
    ids, _, tau, _ = _selecting_prompt(arch)
    eager = tiny_model(arch, 0, num_layers=LAYERS, attn_implementation="eager").model
    mine = prune_prefill(model(arch), ids, settings(method, tau=tau, layer=3), RULE)
    theirs = prune_prefill(eager, ids, settings(method, tau=tau, layer=3), RULE)
    assert theirs.layer == mine.layer >= 0 and torch.equal(theirs.kept, mine.kept)
    assert torch.allclose(theirs.logits, mine.logits, atol=ATOL)
    same_kv(theirs, [(layer.keys, layer.values) for layer in mine.cache.layers])


def _copy_cache(result: PrunedPrefill):
    from transformers import DynamicCache

    return DynamicCache([(layer.keys.clone(), layer.values.clone()) for layer in result.cache.layers])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_decoding_continues_from_the_pruned_cache(arch, method):
    """Each step equals the model's own forward on a copy of the cache at the next position (sdpa skips the mask for
    one query, so its layers may hold different counts), and positions continue after the prompt."""
    ids = prompt()
    kw = {"layer": 3} if method in ("fastkv", "gemfilter") else {"tau": 0.95}
    result = prune_prefill(model(arch), ids, settings(method, **kw), RULE)
    start = result.next_position
    tokens = [int(result.logits.argmax())]
    for step in range(4):
        theirs = _copy_cache(result)
        position = torch.tensor([[result.next_position]])
        out = model(arch)(input_ids=torch.tensor([[tokens[-1]]]), position_ids=position, cache=theirs)
        logits = decode_step(model(arch), result, tokens[-1])
        assert torch.allclose(logits, out.logits[0, -1].float(), atol=ATOL)
        same_kv(result, [(layer.keys, layer.values) for layer in theirs.layers])
        tokens.append(int(logits.argmax()))
        assert result.next_position == start + step + 1
    for p in result.positions:
        assert p[-4:].tolist() == list(range(start, start + 4)) and bool((p[:-4] < start).all())
    if method == "full":  # no pruning: exactly the plain model's greedy continuation
        seq = list(ids)
        for _ in range(5):
            seq.append(int(model(arch)(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[T:] == tokens


def test_greedy_decode_stops_and_counts():
    ids = prompt()
    result = prune_prefill(model("llama"), ids, settings("asl"), RULE)
    first = int(result.logits.argmax())
    assert greedy_decode(model("llama"), result, 5, stop_ids=[first]) == [first]
    again = prune_prefill(model("llama"), ids, settings("asl"), RULE)
    assert len(greedy_decode(model("llama"), again, 3)) == 3 and again.next_position == T + 2


def test_unsupported_architectures_raise_a_typed_error():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        prune_prefill(gpt2, [1, 2, 3], settings("asl"), RULE)
    sliding = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=4, max_window_layers=0,
    )  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="full attention"):
        prune_prefill(Qwen2ForCausalLM(sliding), [1, 2, 3], settings("asl"), RULE)


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"method": "pyramidkv"}, "method"),
        ({"budget": 0}, "budget"),
        ({"window": 0}, "window"),
        ({"pool": 4}, "pool"),
        ({"tau": 1.0}, "tau"),
        ({"layer": -1}, "layer"),
        ({"early_kv": "none"}, "early_kv"),
    ],
)
def test_bad_settings_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        PruneSettings(**kw)


def test_bad_calls_name_the_parameter():
    with pytest.raises(ValueError, match="budget"):
        prune_prefill(model("llama"), prompt(), settings("asl", budget=3), RULE)  # below the window of 4
    with pytest.raises(ValueError, match="layer"):
        prune_prefill(model("llama"), prompt(), settings("fastkv", layer=LAYERS), RULE)
    with pytest.raises(ValueError, match="ids"):
        prune_prefill(model("llama"), [], settings("asl"), RULE)
