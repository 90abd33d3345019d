"""Running one graph node for a batch of items: inbox -> prompt -> agent step -> outgoing messages.

Shared by the local and the Ray runtimes. Sender-side, every latent out-edge applies its compression recipe and
every message is measured by the bytes it occupies on the wire (it is encoded only when it leaves the process);
receiver-side, latent messages are unpacked and concatenated in topological order of their senders, text messages
become labelled sections of the prompt.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from latent_relay.agents.decoding import DecodeConfig
from latent_relay.agents.prompts import agent_message, chat_ids
from latent_relay.agents.runner import ModelRunner
from latent_relay.relay.graph import AgentGraph
from latent_relay.relay.memory import concat_memories
from latent_relay.relay.messages import LatentMessage, TextMessage

Message = TextMessage | LatentMessage


def edge_key(source: str, target: str) -> str:
    return f"{source}->{target}"


@dataclass
class NodeOutput:
    """One node's results for a batch: per-item messages per out-edge, texts, tokens, and costs."""

    outgoing: dict[str, list[Message]] = field(default_factory=dict)
    texts: list[str] | None = None
    output_tokens: list[int] = field(default_factory=list)
    thoughts: int = 0
    seconds: float = 0.0
    edge_bytes: dict[str, list[int]] = field(default_factory=dict)
    edge_metrics: dict[str, list[dict]] = field(default_factory=dict)
    packets: dict[str, list[bytes | bytearray]] = field(default_factory=dict)  # packets of the edges asked for


class NodeExecutor:
    """Runs nodes of a graph on one model; ``default_decode`` applies to nodes without their own decoding."""

    def __init__(self, runner: ModelRunner, default_decode: DecodeConfig | None = None):
        self.runner = runner
        self.tokenizer = runner.tokenizer
        self.default_decode = default_decode or DecodeConfig()

    def run(
        self,
        graph: AgentGraph,
        name: str,
        questions: Sequence[str],
        inboxes: Sequence[Sequence[Message]],
        answer_format: str = "",
        keep_packets: Collection[str] = (),
    ) -> NodeOutput:
        """Run node ``name`` for every item; ``inboxes[b]`` holds item ``b``'s messages in parent order.

        Every message is measured by its wire size; only the edges named in ``keep_packets`` (those that cross to
        another process) are encoded, their packets kept in ``NodeOutput.packets`` for sending."""
        from latent_relay.relay.wire import PacketArena, encode, encoded_size

        start = time.perf_counter()
        node = graph.node(name)
        memories, prompts = [], []
        for question, inbox in zip(questions, inboxes):
            latent = [m.unpacked() for m in inbox if isinstance(m, LatentMessage)]
            texts = [(m.sender, m.texts[0]) for m in inbox if isinstance(m, TextMessage)]
            memories.append(concat_memories(latent) if latent else None)
            message = agent_message(
                node.role_name,
                question,
                custom=node.prompt,
                parent_texts=texts,
                answer_format=answer_format if name == graph.final else None,
                has_memory=bool(latent),
            )
            prompts.append(chat_ids(self.tokenizer, message, continues=bool(latent)))
        thoughts = graph.thinks(name)
        edges = graph.outgoing(name)
        observe = thoughts > 0 and any(e.recipe for e in edges)
        decode = (node.decoding or self.default_decode) if graph.decodes(name) else None
        out = self.runner.step(memories, prompts, name, thoughts=thoughts, decode=decode, observe=observe)

        result = NodeOutput(texts=out.texts, output_tokens=out.output_tokens, thoughts=thoughts)
        for e in edges:
            key = edge_key(e.source, e.target)
            messages, sizes, metrics, packets = [], [], [], []
            output_proj = self._output_proj(e.recipe) if e.is_latent else None
            for b, memory in enumerate(out.memories):
                # a packet that will be sent is built in place: compression writes the memory into it
                arena = PacketArena() if e.is_latent and e.recipe and key in keep_packets else None
                if e.is_latent:
                    msg, info = self._latent_message(name, memory, out.observations, b, e.recipe, output_proj, arena)
                else:
                    msg, info = TextMessage(name, [out.texts[b]]), {}
                messages.append(msg)
                metrics.append(info)
                if key in keep_packets:
                    packets.append(encode(msg, into=arena))
                # a packet built in place also carries header padding; counting without it keeps relay bytes the
                # same whatever the placement
                sizes.append(encoded_size(msg))
            result.outgoing[key], result.edge_bytes[key], result.edge_metrics[key] = messages, sizes, metrics
            if key in keep_packets:
                result.packets[key] = packets
        result.seconds = time.perf_counter() - start
        return result

    def _output_proj(self, recipe: str | None):
        """The model's attention output projections where the edge's recipe scores with them (``value=wo``)."""
        from latent_relay.compression.recipes import parse_recipe

        return self.runner.output_projections() if recipe and parse_recipe(recipe).needs_output_proj else None

    @staticmethod
    def _latent_message(sender, memory, observations, b, recipe, output_proj=None, arena=None):
        if not recipe:
            return LatentMessage(sender, memory), {}
        from latent_relay.compression.recipes import compress

        observation = observations[b] if observations is not None else None
        allocate = arena.allocate if arena else None
        packed, metrics = compress(memory, observation, recipe, output_proj=output_proj, allocate=allocate)
        return LatentMessage(sender, packed, recipe=recipe, metrics=metrics), metrics
