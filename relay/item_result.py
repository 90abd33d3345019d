"""One task item's result record, and the key that says which run it belongs to.

A record carries everything that defines its run, so that ``relay run --resume`` and ``relay report`` never take a
record of one run for another: the task, the graph (its name and a digest of its nodes, edges, latent steps and
per-node decoding), the relay mode, the model (its fingerprint: weights, dtype and tokenizer; its name where a
record has no fingerprint) and the runtime's settings (latent steps, how a thought becomes the next input, the
default decoding). :func:`run_key` is that identity, :func:`record_key` adds the item.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field


class ItemResult(BaseModel):
    """What one task item produced under one graph and relay mode."""

    item_id: str
    task: str
    graph: str
    relay: str
    model: str = ""
    answer: str = ""
    gold: str = ""
    correct: bool = False
    output_tokens: int = 0
    latent_steps: int = 0
    seconds: float = 0.0
    node_seconds: dict[str, float] = Field(default_factory=dict)
    edge_bytes: dict[str, int] = Field(default_factory=dict)
    edge_metrics: dict[str, dict] = Field(default_factory=dict)
    relay_bytes: int = 0
    error: str | None = None
    #: The fingerprint of the model that gave the answer (its weights, dtype and tokenizer); "" where unknown.
    model_fingerprint: str = ""
    #: SHA-256 (16 hex digits) of the whole graph: nodes, prompts, models, edges and relays, latent steps, decoding.
    graph_digest: str = ""
    #: The runtime's settings: ``latent_steps`` (the graph's), ``latent_input`` and the default ``decoding``.
    settings: dict[str, Any] = Field(default_factory=dict)


RunKey = tuple[str, ...]


def run_key(record: ItemResult) -> RunKey:
    """Which run ``record`` belongs to: task, graph, graph digest, relay mode, model (the fingerprint, else the
    name) and settings. Two records of one item are records of the same run exactly when their keys are equal."""
    model = f"fingerprint {record.model_fingerprint}" if record.model_fingerprint else f"model {record.model}"
    settings = json.dumps(record.settings, sort_keys=True, separators=(",", ":"))
    return (record.task, record.graph, record.graph_digest, record.relay, model, settings)


def record_key(record: ItemResult) -> tuple[RunKey, str]:
    """``(run_key(record), item id)``: one item of one run."""
    return run_key(record), record.item_id


def latest_records(records: Iterable[ItemResult]) -> list[ItemResult]:
    """One record per item of each run, the latest (last) one: an error record retried later counts once, as its
    retry. In the order in which the items first appear."""
    latest: dict[tuple[RunKey, str], ItemResult] = {}
    for r in records:
        latest[record_key(r)] = r  # a dict keeps the first insertion's place and the last value
    return list(latest.values())


def done_items(records: Iterable[ItemResult], key: RunKey, *, retry_errors: bool = True) -> set[str]:
    """Ids of the items that run ``key`` has finished in ``records``: those whose latest record under ``key`` has
    no error (any latest record when ``retry_errors`` is false)."""
    return {
        r.item_id
        for r in latest_records(r for r in records if run_key(r) == key)
        if r.error is None or not retry_errors
    }
