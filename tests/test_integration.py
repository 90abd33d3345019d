"""The 4-agent sequential graph, text and latent relay, on a real bundled model and two GSM8K items."""

import pytest

from latent_relay.agents.decoding import DecodeConfig
from latent_relay.agents.runner import ModelRunner
from latent_relay.relay.graph import sequential
from latent_relay.relay.runtime.local import LocalRuntime
from latent_relay.relay.runtime.node import NodeExecutor
from latent_relay.tasks.registry import get_task


@pytest.fixture(scope="module")
def runtime():
    from latent_relay.agents.model_errors import ModelReferenceError
    from latent_relay.agents.models import resolve_model

    try:
        loaded = resolve_model("smollm2-135m")
    except ModelReferenceError as err:  # the bundled package is missing: `make test` always installs it
        pytest.skip(str(err))
    runner = ModelRunner.from_loaded(loaded)
    return LocalRuntime(NodeExecutor(runner, DecodeConfig(max_new_tokens=24)), model_name=loaded.name)


@pytest.mark.parametrize(
    "relay", ["text", "latent", "latent+h-obf:budget=16,rank=2+int8", "latent+h:budget=16,value=wo"]
)
def test_sequential_graph_end_to_end(runtime, relay):
    task = get_task("gsm8k")
    items = task.load(2)
    graph = sequential(relay, latent_steps=3)
    results = runtime.run(graph, task, items, relay, batch_size=2)
    assert [r.item_id for r in results] == [it.id for it in items]
    for r in results:
        assert r.error is None
        assert r.answer.strip() and 0 < r.output_tokens
        assert set(r.node_seconds) == {"planner", "critic", "refiner", "judger"}
        assert set(r.edge_bytes) == {"planner->critic", "critic->refiner", "refiner->judger"}
        assert all(b > 0 for b in r.edge_bytes.values())
        assert r.correct == task.score(items[results.index(r)], r.answer)
        if relay == "text":
            assert r.latent_steps == 0 and r.relay_bytes < 20_000
        else:
            assert r.latent_steps == 9
            assert r.relay_bytes > 100_000  # a KV cache, not a few hundred bytes of text


def test_compressed_relay_is_smaller_than_full(runtime):
    task = get_task("gsm8k")
    items = task.load(1)
    full = runtime.run(sequential("latent", 3), task, items, "latent")[0]
    small = runtime.run(sequential("latent+h:budget=8+int4", 3), task, items, "latent+h:budget=8+int4")[0]
    assert small.relay_bytes * 4 < full.relay_bytes
    assert small.edge_metrics["planner->critic"]["bytes_after"] < small.edge_metrics["planner->critic"]["bytes_before"]


def test_a_sender_builds_compressed_packets_in_place(runtime, monkeypatch):
    """Packets for another host are built in place when the recipe ends by evicting: compression writes the memory
    into the packet (a PacketArena; its size floor lowered for this small model) and the packet decodes to the
    message that the step sent."""
    import functools

    import torch

    from latent_relay.compression.quant import unpack
    from latent_relay.relay import wire

    monkeypatch.setattr(wire, "PacketArena", functools.partial(wire.PacketArena, min_bytes=0))
    task = get_task("gsm8k")
    questions = [it.question for it in task.load(2)]
    for relay, in_place in (("latent+h-obf:budget=16,rank=2", True), ("latent+h:budget=16+int8", False)):
        graph = sequential(relay, latent_steps=2)
        edge = graph.outgoing("planner")[0]
        assert edge.key == "planner->critic"
        out = runtime.executor.run(graph, "planner", questions, {}, exports={edge})
        packets, messages = out.packets[edge], out.outgoing[edge]
        assert [isinstance(p, bytearray) for p in packets] == [in_place] * 2
        pads = [wire.PREFIX.unpack_from(p)[4] for p in packets]  # header padding: only in packets built in place
        assert out.edge_bytes[edge] == [len(p) - pad for p, pad in zip(packets, pads)]
        assert [pad > 0 for pad in pads] == [in_place] * 2
        for packet, message in zip(packets, messages, strict=True):
            got, sent = unpack(wire.decode(packet)), unpack(message)
            for a, b in zip((*got.keys, *got.values), (*sent.keys, *sent.values), strict=True):
                assert torch.equal(a, b)
