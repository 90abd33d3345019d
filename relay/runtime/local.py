"""The local runtime: a whole graph in one process on one shared model, items batched through each node."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from latent_relay.agents.latent import LatentInput
from latent_relay.agents.models import LoadedModel, resolve_model
from latent_relay.agents.runner import ModelRunner
from latent_relay.relay.decode_config import DecodeConfig
from latent_relay.relay.graph import AgentGraph, Edge
from latent_relay.relay.results import ItemResult, ResultWriter
from latent_relay.relay.runtime.node import Message, NodeExecutor, NodeOutput
from latent_relay.relay.runtime.records import RecordBuilder
from latent_relay.relay.runtime.step_memo import StepMemo

log = logging.getLogger("relay")


def batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class LocalRuntime:
    """Runs graphs over task items in this process, every node on one shared model (see :class:`NodeExecutor` for
    one node's work).

    ``model``: a model reference (loaded with :func:`latent_relay.agents.models.resolve_model` on ``device`` in
    ``weights``, a setting of :data:`latent_relay.agents.weights.SETTINGS`, or ``dtype``, its older name), a
    model :func:`~latent_relay.agents.models.resolve_model` loaded, or a ready :class:`NodeExecutor` (then
    ``latent`` and ``decode`` are its own). ``latent`` says how a hidden state becomes the next input
    (:class:`~latent_relay.agents.latent.LatentInput`), ``decode`` how nodes without their own decoding settings
    decode. ``model_name`` labels the records (default: the loaded model's name).
    """

    def __init__(
        self,
        model: str | LoadedModel | NodeExecutor,
        model_name: str = "",
        *,
        latent: LatentInput | None = None,
        decode: DecodeConfig | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        weights: str | None = None,
    ):
        if isinstance(model, NodeExecutor):
            self.executor = model
        else:
            if isinstance(model, str):
                loaded = resolve_model(model, device=device, dtype=dtype, weights=weights)
            else:
                loaded = model
            self.executor = NodeExecutor(ModelRunner.from_loaded(loaded, latent=latent), decode)
            model_name = model_name or loaded.name
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
        records = self.record_builder(graph, task, relay)
        results: list[ItemResult] = []
        for batch in batches(list(items), max(1, batch_size)):
            try:
                out = records.batch(batch, self.run_batch(graph, task, batch))
            except Exception as err:  # one failed batch must not lose the others' results
                log.warning("batch of %d items failed: %s: %s", len(batch), type(err).__name__, err)
                out = [records.failed(item, f"{type(err).__name__}: {err}") for item in batch]
            if writer is not None:
                writer.write(out)
            for r in out:
                if on_result is not None:
                    on_result(r)
            results.extend(out)
        return results

    def record_builder(self, graph: AgentGraph, task, relay: str) -> RecordBuilder:
        """The builder of this runtime's records for ``graph`` over ``task`` under ``relay``: model name and
        fingerprint, latent input and default decoding included (what ``--resume`` matches records on)."""
        runner = self.executor.runner
        return RecordBuilder(
            graph, task, relay, self.model_name, runner.fingerprint, runner.latent, self.executor.default_decode
        )

    def run_batch(
        self, graph: AgentGraph, task, items: Sequence, memo: StepMemo | None = None
    ) -> dict[str, NodeOutput]:
        """Every node's output for one batch, nodes in topological order, messages handed over in memory; ``memo``
        (a benchmark grid's) shares agent steps with other graphs run on the same batch."""
        inbox: dict[Edge, list[Message]] = {}
        outputs: dict[str, NodeOutput] = {}
        for name in graph.order:
            questions = [graph.node(name).text_of(it) for it in items]
            out = self.executor.run(graph, name, questions, inbox, task.answer_format, memo=memo)
            inbox.update(out.outgoing)
            outputs[name] = out
        return outputs
