"""How a batch's result records are built from its nodes' outputs: the one builder both runtimes use."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from latent_relay.agents.latent import LatentInput
from latent_relay.relay.decode_config import DecodeConfig
from latent_relay.relay.graph import AgentGraph
from latent_relay.relay.results import ItemResult
from latent_relay.relay.runtime.node import NodeOutput

#: Node fields added after records were first published, with their defaults: left out of the digest at the default.
LATER_NODE_FIELDS = {"reads": "question", "sees": "all"}


def graph_digest(graph: AgentGraph) -> str:
    """SHA-256 (16 hex digits) of everything a graph declares: nodes (roles, prompts, models, latent steps,
    decoding, what they read where it is not the whole question), edges with their canonical relay modes, and the
    graph's latent steps. A field added later is left out at its default, so that records keep their digest."""
    dump = graph.model_dump(mode="json")
    for node in dump["nodes"]:
        for name, default in LATER_NODE_FIELDS.items():
            if node.get(name) == default:
                del node[name]
    spec = json.dumps(dump, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def run_settings(graph: AgentGraph, latent: LatentInput | None, decode: DecodeConfig | None) -> dict[str, Any]:
    """A run's settings as a record carries them: the graph's latent steps, how a thought's hidden state becomes
    the next input, the decoding of nodes without their own (``None`` stands for the defaults), and what the final
    agent sees of its memory where that is not all of it."""
    latent = latent or LatentInput()
    settings = {
        "latent_steps": graph.latent_steps,
        "latent_input": {"mode": latent.mode, "temperature": latent.temperature, "ridge": latent.ridge},
        "decoding": (decode or DecodeConfig()).model_dump(mode="json"),
    }
    final_view = graph.node(graph.final).sees
    if final_view != "all":  # only where set, so that earlier records keep their settings
        settings["final_view"] = final_view
    return settings


@dataclass(frozen=True)
class RecordBuilder:
    """Builds the :class:`ItemResult` records of one run: ``graph`` over ``task`` items under relay mode ``relay``
    on model ``model`` (whose fingerprint is ``fingerprint``), thoughts fed back by ``latent``, nodes without
    their own decoding decoding by ``decode``. Every record carries all of it (see
    :func:`latent_relay.relay.item_result.run_key`)."""

    graph: AgentGraph
    task: Any
    relay: str
    model: str = ""
    fingerprint: str = ""
    latent: LatentInput | None = None
    decode: DecodeConfig | None = None

    @cached_property
    def _run_fields(self) -> dict[str, Any]:
        return {
            "task": self.task.name,
            "graph": self.graph.name,
            "relay": self.relay,
            "model": self.model,
            "model_fingerprint": self.fingerprint,
            "graph_digest": graph_digest(self.graph),
            "settings": run_settings(self.graph, self.latent, self.decode),
        }

    def template(self) -> ItemResult:
        """A record of this run with no item (its :func:`~latent_relay.relay.item_result.run_key` is the run's)."""
        return ItemResult(item_id="", **self._run_fields)

    def failed(self, item, message: str) -> ItemResult:
        """The record of an item whose batch failed: ``error`` says why."""
        return self._record(item, error=message)

    def batch(self, items: Sequence, outputs: Mapping[str, NodeOutput]) -> list[ItemResult]:
        """The records of a batch that ran through every node; ``outputs[name]`` is node ``name``'s output."""
        n = len(items)
        records = [self._record(it) for it in items]
        final_texts: list[str] = [""] * n
        for name in self.graph.order:
            out = outputs[name]
            for b, r in enumerate(records):
                r.node_seconds[name] = out.seconds / n  # the batch's wall time, amortised per item
                r.output_tokens += out.output_tokens[b]
                r.latent_steps += out.thoughts
                for edge, sizes in out.edge_bytes.items():
                    r.edge_bytes[edge.key] = sizes[b]
                    if out.edge_metrics[edge][b]:
                        r.edge_metrics[edge.key] = out.edge_metrics[edge][b]
            if name == self.graph.final:
                final_texts = out.texts or final_texts
        for item, r, text in zip(items, records, final_texts):
            r.answer = text
            r.correct = bool(self.task.score(item, text))
            r.seconds = sum(r.node_seconds.values())
            r.relay_bytes = sum(r.edge_bytes.values())
        return records

    def _record(self, item, error: str | None = None) -> ItemResult:
        return ItemResult(item_id=str(item.id), gold=str(item.gold), error=error, **self._run_fields)
