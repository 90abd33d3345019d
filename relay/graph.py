"""Agent graphs: who talks to whom, and whether by text or by latent working memory.

An :class:`AgentGraph` is a DAG of agent nodes with one final node (the judger / summarizer, whose decoded text
is the answer). Each edge carries a relay mode: ``text`` (TextMAS: the sender decodes text that the receiver
reads in its prompt, labelled by role) or ``latent`` / ``latent+<recipe>`` (LatentMAS, arXiv 2511.20639: the
sender hands over its KV cache, optionally compressed by a recipe at the boundary).

A node thinks ``latent_steps`` latent thoughts when it has a latent out-edge, and decodes text when it is the
final node or has a text out-edge. A node with several parents gets their memories concatenated in topological
order and their texts as labelled sections of its prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from latent_relay.relay.decode_config import DecodeConfig

#: Parses the recipe of a ``latent+<recipe>`` relay mode into a typed object with a ``canonical`` string, raising
#: ``ValueError`` if it is malformed. The graph holds that object; the parser is the compression layer's
#: (:func:`latent_relay.compression.recipes.parse_recipe`), which registers itself here when it is imported (the
#: package's ``__init__`` imports it), so that this ground-floor module needs nothing from the floors above.
RecipeParser = Callable[[str], Any]
_recipe_parser: list[RecipeParser] = []


def register_recipe_parser(parse: RecipeParser) -> None:
    """Make ``parse`` the parser of edge recipes (the compression layer calls this once, at import)."""
    _recipe_parser[:] = [parse]


def _parse_recipe(text: str) -> Any:
    if not _recipe_parser:
        raise ValueError("no recipe parser is registered (import latent_relay, which registers compression's)")
    return _recipe_parser[0](text)


class GraphError(ValueError):
    """The agent graph is malformed (cycle, unknown node, no single final node, bad relay mode...)."""


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg", err)).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


class _Strict(BaseModel):
    """Models whose construction errors are one-line :class:`GraphError`s instead of pydantic reports."""

    model_config = ConfigDict(extra="forbid")

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise GraphError(_one_line(err)) from None


class Node(_Strict):
    """One agent: a role (picks the default role prompt), an optional custom prompt, thoughts and decoding.

    ``reads``: what of a task item the agent is given. ``question`` (the default) is the whole item; ``query`` is
    only its query, without the document a long-context item carries (``item.raw["query"]``; an item without one
    gives its question), so that one agent can read a long document and relay its memory to agents that never
    prefill the document themselves. ``sees``: what of the received working memory the agent attends to
    (:data:`latent_relay.relay.memory.MEMORY_VIEWS`): ``all``, ``thoughts`` (the sink and the latent thoughts:
    LatentMAS's ``latent_only``) or ``last`` (the sink and the last sender's tokens: ``sequential_info_only``)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    role: str | None = None
    prompt: str | None = None
    latent_steps: int | None = Field(None, ge=0, le=4096)
    decoding: DecodeConfig | None = None
    model: str | None = None
    reads: Literal["question", "query"] = "question"
    sees: Literal["all", "thoughts", "last"] = "all"

    @property
    def role_name(self) -> str:
        return self.role or self.name

    def text_of(self, item: Any) -> str:
        """The part of task ``item`` this agent reads (see ``reads``)."""
        if self.reads == "query":
            query = (getattr(item, "raw", None) or {}).get("query")
            if query:
                return query
        return item.question


