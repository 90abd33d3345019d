"""How long the final agent's answers are against the decoding budget, per relay mode, from a results file.

    python -m latent_relay.benchmarks.answer_lengths benchmarks/results/gsm8k_1.5b/compare.jsonl

Each record's answer (the final agent's text) is counted in tokens with its model's tokenizer; an answer of at
least ``budget - 1`` tokens (the budget recorded in the record's settings) counts as cut off by the budget. Per relay
mode: items, mean / median / 90th percentile / longest answer, the share cut off, and accuracy of the answers that
were and were not cut off. This is what the default budget (``relay run --max-new-tokens``) is chosen from.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict

from latent_relay.agents.models import hide_loading_progress, resolve_model
from latent_relay.relay.results import latest_records, read_results


def percentile(values: list[int], q: float) -> int:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(math.ceil(len(ordered) * q / 100), 1) - 1]


def length_lines(records, tokenizer) -> list[str]:
    by_mode: dict[str, list[tuple[int, bool, int]]] = defaultdict(list)
    for r in records:
        if r.error:
            continue
        budget = int(r.settings.get("decoding", {}).get("max_new_tokens", 0))
        tokens = len(tokenizer(r.answer or "", add_special_tokens=False).input_ids)
        by_mode[r.relay].append((tokens, bool(r.correct), budget))
    head = f"{'relay':8}{'items':>6}{'mean':>7}{'median':>8}{'p90':>6}{'max':>6}{'budget':>8}{'cut off':>10}"
    lines = [head + f"{'acc (cut off)':>16}{'acc (rest)':>13}"]
    for mode, rows in by_mode.items():
        lengths = [t for t, _, _ in rows]
        budget = max(b for _, _, b in rows)
        cut = [c for t, c, b in rows if b and t >= b - 1]
        rest = [c for t, c, b in rows if not (b and t >= b - 1)]
        lines.append(
            f"{mode:8}{len(rows):>6}{statistics.mean(lengths):>7.0f}{statistics.median(lengths):>8.0f}"
            f"{percentile(lengths, 90):>6}{max(lengths):>6}{budget:>8}{len(cut) / len(rows):>10.0%}"
            f"{f'{sum(cut)}/{len(cut)}':>16}{f'{sum(rest)}/{len(rest)}':>13}"
        )
    return [*lines, "answer lengths in tokens of the final agent's text; cut off: at least budget - 1 tokens"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="results files written by relay run / compare --out")
    args = parser.parse_args(argv)
    records = latest_records([r for f in args.files for r in read_results(f)])
    if not records:
        raise SystemExit("no records in " + ", ".join(args.files))
    hide_loading_progress()
    models = {r.model for r in records}
    for model in sorted(models):
        tokenizer = resolve_model(model).tokenizer
        print(f"{model}:")
        print("\n".join(length_lines([r for r in records if r.model == model], tokenizer)))


if __name__ == "__main__":
    main()
