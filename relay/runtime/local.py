"""The local runtime: a whole graph in one process on one shared model, items batched through each node."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from latent_relay.relay.graph import AgentGraph
from latent_relay.relay.results import ItemResult, ResultWriter
from latent_relay.relay.runtime.node import NodeExecutor

log = logging.getLogger("relay")


def batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class LocalRuntime:
    """Runs graphs over task items in this process (see :class:`NodeExecutor` for one node's work)."""

    def __init__(self, executor: NodeExecutor, model_name: str = ""):
        self.executor = executor
        self.model_name = model_name

    def run(
        self,
        graph: AgentGraph,
        task,
        items: Sequence,
        relay: str,
        batch_size: int = 4,
        writer: ResultWriter | None = None,
        on_result: Callable[[ItemResult], None] | None = None,
    ) -> list[ItemResult]:
        """Run ``graph`` over ``items`` in batches; each result is written (and flushed) as its batch ends."""
        results: list[ItemResult] = []
        for batch in batches(list(items), max(1, batch_size)):
            try:
                out = self.run_batch(graph, task, batch, relay)
            except Exception as err:  # one failed batch must not lose the others' results
                log.warning("batch of %d items failed: %s: %s", len(batch), type(err).__name__, err)
                out = [self._failed(graph, task, item, relay, err) for item in batch]
            if writer is not None:
                writer.write(out)
            for r in out:
                if on_result is not None:
                    on_result(r)
            results.extend(out)
        return results

    def run_batch(self, graph: AgentGraph, task, items: Sequence, relay: str) -> list[ItemResult]:
        n = len(items)
        inbox: dict[str, list[list]] = {name: [[] for _ in range(n)] for name in graph.order}
        records = [self._record(graph, task, it, relay) for it in items]
        questions = [it.question for it in items]
        final_texts: list[str] = [""] * n
        for name in graph.order:
            out = self.executor.run(graph, name, questions, inbox[name], task.answer_format)
            for key, messages in out.outgoing.items():
                target = key.split("->", 1)[1]
                for b, msg in enumerate(messages):
                    inbox[target][b].append(msg)
            for b, r in enumerate(records):
                r.node_seconds[name] = out.seconds / n  # the batch's wall time, amortised per item
                r.output_tokens += out.output_tokens[b]
                r.latent_steps += out.thoughts
                for key, sizes in out.edge_bytes.items():
                    r.edge_bytes[key] = sizes[b]
                    if out.edge_metrics[key][b]:
                        r.edge_metrics[key] = out.edge_metrics[key][b]
            if name == graph.final:
                final_texts = out.texts or final_texts
        for item, r, text in zip(items, records, final_texts):
            r.answer = text
            r.correct = bool(task.score(item, text))
            r.seconds = sum(r.node_seconds.values())
            r.relay_bytes = sum(r.edge_bytes.values())
        return records

    def _record(self, graph, task, item, relay, error: str | None = None) -> ItemResult:
        return ItemResult(
            item_id=str(item.id), task=task.name, graph=graph.name, relay=relay, model=self.model_name,
            gold=str(item.gold), error=error,
        )  # fmt: skip

    def _failed(self, graph, task, item, relay, err) -> ItemResult:
        return self._record(graph, task, item, relay, error=f"{type(err).__name__}: {err}")
