"""Hierarchical relay: domain experts (math, science, code) work on the problem, a summarizer decides.

With latent relay the experts build one growing working memory (as in LatentMAS); with text relay each
expert answers on its own and the summarizer reads all their answers.

    python examples/hierarchical.py --relay latent
    python examples/hierarchical.py --relay text --experts math,code
"""

from __future__ import annotations

import argparse

from latent_relay import DecodeConfig, LocalRuntime, get_task, hierarchical, load_model, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=2, help="items of the task")
    parser.add_argument("--task", default="gsm8k", help="gsm8k | humaneval | medqa")
    parser.add_argument("--relay", default="latent", help="text | latent | latent+<recipe>")
    parser.add_argument("--experts", default="math,science,code", help="comma-separated expert roles")
    parser.add_argument("--latent-steps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    experts = [e.strip() for e in args.experts.split(",") if e.strip()]
    graph = hierarchical(relay=args.relay, latent_steps=args.latent_steps, experts=experts)
    print(graph.describe())
    task = get_task(args.task)
    items = task.load(args.n, data_dir=args.data_dir)

    runtime = LocalRuntime(load_model(args.model), decode=DecodeConfig(max_new_tokens=args.max_new_tokens))

    results = runtime.run(graph, task, items, args.relay, batch_size=2)
    for r in results:
        print(f"--- item {r.item_id}: {'correct' if r.correct else 'wrong'}; bytes per edge {r.edge_bytes}")
    print()
    print(summarize(results))


if __name__ == "__main__":
    main()
