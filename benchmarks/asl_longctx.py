"""Accuracy of prefill pruning against the KV budget on long-context retrieval (issue 20): ASL (arXiv 2601.07667),
per-layer SnapKV, GemFilter-like, FastKV-like and full KV, on ``needle`` and ``kv-retrieval``.

    python -m latent_relay.benchmarks.asl_longctx                 # default model, 2K and 4K tokens, 5 items each
    python -m latent_relay.benchmarks.asl_longctx --model smollm2-135m --lengths 1024 --items 10
    python -m latent_relay.benchmarks.asl_longctx --quick         # smollm2-135m, 2 short items per task, ~a minute

Per item, the single agent's prompt (role, document and question, the task's answer format, in the chat template) is
prefilled by each method (:mod:`latent_relay.agents.prefill_pruning`) under each budget, a fraction of the prompt's
tokens kept per layer (the scoring window, ``min(--window, budget // 2)`` queries, included). The answer is then
decoded greedily from the pruned cache and scored by the task. Printed: accuracy per task, method and budget (full
KV once, it has no budget); ASL's selection layer ``L*`` per item (-1: no layer settled, nothing pruned); and each
method's prefill time as a ratio to the full prefill (the same layer walk without pruning) over the items of the
longest length. GemFilter and FastKV select at their papers' layers (13 and 15 of 32) scaled to the model's depth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

from latent_relay.agents.models import DEFAULT_MODEL, hide_loading_progress, resolve_model
from latent_relay.agents.prefill_pruning import (
    METHODS,
    PruneSettings,
    WindowRule,
    fixed_layer,
    greedy_decode,
    prune_prefill,
)
from latent_relay.agents.prompts import agent_message, chat_ids
from latent_relay.compression.asl import TAU, choose_layer, window_attention_scores
from latent_relay.relay.stats import wilson_interval
from latent_relay.tasks.kv_retrieval import KVRetrieval
from latent_relay.tasks.needle import Needle

TASKS = {"needle": Needle, "kv-retrieval": KVRetrieval}
RULE = WindowRule(window_attention_scores, choose_layer)
PRUNED = tuple(m for m in METHODS if m != "full")


def stop_ids(loaded) -> list[int]:
    ids = set()
    for src in (getattr(loaded.tokenizer, "eos_token_id", None), loaded.model.generation_config.eos_token_id):
        ids.update([src] if isinstance(src, int) else list(src or []))
    return sorted(ids)


def run_item(loaded, task, item, args, record) -> None:
    """Every method and budget on one item: its correctness, L* and prefill seconds go into ``record``."""
    message = agent_message("solver", item.question, answer_format=task.answer_format)
    ids = chat_ids(loaded.tokenizer, message)
    t = len(ids)
    for method in ("full", *args.methods):
        for fraction in [None] if method == "full" else args.budgets:
            budget = None if fraction is None else max(2, round(fraction * t))
            window = min(args.window, max(1, (budget or t) // 2))
            settings = PruneSettings(method, budget, window, args.pool, args.tau)
            started = time.perf_counter()
            state = prune_prefill(loaded.model, ids, settings, RULE)
            seconds = time.perf_counter() - started
            answer = greedy_decode(loaded.model, state, args.max_new_tokens, stop_ids(loaded))
            text = loaded.tokenizer.decode(answer, skip_special_tokens=True)
            key = (task.name, method, fraction)
            record["correct"][key].append(task.score(item, text))
            record["seconds"][(item.raw["length"], method, fraction)].append(seconds)
            if method == "asl":
                record["star"][(task.name, fraction)].append(state.layer)
            if args.verbose:
                print(f"  {task.name} #{item.id} {t} tok {method} {fraction}: {text!r} (gold {item.gold})")


def accuracy_cell(outcomes: list[bool]) -> str:
    """``3/5 [23-88]``: correct of items with the 95% Wilson interval in percent."""
    low, high = wilson_interval(sum(outcomes), len(outcomes))
    return f"{sum(outcomes)}/{len(outcomes)} [{100 * low:.0f}-{100 * high:.0f}]"


def report(record, args, num_layers: int) -> list[str]:
    pct = [f"{round(100 * f)}%" for f in args.budgets]
    lines = [
        "",
        "accuracy by KV budget (correct / items [95% Wilson interval, %])",
        f"{'task':<14}{'method':<11}" + "".join(f"{p:>17}" for p in pct),
    ]
    for task in args.tasks:
        full = record["correct"][(task, "full", None)]
        lines.append(f"{task:<14}{'full':<11}{accuracy_cell(full):>17}  (every budget)")
        for method in args.methods:
            cells = [record["correct"][(task, method, f)] for f in args.budgets]
            lines.append(f"{task:<14}{method:<11}" + "".join(f"{accuracy_cell(c):>17}" for c in cells))
    if "asl" in args.methods:
        lines += ["", f"ASL selection layer L* per item (-1: none; {num_layers} layers, tau {args.tau})"]
        for task in args.tasks:
            for f, p in zip(args.budgets, pct, strict=True):
                lines.append(f"{task:<14}{p:>4}: {record['star'][(task, f)]}")
    fixed = ", ".join(f"{m} {fixed_layer(m, num_layers)}" for m in ("gemfilter", "fastkv") if m in args.methods)
    longest = max(args.lengths)
    full = statistics.mean(record["seconds"][(longest, "full", None)])
    lines += ["", f"prefill time / full at {longest} tokens (full {full:.3f}s; fixed layers: {fixed or 'none'})"]
    lines.append(f"{'method':<11}" + "".join(f"{p:>8}" for p in pct))
    for method in args.methods:
        ratios = [statistics.mean(record["seconds"][(longest, method, f)]) / full for f in args.budgets]
        lines.append(f"{method:<11}" + "".join(f"{r:>8.2f}" for r in ratios))
    return lines


def parse_list(text: str, kind, what: str, choices=None) -> list:
    try:
        values = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SystemExit(f"--{what}: {exc}") from None
    if not values or (choices is not None and any(v not in choices for v in values)):
        raise SystemExit(f"--{what} {text!r}: choose from {', '.join(choices)}" if choices else f"--{what} is empty")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", default="needle,kv-retrieval")
    parser.add_argument("--methods", default=",".join(PRUNED), help=f"of {', '.join(PRUNED)} (full always runs)")
    parser.add_argument("--lengths", default="2048,4096", help="document + question tokens (comma-separated)")
    parser.add_argument("--items", type=int, default=5, help="items per task and length (cycling the depths)")
    parser.add_argument("--budgets", default="0.05,0.1,0.2", help="fractions of the prompt kept per layer")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--pool", type=int, default=7)
    parser.add_argument("--tau", type=float, default=TAU)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer budget (a boxed UUID takes ~35 tokens)")
    parser.add_argument("--verbose", action="store_true", help="print every answer")
    parser.add_argument("--quick", action="store_true", help="smollm2-135m, 192-token items, 2 per task")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.lengths, args.items, args.max_new_tokens = "smollm2-135m", "192", 2, 6
    args.tasks = parse_list(args.tasks, str, "tasks", list(TASKS))
    args.methods = parse_list(args.methods, str, "methods", list(PRUNED))
    args.lengths = parse_list(args.lengths, int, "lengths")
    args.budgets = parse_list(args.budgets, float, "budgets")
    if args.items < 1 or any(not 0 < f < 1 for f in args.budgets):
        raise SystemExit("--items must be at least 1 and every budget a fraction in (0, 1)")
    hide_loading_progress()
    loaded = resolve_model(args.model)
    num_layers = loaded.model.config.get_text_config().num_hidden_layers
    print(f"{loaded.name}: {num_layers} layers; tasks {', '.join(args.tasks)}; lengths {args.lengths}", flush=True)
    prune_prefill(loaded.model, list(range(8)), PruneSettings("full"), RULE)  # warm-up: first calls are slow
    record = {"correct": defaultdict(list), "seconds": defaultdict(list), "star": defaultdict(list)}
    started = time.perf_counter()
    for name in args.tasks:
        for length in args.lengths:  # a task per length: its items cycle through the depths
            task = TASKS[name](lengths=[length], tokenizer=loaded.tokenizer)
            for number, item in enumerate(task.load(args.items), 1):
                run_item(loaded, task, item, args, record)
                done = f"{name} at {length} tokens: item {number}/{args.items} done"
                print(f"{done} ({time.perf_counter() - started:.0f}s so far)", file=sys.stderr, flush=True)
    print("\n".join(report(record, args, num_layers)))
    print(f"({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
