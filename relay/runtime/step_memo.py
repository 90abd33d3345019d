"""Work shared between the graphs of a benchmark grid: one agent step, computed once per batch.

In a grid of relay methods over the same items, many graphs run the same agent on the same input: every recipe on
an edge starts from the same upstream agents' memory, and upstream agents that only think do not depend on how the
final agent decodes. A step's result is determined by its :func:`step_signature`: the node (name, role, prompt,
model), the batch's questions, what it does (latent thoughts and how a thought becomes the next input; decoding and
its settings; the answer format it stops at; whether it records an observation, which switches attention to the
eager kernel), and, recursively, what it receives (each in-edge's relay mode and its sender's signature). Equal
signatures give the same step, so :class:`StepMemo` runs it once and hands the result to every graph that asks; the
sender side (compression and wire measurement) still runs per edge.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from latent_relay.agents.latent import LatentInput
from latent_relay.relay.decode_config import DecodeConfig
from latent_relay.relay.graph import AgentGraph


def step_signature(
    graph: AgentGraph,
    name: str,
    *,
    questions: Sequence[str],
    answer_format: str,
    latent: LatentInput,
    decode: DecodeConfig,
    observe: bool,
    parents: dict[str, str],
) -> str:
    """The SHA-256 (hex) of everything that determines node ``name``'s step in ``graph``; ``parents`` maps each
    sender's name to its own signature (topological order makes them known first). ``questions`` are the batch's
    items; ``latent`` and ``decode`` the runtime's: they count only where the node thinks or decodes."""
    node = graph.node(name)
    thoughts = graph.thinks(name)
    decodes = graph.decodes(name)
    spec: dict[str, Any] = {
        "questions": list(questions),
        "node": node.model_dump(mode="json", exclude={"latent_steps", "decoding"}),
        "thoughts": thoughts,
        "latent": [latent.mode, latent.temperature, latent.ridge] if thoughts else None,
        "decode": (node.decoding or decode).model_dump(mode="json") if decodes else None,
        "final": answer_format if name == graph.final else None,
        "observe": observe,
        "inputs": [[e.relay, parents[e.source]] for e in graph.incoming(name)],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class StepMemo:
    """Agent steps of one batch of items, by signature, shared by every graph run on that batch.

    ``hits`` and ``misses`` count steps taken from the memo and steps computed; :attr:`saved_seconds` is what the
    hits would have cost."""

    def __init__(self) -> None:
        self._steps: dict[str, tuple[Any, float]] = {}
        self._signatures: dict[tuple[int, str], str] = {}
        self.hits = 0
        self.misses = 0
        self.saved_seconds = 0.0

    def signature(self, graph: AgentGraph, name: str, **settings) -> str:
        """Node ``name``'s signature in ``graph`` (its senders' must have been asked for first, as a run does)."""
        parents = {e.source: self._signatures[(id(graph), e.source)] for e in graph.incoming(name)}
        sig = step_signature(graph, name, parents=parents, **settings)
        self._signatures[(id(graph), name)] = sig
        return sig

    def get(self, signature: str) -> tuple[Any, float] | None:
        """The step's output and the seconds it took when computed, or ``None``."""
        found = self._steps.get(signature)
        if found is not None:
            self.hits += 1
            self.saved_seconds += found[1]
        return found

    def put(self, signature: str, output: Any, seconds: float) -> None:
        self.misses += 1
        self._steps[signature] = (output, seconds)
