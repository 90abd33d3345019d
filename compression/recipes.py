"""Compression recipes: short strings naming what happens to a memory on a relay edge, and running them.

A recipe (``h:budget=32``, ``l-obf:budget=32,rank=4``, ``h-obf:budget=32,rank=2+int8``, ``gen``; grammar in
:mod:`latent_relay.compression.grammar`) is at most one eviction step (:mod:`latent_relay.compression.methods`:
scored eviction with a selector and optional Orthogonal Backfill, arXiv 2604.13349, or generation-only), then at
most one quantization step (KIVI, arXiv 2402.02750), then at most one ``zstd`` step, which leaves the memory as it
is and makes the sender encode the edge's packets with a zstd payload (``Recipe.zstd_level``). The names are
presets (:mod:`latent_relay.compression.presets`).

:func:`compress` applies a recipe to a memory; :func:`compress_batch` to a padded batch, scoring, selecting and
backfilling once for the whole batch and returning one packed memory per item. Importing this module makes
:func:`parse_recipe` the parser of the edge recipes of :mod:`latent_relay.relay.graph`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from latent_relay.compression.backfill import ABLATIONS
from latent_relay.compression.grammar import Recipe, parse_recipe
from latent_relay.compression.methods import Method, Metrics, RecipeError
from latent_relay.compression.presets import REGISTRY, available_methods
from latent_relay.relay import graph
from latent_relay.relay.memory import KVState, TensorAllocator
from latent_relay.relay.observation import Observation


def compress(
    memory: KVState,
    observation: Observation | None,
    recipe: str | Recipe,
    output_proj: Sequence[torch.Tensor] | None = None,
    *,
    allocate: TensorAllocator | None = None,
) -> tuple[Any, Metrics]:
    """Apply a recipe to a memory (sender side of a relay edge).

    ``allocate`` (optional) makes the tensors of the packed memory where the recipe's last step builds it by
    eviction (``Recipe.takes_allocator``): a sender passes :meth:`latent_relay.relay.wire.PacketArena.allocate` so
    that the memory is built inside the packet that will carry it and encoding does not copy it. A recipe that
    quantizes last does not use it: its packed codes are new tensors, which encoding copies into the packet. The
    result is the same with or without it.

    Returns the packed memory (a :class:`KVState`, or the quantized memory when the recipe quantizes) and per-hop
    metrics: ``bytes_before``, ``bytes_after`` (real packed size), ``seconds``, ``retained_fraction`` (kept prompt
    tokens / prompt tokens), and for OBF ``obf_residual_ratio`` (||R||/||Y||) and ``obf_injected_norm``.
    """
    parsed = parse_recipe(recipe)
    _sync(memory)
    start = time.perf_counter()
    metrics: Metrics = {"recipe": parsed.canonical, "bytes_before": memory.nbytes, "retained_fraction": 1.0}
    packed: Any = memory
    if parsed.eviction is not None:
        evicted = parsed.eviction.evict(memory, observation, output_proj, allocate if parsed.takes_allocator else None)
        packed = evicted.memory
        metrics.update(evicted.metrics())
    if parsed.quantization is not None:
        packed, quant_metrics = parsed.quantization.quantize(packed)
        metrics.update(quant_metrics)
    _sync(memory)
    metrics["seconds"] = time.perf_counter() - start
    return packed, _sized(metrics, packed)


def compress_batch(
    memory: KVState,
    observation: Observation | None,
    recipe: str | Recipe,
    output_proj: Sequence[torch.Tensor] | None = None,
    *,
    allocators: Sequence[TensorAllocator | None] | None = None,
) -> tuple[list[Any], list[Metrics]]:
    """Apply a recipe to every item of a padded batch (PAD slots anywhere, as an agent step leaves it).

    Scores, selection and backfill run once on the batch; the evicted memory is then split per item, each item's
    PAD slots removed (into ``allocators[b]``, where the recipe's last step evicts: see :func:`compress`), and a
    quantization step runs per item. Item ``b``'s packed memory and metrics are those of :func:`compress` on item
    ``b`` alone (its memory without padding): ``bytes_before`` / ``bytes_after`` / ``compression_ratio``,
    ``retained_fraction``, ``prompt_tokens``, ``kept_prompt_tokens``, ``bits`` and the OBF diagnostics of that
    item (OBF's up to float rounding: the batch solves its problems together), and ``seconds``, the batch's time
    divided evenly among its items. (Without an observation, ``gen`` evicts the prompt of the agent that wrote
    item 0's last slot, in every item.)
    """
    from latent_relay.relay.batch import split_items  # a core module written alongside

    parsed = parse_recipe(recipe)
    n = memory.batch_size
    if allocators is not None and len(allocators) != n:
        raise ValueError(f"{len(allocators)} tensor allocators for a batch of {n} items")
    _sync(memory)
    start = time.perf_counter()
    item_bytes = _item_nbytes(memory)
    evicted = None
    if parsed.eviction is not None:
        evicted = parsed.eviction.evict(memory, observation, output_proj)
    packed: list[Any] = split_items(
        evicted.memory if evicted is not None else memory, allocators if parsed.takes_allocator else None
    )
    metrics: list[Metrics] = []
    for b in range(n):
        item: Metrics = {"recipe": parsed.canonical, "bytes_before": item_bytes[b], "retained_fraction": 1.0}
        if evicted is not None:
            item.update(evicted.metrics(b))
        if parsed.quantization is not None:
            packed[b], quant_metrics = parsed.quantization.quantize(packed[b])
            item.update(quant_metrics)
        metrics.append(item)
    _sync(memory)
    seconds = (time.perf_counter() - start) / max(n, 1)
    for item, m in zip(packed, metrics):
        m["seconds"] = seconds
        _sized(m, item)
    return packed, metrics


def _sized(metrics: Metrics, packed: Any) -> Metrics:
    metrics["bytes_after"] = int(packed.nbytes)
    metrics["compression_ratio"] = metrics["bytes_before"] / max(metrics["bytes_after"], 1)
    return metrics


def _item_nbytes(memory: KVState) -> list[int]:
    """``KVState.nbytes`` of every item without its padding."""
    per_token = sum(
        k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size()
        for k, v in zip(memory.keys, memory.values)
    )
    return [int(n) * per_token for n in memory.valid_tokens().tolist()]


def _sync(memory: KVState) -> None:
    if memory.device.type == "cuda":
        torch.cuda.synchronize(memory.device)


graph.register_recipe_parser(parse_recipe)

__all__ = [
    "ABLATIONS",
    "REGISTRY",
    "Method",
    "Recipe",
    "RecipeError",
    "available_methods",
    "compress",
    "compress_batch",
    "parse_recipe",
]
