"""latent-relay: LLM agents that hand each other their KV caches (latent working memory) instead of text.

The user-facing API: graphs (``AgentGraph``, ``Node``, ``Edge`` and the ``sequential`` / ``hierarchical`` /
``single`` builders), the working memory (``KVState``) and the messages that travel along edges.

Everything lives under this one namespace; its subpackages are the repository's top-level folders:
:mod:`latent_relay.relay` (memory, graph, wire format; runtimes in :mod:`latent_relay.relay.runtime`, the command
line in :mod:`latent_relay.relay.cli`), :mod:`latent_relay.agents` (everything that touches a model),
:mod:`latent_relay.compression` (scores, selectors, Orthogonal Backfill, quantization, recipes),
:mod:`latent_relay.kernels` (Triton and compiled CPU kernels with torch twins) and :mod:`latent_relay.benchmarks`.
"""

from pathlib import Path as _Path

#: The repository's top-level folders that are subpackages of this namespace.
SUBPACKAGES = ("relay", "agents", "compression", "kernels", "benchmarks")


def _add_checkout_folders() -> None:
    """In a source checkout the subpackages are folders beside this one (a wheel places them inside it): add the
    checkout's root to this package's search path so that ``latent_relay.relay`` is the ``relay/`` folder. Those
    folders have no ``__init__.py``, so a Python started in the checkout never takes them for installed packages of
    the same name (``kernels`` is Hugging Face's): a regular package anywhere on ``sys.path`` wins."""
    here = _Path(__file__).resolve().parent
    checkout = here.parent
    in_wheel = any((here / name).is_dir() for name in SUBPACKAGES)
    if not in_wheel and all((checkout / name).is_dir() for name in SUBPACKAGES) and str(checkout) not in __path__:
        __path__.append(str(checkout))


_add_checkout_folders()

from latent_relay.relay.graph import AgentGraph, Edge, GraphError, Node, build_graph, hierarchical, sequential, single
from latent_relay.relay.memory import IncompatibleMemoryError, KVState, Segment, concat_memories
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.observation import Observation

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
