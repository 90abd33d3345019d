"""Recipe strings: parsing, canonical round-trip, clear errors, and compress() metrics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latent_relay.compression.backfill import BackfillConfig
from latent_relay.compression.methods import Backfill, GenerationOnly, Quantize, ScoredEviction
from latent_relay.compression.recipes import (
    REGISTRY,
    RecipeError,
    available_methods,
    compress,
    parse_recipe,
)
from latent_relay.relay.memory import KVState, Segment
from tests.compression_fixtures import Layout, build_memory

OPTION_VALUES = {
    "budget": st.integers(1, 64).map(str),
    "tau": st.sampled_from(["0.05", "0.3", "0.5", "0.99"]),
    "pool": st.sampled_from(["1", "3", "7"]),
    "value": st.sampled_from(["none", "l1", "L2", "wo"]),
    "rank": st.sampled_from(["1", "2", "4", "all"]),
    "solver": st.sampled_from(["exact", "subspace", "eigh"]),
    "inject": st.sampled_from(["uniform", "attention"]),
    "scale": st.sampled_from(["ratio", "none", "share"]),
    "ablation": st.sampled_from(["none", "no-projection", "naive-aggregation", "no-scaling", "all-components"]),
}


@st.composite
def recipe_strings(draw):
    evictors = [n for n, c in REGISTRY.items() if c.kind == "evict"]
    steps = []
    name = draw(st.sampled_from([*evictors, None]))
    if name is not None:
        fields = list(REGISTRY[name].options)
        chosen = draw(st.lists(st.sampled_from(fields), unique=True)) if fields else []
        opts = [f"{k}={draw(OPTION_VALUES[k])}" for k in chosen]
        steps.append(name + (":" + ",".join(opts) if opts else ""))
    if name is None or draw(st.booleans()):
        steps.append(draw(st.sampled_from(["int8", "int4"])))
    return " + ".join(steps)


@settings(max_examples=60, deadline=None)
@given(recipe_strings())
def test_canonical_round_trips(text):
    recipe = parse_recipe(text)
    again = parse_recipe(recipe.canonical)
    assert again == recipe
    assert again.canonical == recipe.canonical == str(recipe)
    assert parse_recipe(recipe) is recipe


def test_documented_recipes_parse_to_their_configs():
    assert available_methods() == ["asl", "asl-obf", "gen", "h", "h-obf", "int4", "int8", "l", "l-obf", "zstd"]
    r = parse_recipe("h-obf:budget=32,rank=2+int8")
    assert r.canonical == "h-obf:budget=32,rank=2+int8" and r.bits == 8
    step = r.steps[0]
    assert isinstance(step, ScoredEviction) and (step.selector, step.budget) == ("head", 32)
    assert step.backfill_config() == BackfillConfig(rank=2)
    lobf = parse_recipe("l-obf:budget=16")
    assert isinstance(lobf.steps[0], ScoredEviction) and lobf.steps[0].selector == "layer"
    assert lobf.steps[0].backfill is not None and lobf.canonical == "l-obf:budget=16,rank=4"
    assert parse_recipe("h:budget=32").canonical == "h:budget=32"
    assert parse_recipe("gen").canonical == "gen" and parse_recipe("gen").bits is None
    assert parse_recipe("l:budget=8+int4").bits == 4
    cfg = parse_recipe("l-obf:budget=8,solver=exact,inject=attention,scale=share,ablation=no-projection").steps[0]
    assert cfg.backfill_config() == BackfillConfig(
        rank=4, solver="exact", inject="attention", scale="share", project=False
    )
    assert parse_recipe("h-obf:ablation=all-components").steps[0].backfill_config().rank is None
    assert parse_recipe("h-obf:ablation=naive-aggregation").steps[0].backfill_config().aggregate == "mean"
    assert parse_recipe("h-obf:ablation=no-scaling").steps[0].backfill_config().scale == "none"


def test_recipe_names_are_presets_of_parameterised_methods():
    assert ScoredEviction(selector="layer", budget=16, backfill=Backfill()).canonical == "l-obf:budget=16,rank=4"
    assert ScoredEviction(budget=8, pool=3, backfill=Backfill(rank=2)).canonical == "h-obf:budget=8,pool=3,rank=2"
    assert ScoredEviction(selector="layer").canonical == "l:budget=32"
    assert parse_recipe("h:budget=32").steps[0] == ScoredEviction(selector="head", budget=32)
    assert parse_recipe("l-obf:rank=3").steps[0] == ScoredEviction(selector="layer", backfill=Backfill(rank=3))
    assert (Quantize(bits=4).canonical, Quantize().canonical, GenerationOnly().canonical) == ("int4", "int8", "gen")
    assert {n: REGISTRY[n].kind for n in ("gen", "h", "int4")} == {"gen": "evict", "h": "evict", "int4": "quant"}
    r = parse_recipe("l:budget=4+int4")
    assert (r.eviction, r.quantization) == (r.steps[0], Quantize(bits=4)) and not r.takes_allocator
    assert parse_recipe("gen").takes_allocator and not parse_recipe("int8").takes_allocator


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty recipe"),
        ("   ", "empty recipe"),
        ("hh:budget=3", "unknown method 'hh'"),
        ("h:bugdet=3", "unknown option 'bugdet' for method 'h'"),
        ("l:rank=4", "unknown option 'rank' for method 'l'"),
        ("gen:budget=3", "unknown option 'budget' for method 'gen'"),
        ("h:budget=abc", "bad value 'abc' for option 'budget'"),
        ("h:budget=0", "bad value '0' for option 'budget'"),
        ("h:budget=-3", "bad value '-3' for option 'budget'"),
        ("h-obf:rank=0", "option 'rank'"),
        ("h-obf:solver=svd", "bad value 'svd' for option 'solver'"),
        ("h:value=l3", "bad value 'l3' for option 'value'"),
        ("h-obf:ablation=no-thinking", "bad value 'no-thinking' for option 'ablation'"),
        ("h:budget", "option 'budget' of method 'h' needs a value"),
        ("h:budget=", "option 'budget' of method 'h' needs a value"),
        ("h:", "no options after ':'"),
        ("h:budget=3,budget=4", "option 'budget' given twice"),
        ("h:budget=3,", "empty option"),
        ("h+h", "duplicated step 'h'"),
        ("int8+int8", "duplicated step 'int8'"),
        ("h+l", "two eviction methods 'h' and 'l'"),
        ("int8+int4", "quantization comes last"),
        ("int8+h", "quantization comes last"),
        ("h++int8", "empty step"),
        ("h+", "empty step"),
        (":budget=3", "missing method name"),
    ],
)
def test_malformed_recipes_give_one_line_errors(text, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_non_string_recipe_is_rejected():
    with pytest.raises(RecipeError, match="a recipe is a string"):
        parse_recipe(32)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "recipe",
    [
        "h:budget=3",
        "l:budget=3,pool=3,value=l1",
        "h-obf:budget=3",
        "l-obf:budget=3",
        "h-obf:budget=3,solver=exact",
        "gen",
    ],
)
def test_compress_reports_real_sizes_and_fractions(recipe):
    memory, obs = build_memory(Layout(prompts=(12, 7)))
    packed, metrics = compress(memory, obs, recipe)
    assert isinstance(packed, KVState)
    assert metrics["recipe"] == parse_recipe(recipe).canonical
    assert metrics["bytes_before"] == memory.nbytes and metrics["bytes_after"] == packed.nbytes
    assert metrics["bytes_after"] < metrics["bytes_before"]
    assert metrics["seconds"] >= 0
    expect = 0.0 if recipe == "gen" else 6 / 19
    assert metrics["retained_fraction"] == pytest.approx(expect)
    current = (packed.segment == Segment.PROMPT) & (packed.agent == 1)
    assert current.sum(1).tolist() == ([0, 0] if recipe == "gen" else [3, 3])
    if "obf" in recipe:
        assert 0 < metrics["obf_residual_ratio"] <= 1 + 1e-6 and metrics["obf_injected_norm"] > 0


def test_scoring_recipes_need_an_observation_but_gen_does_not():
    memory, _ = build_memory(Layout())
    with pytest.raises(RecipeError, match="observation"):
        compress(memory, None, "h:budget=2")
    packed, metrics = compress(memory, None, "gen")  # the last writer's prompt goes
    assert metrics["retained_fraction"] == 0.0 and packed.num_tokens < memory.num_tokens


def test_value_wo_uses_the_supplied_output_projection():
    lay = Layout(heads=2, head_dim=8)
    memory, obs = build_memory(lay)
    w_o = [torch.randn(16, lay.heads * 2 * 8) for _ in range(lay.layers)]
    packed, _ = compress(memory, obs, "h:budget=2,value=wo", output_proj=w_o)
    assert isinstance(packed, KVState)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_recipes_pack_last(bits):
    quant = pytest.importorskip("latent_relay.compression.quant")
    if not hasattr(quant, "quantize_memory"):
        pytest.skip("latent_relay.compression.quant.quantize_memory not available yet")
    memory, obs = build_memory(Layout(prompts=(12, 7)))
    packed, metrics = compress(memory, obs, f"h-obf:budget=3+int{bits}")
    plain, _ = compress(memory, obs, "h-obf:budget=3")
    assert metrics["bytes_after"] == packed.nbytes < plain.nbytes
    restored = quant.dequantize_memory(packed)
    assert isinstance(restored, KVState)
    assert torch.equal(restored.position, plain.position) and torch.equal(restored.segment, plain.segment)
    for a, b in zip(restored.values, plain.values):
        assert a.shape == b.shape
