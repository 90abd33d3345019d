"""Running one graph node for a batch of items: inbox -> prompt -> agent step -> outgoing messages.

Shared by the local and the Ray runtimes. Receiver-side, latent messages are unpacked (dequantized where a recipe
quantized them) and concatenated in topological order of their senders; text messages become labelled sections of
the prompt. Sender-side, every latent out-edge with a recipe compresses the step's whole batch at once
(:func:`latent_relay.compression.recipes.compress_batch`), and every message is measured by the bytes it occupies
on the wire; it is encoded only when it leaves the process, and then compression builds it in place, inside the
packet that will carry it.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from latent_relay.agents.prompts import agent_message, chat_ids
from latent_relay.agents.runner import AgentOutput, ModelRunner
from latent_relay.compression.quant import unpack
from latent_relay.compression.recipes import compress_batch
from latent_relay.relay import wire
from latent_relay.relay.decode_config import DecodeConfig
from latent_relay.relay.graph import AgentGraph, Edge
from latent_relay.relay.memory import concat_memories, memory_view
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.runtime.step_memo import StepMemo
from latent_relay.tasks.stops import answer_stop_for

Message = TextMessage | LatentMessage


@dataclass
class NodeOutput:
    """One node's results for a batch: per-item messages, wire sizes and compression metrics per out-edge, texts,
    tokens and costs. ``packets`` holds the encoded messages of the edges that leave the process.

    The same object crosses Ray from a host to the driver, without ``outgoing`` and ``packets`` (the messages stay
    on the host or travel as packets of their own)."""

    outgoing: dict[Edge, list[Message]] = field(default_factory=dict)
    texts: list[str] | None = None
    output_tokens: list[int] = field(default_factory=list)
    thoughts: int = 0
    seconds: float = 0.0
    edge_bytes: dict[Edge, list[int]] = field(default_factory=dict)
    edge_metrics: dict[Edge, list[dict]] = field(default_factory=dict)
    packets: dict[Edge, list[bytes | bytearray]] = field(default_factory=dict)


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
        inbox: Mapping[Edge, Sequence[Message]],
        answer_format: str = "",
        exports: Collection[Edge] = (),
        memo: StepMemo | None = None,
    ) -> NodeOutput:
        """Run node ``name`` for every item; ``inbox[edge][b]`` is item ``b``'s message along each in-edge.

        Every message is measured by its wire size; only the edges in ``exports`` (those that cross to another
        process) are encoded, their packets kept in ``NodeOutput.packets`` for sending. With a ``memo`` (a
        benchmark grid's, for one batch), a step another graph already ran on the same input is taken from it;
        ``NodeOutput.seconds`` then still counts the step's own time, as if it had run here."""
        start = time.perf_counter()
        thoughts = graph.thinks(name)
        edges = graph.outgoing(name)
        observe = thoughts > 0 and any(e.recipe is not None and e.recipe.eviction is not None for e in edges)
        decode = (graph.node(name).decoding or self.default_decode) if graph.decodes(name) else None
        signature, shared = None, None
        if memo is not None:
            settings = {"latent": self.runner.latent, "decode": self.default_decode, "observe": observe}
            signature = memo.signature(graph, name, questions=questions, answer_format=answer_format, **settings)
            shared = memo.get(signature)
        if shared is None:
            out = self._step(graph, name, questions, inbox, answer_format, thoughts, decode, observe)
            step_seconds = time.perf_counter() - start
            if memo is not None:
                memo.put(signature, out, step_seconds)
        else:
            out, step_seconds = shared
        send_start = time.perf_counter()
        result = NodeOutput(texts=out.texts, output_tokens=out.output_tokens, thoughts=thoughts)
        for e in edges:
            self._send(result, name, e, out, e in exports)
        result.seconds = step_seconds + time.perf_counter() - send_start
        return result

    def _step(self, graph, name, questions, inbox, answer_format, thoughts, decode, observe) -> AgentOutput:
        """The agent step itself: received messages and role prompt in, memory (and texts) out."""
        node = graph.node(name)
        received = self._received(graph, name, len(questions), inbox)
        memories, prompts = [], []
        for question, messages in zip(questions, received):
            latent = [unpack(m) for m in messages if isinstance(m, LatentMessage)]
            texts = [(m.sender, m.texts[0]) for m in messages if isinstance(m, TextMessage)]
            memory = concat_memories(latent) if latent else None
            if memory is not None and node.sees != "all":
                last = [m.sender for m in messages if isinstance(m, LatentMessage)][-1]
                memory = memory_view(memory, node.sees, last)
            memories.append(memory)
            message = agent_message(
                node.role_name,
                question,
                custom=node.prompt,
                parent_texts=texts,
                answer_format=answer_format if name == graph.final else None,
                has_memory=bool(latent),
            )
            prompts.append(chat_ids(self.tokenizer, message, continues=bool(latent)))
        answer_stop = answer_stop_for(answer_format) if name == graph.final else None  # the task's format
        return self.runner.step(
            memories, prompts, name, thoughts=thoughts, decode=decode, observe=observe, answer_stop=answer_stop
        )

    @staticmethod
    def _received(graph: AgentGraph, name: str, n: int, inbox: Mapping[Edge, Sequence[Message]]) -> list[list]:
        """Per item, the messages of ``name``'s in-edges, parents in topological order."""
        received: list[list] = [[] for _ in range(n)]
        for e in graph.incoming(name):
            messages = inbox.get(e)
            if messages is None or len(messages) != n:
                got = "none" if messages is None else len(messages)
                raise ValueError(f"node {name!r} needs {n} messages along edge {e.key}, got {got}")
            for b, m in enumerate(messages):
                received[b].append(m)
        return received

    def _send(self, result: NodeOutput, name: str, e: Edge, out: AgentOutput, export: bool) -> None:
        """Build edge ``e``'s per-item messages from the step's output, measure them, and encode them if exported."""
        n = out.batch_memory.batch_size
        arenas: list[wire.PacketArena | None] = [None] * n
        metrics: list[dict] = [{} for _ in range(n)]
        if not e.is_latent:
            messages = [TextMessage(name, [text]) for text in out.texts]
        elif e.recipe is None:
            messages = [LatentMessage(name, memory) for memory in out.memories]
        else:
            if export and e.recipe.takes_allocator:  # a packet to send is built in place: the memory is written into it
                arenas = [wire.PacketArena() for _ in range(n)]
            output_proj = self.runner.output_projections() if e.recipe.needs_output_proj else None
            packed, metrics = compress_batch(
                out.batch_memory,
                out.batch_observation,
                e.recipe,
                output_proj,
                allocators=[a.allocate if a is not None else None for a in arenas],
            )
            recipe = e.recipe.canonical
            messages = [LatentMessage(name, p, recipe=recipe, metrics=m) for p, m in zip(packed, metrics, strict=True)]
        result.outgoing[e], result.edge_metrics[e] = messages, list(metrics)
        level = e.recipe.zstd_level if e.recipe is not None else None  # a recipe's zstd step: compressed packets
        if export:
            packets = [wire.encode(msg, into=arena, zstd_level=level) for msg, arena in zip(messages, arenas)]
            # a packet built in place also carries header padding: relay bytes count without it, whatever the placement
            result.packets[e], result.edge_bytes[e] = packets, [wire.packet_size(p) for p in packets]
        else:
            result.edge_bytes[e] = [wire.encoded_size(msg, zstd_level=level) for msg in messages]
