"""The ``zstd`` recipe step: parsed and written canonically, refused anywhere but last, and on a real edge the
sender's packets carry a zstd payload that decodes to the very tensors sent, with relay bytes counting the
compressed packet."""

from __future__ import annotations

import pytest
import torch

from latent_relay.compression.methods import Quantize, ScoredEviction, Zstd
from latent_relay.compression.recipes import RecipeError, compress, parse_recipe
from latent_relay.relay import wire
from latent_relay.relay.graph import Edge, sequential
from latent_relay.relay.messages import LatentMessage, TextMessage
from tests.compression_fixtures import Layout, build_memory
from tests.fuzz.packets import make_memory


@pytest.mark.parametrize(
    ("text", "canonical", "level"),
    [
        ("zstd", "zstd", 1),
        ("zstd:level=1", "zstd", 1),
        (" ZSTD:level=3 ", "zstd:level=3", 3),
        ("zstd:level=19", "zstd:level=19", 19),
        ("h-obf:budget=32+int8+zstd", "h-obf:budget=32,rank=2+int8+zstd", 1),
        ("l-obf:budget=32+int4+zstd:level=3", "l-obf:budget=32,rank=4+int4+zstd:level=3", 3),
        ("gen+zstd", "gen+zstd", 1),
        ("int8+zstd", "int8+zstd", 1),
    ],
)
def test_zstd_step_parses_to_its_canonical_form(text, canonical, level):
    recipe = parse_recipe(text)
    assert recipe.canonical == canonical and recipe.zstd_level == level
    assert parse_recipe(recipe.canonical) == recipe
    assert recipe.steps[-1] == Zstd(level=level) and Zstd(level=level).canonical == canonical.split("+")[-1]
    assert not recipe.takes_allocator  # a zstd packet holds the compressed payload, not the memory


def test_zstd_composes_with_eviction_and_quantization():
    recipe = parse_recipe("h-obf:budget=32+int8+zstd")
    assert isinstance(recipe.eviction, ScoredEviction) and recipe.quantization == Quantize(bits=8)
    assert recipe.bits == 8 and recipe.zstd_level == 1
    assert parse_recipe("h-obf:budget=32+int8").zstd_level is None
    edge = Edge(source="planner", target="critic", relay="latent+zstd:level=1")
    assert edge.relay == "latent+zstd" and edge.recipe.zstd_level == 1 and edge.recipe.eviction is None


@pytest.mark.parametrize("text", ["zstd+int8", "zstd+h:budget=4", "h:budget=4+zstd+int8", "zstd:level=3+gen"])
def test_zstd_anywhere_but_last_is_refused_in_one_line(text):
    with pytest.raises(RecipeError, match="zstd comes last") as info:
        parse_recipe(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zstd:level=0", "bad value '0' for option 'level' of method 'zstd'"),
        ("zstd:level=20", "bad value '20' for option 'level' of method 'zstd'"),
        ("zstd:level=fast", "bad value 'fast' for option 'level'"),
        ("zstd:lvl=3", "unknown option 'lvl' for method 'zstd'"),
        ("zstd+zstd:level=3", "duplicated step 'zstd'"),
    ],
)
def test_bad_zstd_steps_are_refused(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text)


def test_zstd_step_leaves_the_memory_as_it_is():
    memory, observation = build_memory(Layout())
    alone, metrics = compress(memory, observation, "zstd")
    assert metrics["bytes_after"] == metrics["bytes_before"] and metrics["recipe"] == "zstd"
    for a, b in zip((*alone.keys, *alone.values), (*memory.keys, *memory.values), strict=True):
        assert torch.equal(a, b)
    gen, _ = compress(memory, observation, "gen")
    gen_zstd, metrics = compress(memory, observation, "gen+zstd:level=3")
    assert metrics["recipe"] == "gen+zstd:level=3"
    for a, b in zip((*gen.keys, *gen.values), (*gen_zstd.keys, *gen_zstd.values), strict=True):
        assert torch.equal(a, b)


