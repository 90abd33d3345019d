"""latent-relay: LLM agents that hand each other their KV caches (latent working memory) instead of text.

The public API, all a user (and every example) needs::

    from latent_relay import AgentGraph, Edge, Node, LocalRuntime, RayRuntime, load_model, compress

- graphs: ``AgentGraph``, ``Node``, ``Edge`` (relay ``text``, ``latent`` or ``latent+<recipe>``), the
  ``sequential`` / ``hierarchical`` / ``single`` builders and ``build_graph``; ``DecodeConfig`` for a node's decoding;
- models: ``load_model(ref)`` (a bundled name, a Hugging Face folder or a ``.gguf`` file);
- runtimes: ``LocalRuntime(model)`` (one process) and ``RayRuntime(ref)`` (Ray actors), both ``run(graph, task,
  items, relay)`` -> per-item ``ItemResult`` records; ``summarize`` / ``read_results`` for their table;
- tasks: ``get_task("gsm8k" | "humaneval" | "medqa")``;
- the working memory (``KVState``, ``Observation``, messages) and ``compress(memory, observation, recipe)``.

Everything lives under this one namespace; its subpackages are the repository's top-level folders:
:mod:`latent_relay.relay` (memory, graph, wire format; runtimes in :mod:`latent_relay.relay.runtime`, the command
line in :mod:`latent_relay.relay.cli`), :mod:`latent_relay.agents` (everything that touches a model),
:mod:`latent_relay.compression` (scores, selectors, Orthogonal Backfill, quantization, recipes),
:mod:`latent_relay.kernels` (Triton and compiled CPU kernels with torch twins), :mod:`latent_relay.tasks` (task
loaders and scorers) and :mod:`latent_relay.benchmarks`.
"""

from pathlib import Path as _Path

#: The repository's top-level folders that are subpackages of this namespace.
SUBPACKAGES = ("relay", "agents", "compression", "kernels", "tasks", "benchmarks")


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

# Importing the compression layer registers its recipe parser with the graph, so that every graph made through this
# package parses its edge recipes into typed recipes.
from latent_relay.agents.models import resolve_model as load_model
from latent_relay.compression.recipes import RecipeError, compress, compress_batch, parse_recipe
from latent_relay.relay.decode_config import DecodeConfig
from latent_relay.relay.graph import AgentGraph, Edge, GraphError, Node, build_graph, hierarchical, sequential, single
from latent_relay.relay.memory import IncompatibleMemoryError, KVState, Segment, concat_memories
from latent_relay.relay.messages import LatentMessage, TextMessage
from latent_relay.relay.observation import Observation
from latent_relay.relay.results import ItemResult, read_results, summarize
from latent_relay.relay.runtime.local import LocalRuntime
from latent_relay.relay.runtime.ray_runtime import RayRuntime
from latent_relay.tasks.registry import get_task

__all__ = [
    "AgentGraph",
    "DecodeConfig",
    "Edge",
    "GraphError",
    "IncompatibleMemoryError",
    "ItemResult",
    "KVState",
    "LatentMessage",
    "LocalRuntime",
    "Node",
    "Observation",
    "RayRuntime",
    "RecipeError",
    "Segment",
    "TextMessage",
    "build_graph",
    "compress",
    "compress_batch",
    "concat_memories",
    "get_task",
    "hierarchical",
    "load_model",
    "parse_recipe",
    "read_results",
    "sequential",
    "single",
    "summarize",
]
