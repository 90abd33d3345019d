"""Contract every registered recipe meets on real K/V from a tiny random Llama (kvpress style): a valid memory
of the right shape and budget, fewer bytes, and a forward through the model on top of it with finite logits."""

from __future__ import annotations

import pytest
import torch

from latent_relay.agents.cache import to_cache
from latent_relay.compression.quant import dequantize_memory
from latent_relay.compression.recipes import available_methods, compress, compress_batch, parse_recipe
from latent_relay.relay import wire
from latent_relay.relay.batch import split_items, split_observation
from latent_relay.relay.memory import KVState, Segment
from latent_relay.relay.messages import LatentMessage
from latent_relay.relay.observation import Observation

transformers = pytest.importorskip("transformers")

SINK, HISTORY, PROMPTS, THOUGHTS, LEFT_PAD = 4, 5, (14, 9), 4, (0, 5)
BUDGET = 4


def _method_recipes() -> list[str]:
    per_method = {
        "h": ["h:budget=4", "h:budget=4,pool=3,value=l1", "h:budget=4,value=wo"],
        "l": ["l:budget=4", "l:budget=4,value=l2"],
        "h-obf": ["h-obf:budget=4,rank=2", "h-obf:budget=4,rank=2,solver=exact,inject=attention"],
        "l-obf": ["l-obf:budget=4,rank=4", "l-obf:budget=4,ablation=no-projection,scale=share"],
        "asl": ["asl:tau=0.3,budget=4", "asl:tau=0.6,budget=4,pool=1,value=l1"],
        "asl-obf": ["asl-obf:budget=4", "asl-obf:tau=0.5,budget=4,rank=4,solver=exact"],
        "gen": ["gen"],
        "int8": ["h-obf:budget=4,rank=2+int8", "asl:budget=4+int8", "int8"],
        "int4": ["l-obf:budget=4+int4", "gen+int4"],
        "zstd": ["zstd", "h-obf:budget=4,rank=2+int8+zstd", "gen+zstd:level=3"],
    }
    assert sorted(per_method) == available_methods(), "a registered method has no contract recipe"
    return [r for name in available_methods() for r in per_method[name]]


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama, a batch whose items differ (left padding, prompt lengths), its memory and observation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    b, max_prompt = 2, max(PROMPTS)
    t = max(LEFT_PAD) + SINK + HISTORY + max_prompt + THOUGHTS
    seg = torch.zeros(b, t, dtype=torch.int8)
    owner = torch.full((b, t), -1, dtype=torch.int16)
    for i in range(b):
        j = LEFT_PAD[i]
        for s, a, n in (
            (Segment.SINK, 0, SINK),
            (Segment.PROMPT, 0, HISTORY),
            (Segment.PROMPT, 1, PROMPTS[i]),
            (Segment.PAD, -1, max_prompt - PROMPTS[i] + max(LEFT_PAD) - LEFT_PAD[i]),
            (Segment.THOUGHT, 1, THOUGHTS),
        ):
            seg[i, j : j + n], owner[i, j : j + n] = int(s), a
            j += n
    valid = seg != Segment.PAD
    position = (valid.long().cumsum(1) - 1).clamp_min(0) * valid
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=valid.long(),
            position_ids=position,
            use_cache=True,
            output_attentions=True,
        )
    cache = out.past_key_values
    memory = KVState(
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        segment=seg,
        agent=owner,
        position=position,
        agents=["planner", "critic"],
    )
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    rows = [a[:, :, -THOUGHTS:, :] for a in out.attentions]  # [B, H, m, T] per layer: the thoughts' queries
    grouped = [r.reshape(b, cfg.num_key_value_heads, g, THOUGHTS, t).mean(2) for r in rows]
    obs = Observation(torch.stack(grouped, dim=1).float(), agent="critic", group_size=g)
    w_o = [layer.self_attn.o_proj.weight.detach() for layer in model.model.layers]
    return model, memory, obs, w_o


@pytest.mark.parametrize("recipe", _method_recipes())
def test_recipe_contract(tiny, recipe):
    model, memory, obs, w_o = tiny
    before = [(k.clone(), v.clone()) for k, v in zip(memory.keys, memory.values)]
    packed, metrics = compress(memory, obs, recipe, output_proj=w_o)
    for (k, v), k2, v2 in zip(before, memory.keys, memory.values):  # pure: the input is not modified
        assert torch.equal(k, k2) and torch.equal(v, v2)
    for key in ("bytes_before", "bytes_after", "seconds", "retained_fraction", "recipe"):
        assert key in metrics
    assert metrics["bytes_after"] == packed.nbytes <= metrics["bytes_before"]
    parsed = parse_recipe(recipe)
    out = dequantize_memory(packed) if parsed.bits else packed
    assert isinstance(out, KVState)
    out.validate()
    assert (out.num_layers, out.num_kv_heads, out.head_dim, out.batch_size) == (
        memory.num_layers,
        memory.num_kv_heads,
        memory.head_dim,
        memory.batch_size,
    )
    current = ((out.segment == Segment.PROMPT) & (out.agent == 1)).sum(1).tolist()
    evictor = next((s for s in parsed.steps if s.kind == "evict"), None)
    if evictor is None:
        assert current == list(PROMPTS)
    elif evictor.name == "gen":
        assert current == [0, 0]
    else:
        assert current == [min(BUDGET, p) for p in PROMPTS]
        assert metrics["retained_fraction"] == pytest.approx(2 * BUDGET / sum(PROMPTS))
    for s in (Segment.SINK, Segment.THOUGHT):
        assert ((out.segment == s).sum(1) == (memory.segment == s).sum(1)).all()
    assert bool(((out.segment == Segment.PROMPT) & (out.agent == 0)).sum(1).eq(HISTORY).all())
    assert torch.equal(out.next_position(), memory.next_position())

    new = 3
    ids = torch.randint(0, 64, (out.batch_size, new))
    mask = torch.cat([out.valid.long(), torch.ones(out.batch_size, new, dtype=torch.long)], dim=1)
    pos = out.next_position()[:, None] + torch.arange(new)[None, :]
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=to_cache(out), attention_mask=mask, position_ids=pos).logits
    assert logits.shape == (out.batch_size, new, 64)
    assert bool(torch.isfinite(logits).all())