def test_encoded_size_with_zstd_is_the_compressed_packet_size():
    memory = make_memory(tokens=40, dim=16, layers=2, dtype=torch.bfloat16)
    message = LatentMessage("planner", memory, "zstd")
    for level in (1, 3):
        packet = wire.encode(message, zstd_level=level)
        assert wire.open_packet(packet).flags & wire.FLAG_ZSTD
        assert wire.encoded_size(message, zstd_level=level) == wire.packet_size(packet) == len(packet)
        assert len(packet) < wire.encoded_size(message)
    text = TextMessage("critic", ["no payload: stays raw"])
    assert wire.encoded_size(text, zstd_level=1) == wire.packet_size(wire.encode(text, zstd_level=1))
    with pytest.raises(ValueError, match="zstd level"):
        wire.encoded_size(message, zstd_level=99)


@pytest.fixture(scope="module")
def executor():
    from latent_relay.agents.decoding import DecodeConfig
    from latent_relay.agents.model_errors import ModelReferenceError
    from latent_relay.agents.models import resolve_model
    from latent_relay.agents.runner import ModelRunner
    from latent_relay.relay.runtime.node import NodeExecutor

    try:
        loaded = resolve_model("smollm2-135m")
    except ModelReferenceError as err:  # the bundled package is missing: `make test` always installs it
        pytest.skip(str(err))
    return NodeExecutor(ModelRunner.from_loaded(loaded), DecodeConfig(max_new_tokens=4))


def _parts(memory) -> list[torch.Tensor]:
    parts = [memory.segment, memory.agent, memory.position]
    for t in (*memory.keys, *memory.values):
        parts += [t.data, t.scale, t.zero] if hasattr(t, "scale") else [t]
    return parts


@pytest.mark.parametrize("relay", ["latent+h-obf:budget=16,rank=2+int8+zstd", "latent+zstd:level=3"])
def test_a_zstd_edge_sends_compressed_packets_counted_as_relay_bytes(executor, relay):
    """On a real model's memories: the exported packets carry the zstd flag and decode to the tensors sent, bit
    for bit; relay bytes are the compressed packets' sizes, smaller than the raw ones; a same-host hand-off counts
    the same compressed size without building the packet."""
    from latent_relay.tasks.registry import get_task

    questions = [it.question for it in get_task("gsm8k").load(2)]
    graph = sequential(relay, latent_steps=2)
    edge = graph.outgoing("planner")[0]
    level = edge.recipe.zstd_level
    out = executor.run(graph, "planner", questions, {}, exports={edge})
    packets, messages = out.packets[edge], out.outgoing[edge]
    assert all(wire.open_packet(p).flags & wire.FLAG_ZSTD for p in packets)
    assert all(wire.open_packet(p).header["zstd_level"] == level for p in packets)
    assert out.edge_bytes[edge] == [wire.packet_size(p) for p in packets] == [len(p) for p in packets]
    assert all(b < wire.encoded_size(m) for b, m in zip(out.edge_bytes[edge], messages, strict=True))
    assert out.edge_bytes[edge] == [wire.encoded_size(m, zstd_level=level) for m in messages]
    for packet, message in zip(packets, messages, strict=True):
        got = wire.decode(packet)
        assert got.recipe == edge.recipe.canonical == message.recipe
        for a, b in zip(_parts(got.memory), _parts(message.memory), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    local = executor.run(graph, "planner", questions, {})  # not exported: measured, not encoded
    assert not local.packets
    sent = [wire.packet_size(wire.encode(m, zstd_level=level)) for m in local.outgoing[edge]]
    assert local.edge_bytes[edge] == sent


def test_zstd_edge_packets_keep_the_decoder_limits():
    """A zstd packet whose declared raw payload is over the decoded-size limit is refused before inflating."""
    memory = make_memory(tokens=40, dim=16, layers=2, dtype=torch.bfloat16)
    packet = wire.encode(LatentMessage("planner", memory, "zstd"), zstd_level=1)
    raw_len = wire.PREFIX.unpack_from(packet)[6]
    with pytest.raises(wire.LimitExceededError):
        wire.decode(packet, limits=wire.WireLimits(max_decoded_bytes=raw_len - 1))
