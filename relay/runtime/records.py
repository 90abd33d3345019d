"""How a batch's result records are built from its nodes' outputs: the one builder both runtimes use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from latent_relay.relay.graph import AgentGraph
from latent_relay.relay.results import ItemResult
from latent_relay.relay.runtime.node import NodeOutput


@dataclass(frozen=True)
class RecordBuilder:
    """Builds the :class:`ItemResult` records of one run: ``graph`` over ``task`` items under relay mode ``relay``
    on model ``model``."""

    graph: AgentGraph
    task: Any
    relay: str
    model: str = ""

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
        return ItemResult(
            item_id=str(item.id), task=self.task.name, graph=self.graph.name, relay=self.relay, model=self.model,
            gold=str(item.gold), error=error,
        )  # fmt: skip
