"""latent-relay: LLM agents that hand each other their KV caches (latent working memory) instead of text.

The user-facing API: graphs (``AgentGraph``, ``Node``, ``Edge`` and the ``sequential`` / ``hierarchical`` /
``single`` builders), the working memory (``KVState``) and the messages that travel along edges. Runtimes live
in :mod:`relay.runtime`, the wire format in :mod:`relay.wire`, the command line in :mod:`relay.cli`.
"""

from relay.graph import AgentGraph, Edge, GraphError, Node, build_graph, hierarchical, sequential, single
from relay.memory import IncompatibleMemoryError, KVState, Segment, concat_memories
from relay.messages import LatentMessage, TextMessage
from relay.observation import Observation

__all__ = [
    "AgentGraph",
    "Edge",
    "GraphError",
    "IncompatibleMemoryError",
    "KVState",
    "LatentMessage",
    "Node",
    "Observation",
    "Segment",
    "TextMessage",
    "build_graph",
    "concat_memories",
    "hierarchical",
    "sequential",
    "single",
]