class Edge(_Strict):
    """A hand-over from ``source`` to ``target`` with relay mode ``text``, ``latent`` or ``latent+<recipe>``.

    Frozen and hashable, so that runtimes key inboxes by the edge itself. The recipe is parsed once, when the edge
    is made: :attr:`recipe` is the typed recipe (``None`` for text and full latent relay) and :attr:`relay` the
    canonical mode string."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    target: str
    relay: str = "latent"
    _recipe: Any = PrivateAttr(default=None)

    @field_validator("relay")
    @classmethod
    def _check_relay(cls, value: str) -> str:
        value = value.strip()
        if value in ("text", "latent") or value.startswith("latent+"):
            return value
        raise ValueError(f"relay mode {value!r} is not text, latent or latent+<recipe>")

    @model_validator(mode="after")
    def _parse_recipe_once(self) -> Edge:
        if self.relay.startswith("latent+"):
            try:
                self._recipe = _parse_recipe(self.relay[len("latent+") :])
            except ValueError as err:
                raise ValueError(f"relay: edge recipe: {err}") from None
            self.__dict__["relay"] = "latent+" + self._recipe.canonical  # the canonical spelling (frozen model)
        return self

    @property
    def is_latent(self) -> bool:
        return self.relay != "text"

    @property
    def recipe(self) -> Any:
        """The edge's parsed compression recipe, or ``None`` (text relay, or the full memory)."""
        return self._recipe

    @property
    def key(self) -> str:
        """``"source->target"``: the edge's name in result records and packets."""
        return f"{self.source}->{self.target}"


class AgentGraph(_Strict):
    """A validated DAG of agents with a single final node."""

    name: str = "custom"
    nodes: list[Node]
    edges: list[Edge] = Field(default_factory=list)
    latent_steps: int = Field(10, ge=0, le=4096)

    @model_validator(mode="after")
    def _validate(self) -> AgentGraph:
        if not self.nodes:
            raise GraphError("the graph has no nodes")
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise GraphError(f"duplicate node names: {', '.join(dupes)}")
        known = set(names)
        for e in self.edges:
            for end in (e.source, e.target):
                if end not in known:
                    raise GraphError(f"edge {e.source} -> {e.target} names unknown node {end!r}")
            if e.source == e.target:
                raise GraphError(f"edge {e.source} -> {e.target} is a self-loop")
        pairs = [(e.source, e.target) for e in self.edges]
        if len(set(pairs)) != len(pairs):
            raise GraphError("two edges join the same pair of nodes")
        self._topological(names)  # raises on cycles
        finals = [n for n in names if not any(e.source == n for e in self.edges)]
        if len(finals) != 1:
            raise GraphError(
                f"a graph needs exactly one final node (no outgoing edges); found {len(finals)}: {', '.join(finals)}"
            )
        for e in self.edges:
            a, b = self.node(e.source).model, self.node(e.target).model
            if e.is_latent and a and b and a != b:
                raise GraphError(
                    f"latent edge {e.source} -> {e.target} joins different models ({a} vs {b}); "
                    "KV caches only transfer between agents of one model: use a text edge"
                )
        return self

    def _topological(self, names: Sequence[str]) -> list[str]:
        indegree = {n: 0 for n in names}
        for e in self.edges:
            indegree[e.target] += 1
        order, ready = [], [n for n in names if indegree[n] == 0]
        while ready:
            n = ready.pop(0)
            order.append(n)
            for e in self.edges:
                if e.source == n:
                    indegree[e.target] -= 1
                    if indegree[e.target] == 0:
                        ready.append(e.target)
        if len(order) != len(names):
            stuck = [n for n in names if n not in order]
            raise GraphError(f"the graph has a cycle through: {', '.join(stuck)}")
        return order

    # ---------------------------------------------------------------- queries
    @cached_property
    def order(self) -> list[str]:
        """Node names in topological order (ties in declaration order)."""
        return self._topological([n.name for n in self.nodes])

    @property
    def final(self) -> str:
        return next(n.name for n in self.nodes if not any(e.source == n.name for e in self.edges))

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise GraphError(f"unknown node {name!r}")

    def incoming(self, name: str) -> list[Edge]:
        """In-edges of ``name``, parents in topological order."""
        rank = {n: i for i, n in enumerate(self.order)}
        return sorted((e for e in self.edges if e.target == name), key=lambda e: rank[e.source])

    def outgoing(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.source == name]

    def thinks(self, name: str) -> int:
        """Latent thoughts of ``name``: only when some out-edge is latent."""
        if not any(e.is_latent for e in self.outgoing(name)):
            return 0
        steps = self.node(name).latent_steps
        return self.latent_steps if steps is None else steps

    def decodes(self, name: str) -> bool:
        return name == self.final or any(not e.is_latent for e in self.outgoing(name))

    def with_final_view(self, sees: str) -> AgentGraph:
        """The same graph with the final node seeing ``sees`` of its received memory (``all``, ``thoughts``,
        ``last``)."""
        nodes = [n.model_copy(update={"sees": sees}) if n.name == self.final else n for n in self.nodes]
        return AgentGraph(name=self.name, nodes=nodes, edges=self.edges, latent_steps=self.latent_steps)

    def with_relay(self, relay: str) -> AgentGraph:
        """The same graph with every edge's relay mode replaced (``text``, ``latent``, ``latent+<recipe>``)."""
        edges = [Edge(source=e.source, target=e.target, relay=relay) for e in self.edges]
        return AgentGraph(name=self.name, nodes=self.nodes, edges=edges, latent_steps=self.latent_steps)

    def describe(self) -> str:
        return " | ".join(f"{e.source} -[{e.relay}]-> {e.target}" for e in self.edges) or f"{self.final} (alone)"


