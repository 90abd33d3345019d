"""How much of the full latent relay a compressed relay keeps, measured on the next agent (issue 3).

The default 0.5B model solves too few GSM8K items for an accuracy comparison of compression methods (every method
sits at 0-3 of 30 in ``relay compare``). This measures the receiving agent directly instead, in the way KV-cache
compression work measures fidelity: the planner reads each GSM8K question and thinks latently; its working memory
is handed to the critic in full, compressed by each recipe, or not at all, and the critic is teacher-forced on the
item's worked solution (GSM8K's reference reasoning, calculator notes removed). Per recipe:

- relay bytes per problem (the real packet size) and the ratio to the full relay;
- the solution's negative log-likelihood per token (NLL) and its change against the full relay;
- the KL divergence from the full relay's next-token distributions, KL(full || recipe), per token;
- how often the critic's top-1 token is the full relay's.

"no memory" (the critic alone, without the planner) shows how far the memory moves the critic at all: a recipe
whose KL is small next to it keeps most of what the relay carries. Means over items, each item's value the mean
over its solution tokens; ``+-`` is the standard error over items.

    python -m latent_relay.benchmarks.relay_fidelity                      # default model, 10 items, 10 thoughts
    python -m latent_relay.benchmarks.relay_fidelity --model smollm2-135m --items 4
    python -m latent_relay.benchmarks.relay_fidelity --recipe h:budget=8 --recipe h-obf:budget=8,rank=2
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import torch

from latent_relay.agents.models import DEFAULT_MODEL, resolve_model
from latent_relay.agents.prompts import agent_message, chat_ids
from latent_relay.agents.runner import ModelRunner
from latent_relay.benchmarks.obf_accuracy import planner_step
from latent_relay.compression.quant import unpack
from latent_relay.compression.recipes import RecipeError, compress, parse_recipe
from latent_relay.relay.messages import LatentMessage
from latent_relay.relay.wire import encoded_size
from latent_relay.tasks.registry import get_task

RECIPES = (
    "h:budget=32",
    "l:budget=32",
    "h-obf:budget=32,rank=2",
    "l-obf:budget=32,rank=4",
    "gen",
    "h-obf:budget=32,rank=2+int8",
    "h-obf:budget=32,rank=2+int4",
)
FULL, ALONE = "latent (full)", "no memory"


def worked_solution(answer: str) -> str:
    """GSM8K's reference solution as plain text: calculator notes ``<<...>>`` dropped, ``#### x`` boxed."""
    text = re.sub(r"<<[^>]*>>", "", answer)
    body, _, final = text.rpartition("####")
    return f"{body.strip()}\nThe final answer is \\boxed{{{final.strip()}}}."


def compare(reference: torch.Tensor, logprobs: torch.Tensor, tokens: list[int]) -> dict[str, float]:
    """NLL of ``tokens`` under ``logprobs``, KL(reference || logprobs) and top-1 agreement, each a mean over tokens."""
    index = torch.arange(len(tokens))
    return {
        "nll": float(-logprobs[index, torch.tensor(tokens)].mean()),
        "kl": float((reference.exp() * (reference - logprobs)).sum(-1).clamp_min(0).mean()),
        "top1": float((logprobs.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return mean, se


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--items", type=int, default=10, help="GSM8K items (from the first)")
    ap.add_argument("--thoughts", type=int, default=10, help="the planner's latent thoughts")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument(
        "--recipe",
        action="append",
        dest="recipes",
        metavar="RECIPE",
        help=f"a recipe to measure (repeat the flag for several; default: {', '.join(RECIPES)})",
    )
    args = ap.parse_args(argv)
    recipes = tuple(args.recipes or RECIPES)
    for recipe in recipes:  # a malformed recipe fails here, before the model loads
        try:
            parse_recipe(recipe)
        except RecipeError as e:
            ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaded = resolve_model(args.model)
    runner = ModelRunner.from_loaded(loaded)
    tok = loaded.tokenizer
    items = get_task("gsm8k").load(args.items, args.data_dir)
    questions = [item.question for item in items]
    planner = planner_step(runner, questions, args.thoughts)
    prompts = [chat_ids(tok, agent_message("critic", q, has_memory=True), continues=True) for q in questions]
    alone_prompts = [chat_ids(tok, agent_message("critic", q)) for q in questions]
    solutions = [tok(worked_solution(item.raw["answer"]), add_special_tokens=False)["input_ids"] for item in items]
    print(
        f"{loaded.name}: planner -> critic on GSM8K items 0-{len(items) - 1}, {args.thoughts} latent thoughts; the "
        f"critic teacher-forced on the worked solution ({statistics.fmean(map(len, solutions)):.0f} tokens on "
        f"average); planner memories built in {time.perf_counter() - start:.0f} s",
        flush=True,
    )

    labels = (FULL, *recipes, ALONE)
    results: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    for b, (memory, observation) in enumerate(zip(planner.memories, planner.observations, strict=True)):
        tokens = solutions[b]

        def score(mem, prompt, tokens=tokens) -> torch.Tensor:
            return runner.continuation_logprobs([mem], [prompt], [tokens], "critic")[0]

        reference = score(memory, prompts[b])
        full_bytes = encoded_size(LatentMessage("planner", memory))
        results[FULL].append({**compare(reference, reference, tokens), "bytes": full_bytes})
        for recipe in recipes:
            packed, _ = compress(memory, observation, recipe)
            message = LatentMessage("planner", packed, recipe)
            got = score(unpack(message), prompts[b])
            results[recipe].append({**compare(reference, got, tokens), "bytes": encoded_size(message)})
        got = score(None, alone_prompts[b])
        results[ALONE].append({**compare(reference, got, tokens), "bytes": 0})
        print(f"  item {b + 1}/{len(items)} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    full_nll = [r["nll"] for r in results[FULL]]
    print(
        f"\n{'relay':<32}{'bytes/problem':>14}{'vs full':>9}{'NLL/token':>11}{'dNLL vs full':>17}"
        f"{'KL(full||x)':>17}{'top-1 = full':>14}"
    )
    for label in labels:
        rows = results[label]
        size = statistics.fmean(r["bytes"] for r in rows)
        ratio = f"{statistics.fmean(r['bytes'] for r in results[FULL]) / size:.1f}x" if size else "-"
        nll = statistics.fmean(r["nll"] for r in rows)
        d, d_se = _mean_se([r["nll"] - f for r, f in zip(rows, full_nll, strict=True)])
        kl, kl_se = _mean_se([r["kl"] for r in rows])
        top1 = statistics.fmean(r["top1"] for r in rows)
        print(
            f"{label:<32}{size / 1e6:>11.2f} MB{ratio:>9}{nll:>11.3f}{d:>+10.3f} +-{d_se:.3f}"
            f"{kl:>10.3f} +-{kl_se:.3f}{top1:>14.1%}"
        )
    print(f"({len(items)} items; {time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
