"""Agent graph construction and validation."""

import pytest

from latent_relay.relay.graph import AgentGraph, Edge, GraphError, Node, build_graph, hierarchical, sequential, single


def test_builders():
    g = sequential("latent", latent_steps=5)
    assert g.order == ["planner", "critic", "refiner", "judger"] and g.final == "judger"
    assert g.thinks("planner") == 5 and g.thinks("judger") == 0 and g.decodes("judger") and not g.decodes("planner")
    t = sequential("text")
    assert t.thinks("planner") == 0 and t.decodes("planner")
    h = hierarchical("latent")
    assert h.final == "summarizer" and h.order[:3] == ["math", "science", "code"]
    ht = hierarchical("text")
    assert [e.source for e in ht.incoming("summarizer")] == ["math", "science", "code"]
    assert single().final == "solver" and single().edges == []
    assert build_graph("sequential", "latent+h:budget=8").edges[0].relay.startswith("latent+h")


def test_dag_parents_in_topological_order():
    g = AgentGraph(
        nodes=[Node(name=n) for n in ["d", "b", "a", "c"]],
        edges=[
            Edge(source="a", target="b"),
            Edge(source="a", target="c", relay="text"),
            Edge(source="c", target="d"),
            Edge(source="b", target="d", relay="text"),
        ],
    )
    assert g.order.index("a") < g.order.index("b") < g.order.index("d")
    assert [e.source for e in g.incoming("d")] == sorted(["b", "c"], key=g.order.index)
    assert g.decodes("a") and g.thinks("a") == 10  # a text and a latent out-edge: thinks and decodes


@pytest.mark.parametrize(
    "nodes, edges, message",
    [
        (["a", "b"], [("a", "b"), ("b", "a")], "cycle"),
        (["a", "b"], [("a", "z")], "unknown node 'z'"),
        (["a", "b", "c"], [("a", "c")], "exactly one final node"),
        (["a", "a"], [], "duplicate node names"),
        (["a"], [("a", "a")], "self-loop"),
        (["a", "b"], [("a", "b"), ("a", "b")], "same pair"),
        ([], [], "no nodes"),
    ],
)
def test_invalid_graphs_raise_graph_error(nodes, edges, message):
    with pytest.raises(GraphError, match=message):
        AgentGraph(nodes=[Node(name=n) for n in nodes], edges=[Edge(source=a, target=b) for a, b in edges])


def test_mixed_model_latent_edge_and_bad_relay_modes():
    with pytest.raises(GraphError, match="different models"):
        AgentGraph(nodes=[Node(name="a", model="m1"), Node(name="b", model="m2")], edges=[Edge(source="a", target="b")])
    AgentGraph(
        nodes=[Node(name="a", model="m1"), Node(name="b", model="m2")],
        edges=[Edge(source="a", target="b", relay="text")],
    )
    with pytest.raises(GraphError, match="relay mode"):
        Edge(source="a", target="b", relay="telepathy")
    with pytest.raises(GraphError, match="unknown graph"):
        build_graph("ring")
    with pytest.raises(GraphError):
        Node(name="bad name!")
    with pytest.raises(GraphError):
        AgentGraph(nodes=[Node(name="a")], latent_steps=-1)


def test_the_reader_graph_gives_the_document_to_the_reader_only():
    from dataclasses import dataclass, field

    from latent_relay.relay.graph import build_graph

    @dataclass
    class LongItem:
        question: str
        raw: dict = field(default_factory=dict)

    g = build_graph("reader", "latent+asl:budget=8", latent_steps=3)
    reader, answerer = g.node("reader"), g.node("answerer")
    item = LongItem("DOCUMENT\n\nWhat is the key?", {"query": "What is the key?"})
    assert (reader.text_of(item), answerer.text_of(item)) == (item.question, "What is the key?")
    assert answerer.text_of(LongItem("no document here")) == "no document here"  # items without a query
    assert g.final == "answerer" and g.thinks("reader") == 3 and g.edges[0].relay.startswith("latent+asl:")


def test_graph_digests_stay_stable_across_new_node_fields():
    """Records carry the graph's digest and ``--resume`` matches on it: a field added to nodes later, at its
    default, must not change the digest of a graph (these are the digests of committed benchmark records)."""
    from latent_relay.relay.graph import build_graph
    from latent_relay.relay.runtime.records import graph_digest

    assert graph_digest(build_graph("sequential", "latent", 10)) == "6f1533e8a48aa930"
    assert graph_digest(build_graph("single")) == "904e94f642338c17"
    assert graph_digest(build_graph("reader", "latent", 10)) != graph_digest(build_graph("reader", "text", 10))