# -------------------------------------------------------------------- builders
def sequential(relay: str = "latent", latent_steps: int = 10) -> AgentGraph:
    """LatentMAS's sequential topology: planner -> critic -> refiner -> judger."""
    roles = ["planner", "critic", "refiner", "judger"]
    return AgentGraph(
        name="sequential",
        nodes=[Node(name=r) for r in roles],
        edges=[Edge(source=a, target=b, relay=relay) for a, b in zip(roles, roles[1:])],
        latent_steps=latent_steps,
    )


def hierarchical(
    relay: str = "latent", latent_steps: int = 10, experts: Sequence[str] = ("math", "science", "code")
) -> AgentGraph:
    """LatentMAS's hierarchical topology: domain experts each solve the task, a summarizer decides.

    Latent relay follows the reference code: the experts run one after another on the growing memory (expert i
    hands its memory to expert i+1, the last one to the summarizer). Text relay (TextMAS) has every expert answer
    on its own and the summarizer read all their texts.
    """
    experts = list(experts)
    if relay == "text":
        pairs = [(e, "summarizer") for e in experts]
    else:
        pairs = list(zip(experts, experts[1:])) + [(experts[-1], "summarizer")]
    return AgentGraph(
        name="hierarchical",
        nodes=[Node(name=e) for e in experts] + [Node(name="summarizer")],
        edges=[Edge(source=a, target=b, relay=relay) for a, b in pairs],
        latent_steps=latent_steps,
    )


def reader(relay: str = "latent", latent_steps: int = 10) -> AgentGraph:
    """A long-document graph: the reader reads the document and the question; the answerer gets only the
    question, and the reader's memory (latent relay) or notes (text relay). With a recipe on the edge, the document's
    memory reaches the answerer compressed: the setting where relay selectors (``h``, ``l``, ``asl``) differ most."""
    return AgentGraph(
        name="reader",
        nodes=[Node(name="reader"), Node(name="answerer", reads="query")],
        edges=[Edge(source="reader", target="answerer", relay=relay)],
        latent_steps=latent_steps,
    )


def single() -> AgentGraph:
    """The one-agent baseline: one solver answers alone."""
    return AgentGraph(name="single", nodes=[Node(name="solver")], edges=[])


BUILDERS = {"sequential": sequential, "hierarchical": hierarchical, "reader": reader, "single": single}


def build_graph(name: str, relay: str = "latent", latent_steps: int = 10) -> AgentGraph:
    """A named built-in graph (``sequential``, ``hierarchical``, ``reader``, ``single``) with the given relay mode."""
    if name not in BUILDERS:
        raise GraphError(f"unknown graph {name!r}; choose one of {', '.join(BUILDERS)} (or build an AgentGraph)")
    if name == "single":
        return single()
    return BUILDERS[name](relay=relay, latent_steps=latent_steps)