def _tensors(memory) -> list[torch.Tensor]:
    parts = [memory.segment, memory.agent, memory.position]
    for q in (*memory.keys, *memory.values):
        parts += [q.data, q.scale, q.zero] if hasattr(q, "scale") else [q]
    return parts


@pytest.mark.parametrize("recipe", _method_recipes())
def test_recipe_built_inside_its_packet(tiny, recipe):
    """With a PacketArena's allocator the packed memory is bit-identical, its packet (zstd where the recipe says so)
    decodes to it and has the size relay bytes count, and where the recipe ends by evicting, the memory was built
    inside the packet (no copy on encode)."""
    _, memory, obs, w_o = tiny
    plain, _ = compress(memory, obs, recipe, output_proj=w_o)
    arena = wire.PacketArena(min_bytes=0)
    packed, metrics = compress(memory, obs, recipe, output_proj=w_o, allocate=arena.allocate)
    for a, b in zip(_tensors(plain), _tensors(packed), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    message = LatentMessage("planner", packed, recipe, metrics)
    level = parse_recipe(recipe).zstd_level
    packet = wire.encode(message, into=arena, zstd_level=level)
    in_place = parse_recipe(recipe).steps[-1].kind == "evict"
    assert (packet is arena.buffer) == in_place == arena.finished
    assert wire.packet_size(packet) == wire.encoded_size(message, zstd_level=level)
    decoded = wire.decode(packet).memory
    for a, b in zip(_tensors(plain), _tensors(decoded), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recipe", _method_recipes())
def test_recipe_on_a_batch_is_the_recipe_per_item(tiny, recipe):
    """compress_batch on the padded batch gives each item what compress gives that item alone."""
    _, memory, obs, w_o = tiny
    packed, metrics = compress_batch(memory, obs, recipe, output_proj=w_o)
    quantized = parse_recipe(recipe).bits is not None
    items = zip(split_items(memory), split_observation(obs, memory), packed, metrics, strict=True)
    for item, item_obs, got, got_metrics in items:
        want, want_metrics = compress(item, item_obs, recipe, output_proj=w_o)
        assert got.nbytes == want.nbytes and list(got_metrics) == list(want_metrics)
        for key in ("bytes_before", "bytes_after", "retained_fraction", "prompt_tokens", "kept_prompt_tokens", "bits"):
            assert got_metrics.get(key) == want_metrics.get(key)
        if quantized:  # OBF values a rounding apart may land one code apart
            step = max(float(v.scale.abs().max()) for v in want.values)
            got, want = dequantize_memory(got), dequantize_memory(want)
        else:
            step = 0.0
        for a, b in zip(_tensors(got), _tensors(want), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 + 1.01 * step)


@pytest.mark.parametrize("recipe", _method_recipes())
def test_recipe_on_a_model_edge(recipe):
    """Every contract recipe on a latent edge of a graph run by the local runtime on a model: the runtime hands a
    recipe what it needs (the observation; the model's output projections for ``value=wo``), so no record fails."""
    from latent_relay.agents.decoding import DecodeConfig
    from latent_relay.agents.latent import LatentInput
    from latent_relay.agents.models import tiny_model
    from latent_relay.agents.runner import ModelRunner
    from latent_relay.relay.graph import sequential
    from latent_relay.relay.runtime.local import LocalRuntime
    from latent_relay.relay.runtime.node import NodeExecutor
    from tests.tiny_agents import ITEMS, ByteTokenizer, FakeTask

    loaded = tiny_model("qwen2", 1)
    runner = ModelRunner.from_loaded(loaded, tokenizer=ByteTokenizer(), latent=LatentInput("soft"))
    runtime = LocalRuntime(NodeExecutor(runner, DecodeConfig(max_new_tokens=4)), model_name=loaded.name)
    graph = sequential(f"latent+{recipe}", latent_steps=2)
    records = runtime.run(graph, FakeTask(), ITEMS[:2], f"latent+{recipe}", batch_size=2)
    assert [r.error for r in records] == [None, None]
    for record in records:
        metrics = list(record.edge_metrics.values())
        assert len(metrics) == 3 and all(m["recipe"] == parse_recipe(recipe).canonical for m in metrics)


def test_value_wo_names_what_a_model_lacks():
    from latent_relay.agents.models import tiny_model
    from latent_relay.agents.runner import ModelRunner

    class NoOutputProjection(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner, self.config = model, model.config

        def get_decoder(self):
            return torch.nn.Module()  # no .layers

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

    runner = ModelRunner(NoOutputProjection(tiny_model("llama").model))
    with pytest.raises(ValueError, match="value=wo needs each decoder layer's self_attn.o_proj"):
        runner.output_projections()
    assert len(ModelRunner(tiny_model("llama").model).output_projections()) == 2
