"""A custom agent graph: your own roles and prompts, mixed text and latent edges, a node with two parents.

    solver ──latent (compressed)──> checker ──latent──> judge
       └──────────────text────────────────────────────────┘

    python examples/custom_dag.py                       # in this process
    python examples/custom_dag.py --runtime ray         # as Ray actors: solver alone, checker+judge together

The same graph can be written as JSON and loaded with ``AgentGraph.model_validate_json``.
"""

from __future__ import annotations

import argparse

from latent_relay import AgentGraph, DecodeConfig, Edge, LocalRuntime, Node, RayRuntime, get_task, load_model, summarize


def build(recipe: str, latent_steps: int) -> AgentGraph:
    relay = f"latent+{recipe}" if recipe else "latent"
    return AgentGraph(
        name="solve-check-judge",
        nodes=[
            Node(name="solver", prompt="Solve the problem step by step."),
            Node(
                name="checker",
                prompt="Check the solution in your working memory for arithmetic mistakes.",
                latent_steps=latent_steps // 2,
            ),
            Node(name="judge", role="judger", decoding=DecodeConfig(max_new_tokens=192)),
        ],
        edges=[
            Edge(source="solver", target="checker", relay=relay),
            Edge(source="checker", target="judge", relay="latent"),
            Edge(source="solver", target="judge", relay="text"),
        ],
        latent_steps=latent_steps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=2, help="GSM8K items")
    parser.add_argument("--recipe", default="h:budget=32", help="solver -> checker recipe ('' for none)")
    parser.add_argument("--latent-steps", type=int, default=8)
    parser.add_argument("--runtime", default="local", choices=["local", "ray"])
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local loopback one)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    graph = build(args.recipe, args.latent_steps)
    print(graph.describe())
    task = get_task("gsm8k")
    items = task.load(args.n, data_dir=args.data_dir)
    decode = DecodeConfig(max_new_tokens=256)

    if args.runtime == "ray":
        placement = {"solver": "solver-host", "checker": "judge-host", "judge": "judge-host"}
        with RayRuntime(args.model, decode=decode, address=args.address, placement=placement) as runtime:
            results = runtime.run(graph, task, items, "custom", batch_size=2)
    else:
        runtime = LocalRuntime(load_model(args.model), decode=decode)
        results = runtime.run(graph, task, items, "custom", batch_size=2)
    for r in results:
        print(f"--- item {r.item_id}: {'correct' if r.correct else 'wrong'} (gold {r.gold})")
        for edge, n in r.edge_bytes.items():
            print(f"    {edge}: {n} bytes {r.edge_metrics.get(edge, '')}")
    print()
    print(summarize(results, baseline="custom"))


if __name__ == "__main__":
    main()
