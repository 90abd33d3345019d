"""compress_batch: one batched eviction per edge, the same result per item as compress on that item alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from latent_relay.compression.quant import dequantize_memory
from latent_relay.compression.recipes import REGISTRY, compress, compress_batch, parse_recipe
from latent_relay.relay.batch import split_items, split_observation
from latent_relay.relay.memory import KVState
from tests.compression_fixtures import Layout, build_memory, layouts

LAYOUTS = [
    Layout(),  # PAD at the start of item 1, between prompt and thoughts, and at the end of item 0
    Layout(batch=3, prompts=(12, 3, 0), left_pad=(2, 0, 1), history=2, text=1),
    Layout(batch=1, prompts=(9,), left_pad=(2,), seed=3),
]


def _recipes() -> list[str]:
    out = []
    for name, preset in REGISTRY.items():
        if preset.kind in ("quant", "wire"):  # int8, int4 and zstd alone (zstd leaves the memory as it is)
            out.append(name)
            continue
        step = f"{name}:budget=4,pool=3" if "budget" in preset.options else name
        out += [step, f"{step}+int8", f"{step}+int4"]
    return out


RECIPES = _recipes()


def _items(memory, observation, recipe):
    """compress on every item alone (its PAD slots removed), as a runtime that splits first does."""
    alone = [compress(m, o, recipe) for m, o in zip(split_items(memory), split_observation(observation, memory))]
    return [p for p, _ in alone], [m for _, m in alone]


def _table(memory) -> list[torch.Tensor]:
    return [memory.segment, memory.agent, memory.position]


def _assert_same_item(got, want, backfilled: bool) -> None:
    assert type(got) is type(want)
    for a, b in zip(_table(got), _table(want), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(want, KVState):
        for a, b in zip(got.keys, want.keys, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(got.values, want.values, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            if backfilled:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(a, b)
        return
    assert got.nbytes == want.nbytes
    for a, b in zip(got.keys, want.keys, strict=True):  # keys are never backfilled: the same packed bytes
        assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    for a, b in zip(got.values, want.values, strict=True):
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        if not backfilled:
            assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    if backfilled:  # values a rounding apart may land one code apart
        step = max((float(v.scale.abs().max()) for v in want.values if v.scale.numel()), default=0.0)
        for a, b in zip(dequantize_memory(got).values, dequantize_memory(want).values):
            torch.testing.assert_close(a, b, rtol=0, atol=step * 1.01 + 1e-5)


def _assert_same_metrics(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if key == "seconds":
            assert got[key] >= 0
        elif key.startswith("obf_") and isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6)
        else:
            assert got[key] == value, key


def _check(memory, observation, recipe, allocators=None):
    packed, metrics = compress_batch(memory, observation, recipe, allocators=allocators)
    want_packed, want_metrics = _items(memory, observation, recipe)
    assert len(packed) == len(metrics) == memory.batch_size
    backfilled = "obf" in recipe
    for got, want in zip(packed, want_packed, strict=True):
        _assert_same_item(got, want, backfilled)
    for got, want in zip(metrics, want_metrics, strict=True):
        _assert_same_metrics(got, want)
    return packed, metrics


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_every_item_is_compress_on_that_item_alone(recipe, layout):
    memory, observation = build_memory(LAYOUTS[layout])
    assert not bool(memory.valid.all())  # the batch really is padded
    _, metrics = _check(memory, observation, recipe)
    assert [m["bytes_before"] for m in metrics] == [m.nbytes for m in split_items(memory)]


@settings(max_examples=12, deadline=None)
@given(layouts())
def test_random_batches_compress_per_item(lay):
    memory, observation = build_memory(lay)
    for recipe in ("h:budget=3,pool=2,value=l2", "l-obf:budget=2,solver=exact+int4", "gen+int8"):
        _check(memory, observation, recipe)


class _Recorder:
    """A tensor allocator that remembers what it made."""

    def __init__(self):
        self.made: list[torch.Tensor] = []

    def __call__(self, shapes, device):
        self.made = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes]
        return self.made


@pytest.mark.parametrize("recipe", RECIPES)
def test_items_are_built_by_their_allocators_where_the_recipe_evicts_last(recipe):
    memory, observation = build_memory(LAYOUTS[1])
    allocators = [_Recorder() for _ in range(memory.batch_size)]
    packed, _ = _check(memory, observation, recipe, allocators)
    in_place = parse_recipe(recipe).takes_allocator
    assert in_place == (parse_recipe(recipe).steps[-1].kind == "evict")
    for item, made in zip(packed, allocators):
        if not in_place:
            assert made.made == []
            continue
        mine = {t.data_ptr() for t in made.made}
        assert all(t.data_ptr() in mine for t in [*_table(item), *item.keys, *item.values])


def test_allocators_must_match_the_batch():
    memory, observation = build_memory(Layout())
    with pytest.raises(ValueError, match="3 tensor allocators for a batch of 2 items"):
        compress_batch(memory, observation, "h:budget=2", allocators=[None, None, None])
