"""Sequential latent relay: planner -> critic -> refiner -> judger, each handing its KV cache to the next.

python examples/sequential.py                      # smollm2-135m, 2 GSM8K items, full latent relay
python examples/sequential.py --relay text         # the same agents talking in text (TextMAS)
python examples/sequential.py --relay "latent+h-obf:budget=32,rank=2"   # compressed relay
"""

from __future__ import annotations

import argparse

from latent_relay import DecodeConfig, LocalRuntime, build_graph, get_task, load_model, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=2, help="GSM8K items")
    parser.add_argument("--relay", default="latent", help="text | latent | latent+<recipe>")
    parser.add_argument("--latent-steps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    graph = build_graph("sequential", relay=args.relay, latent_steps=args.latent_steps)
    print(graph.describe())
    task = get_task("gsm8k")
    items = task.load(args.n, data_dir=args.data_dir)

    model = load_model(args.model)  # weights shared by all four agents
    runtime = LocalRuntime(model, decode=DecodeConfig(max_new_tokens=args.max_new_tokens))

    results = runtime.run(graph, task, items, args.relay, batch_size=2)
    for r in results:
        print(
            f"--- item {r.item_id}: {'correct' if r.correct else 'wrong'} (gold {r.gold}), "
            f"{r.relay_bytes} relay bytes, {r.seconds:.1f}s\n{r.answer.strip()[:400]}"
        )
    print()
    print(summarize(results))


if __name__ == "__main__":
    main()
