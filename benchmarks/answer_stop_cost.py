"""What the answer stop costs per decoded token: the check decoding makes so an item stops once its answer is
complete (latent_relay.tasks.stops), timed on the shared data's solutions written in each task's answer format.

    python -m latent_relay.benchmarks.answer_stop_cost                       # a cached Qwen tokenizer, 100 items
    python -m latent_relay.benchmarks.answer_stop_cost --tokenizer FOLDER --items 500

Each text is fed token by token through the decoder's bookkeeping (TokenPicker) with and without the rule; the
difference is the rule's cost: a dictionary look-up per token, and a decode of the item's text plus the rule
whenever a token holds a trigger character. A decode step of a model is tens to hundreds of milliseconds on a CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from latent_relay.agents.decoding import DecodeConfig, TokenPicker
from latent_relay.agents.model_cache import cache_dir
from latent_relay.relay.decode_config import AnswerStop
from latent_relay.tasks.registry import get_task


def written_answers(task_name: str, n: int) -> list[str]:
    """Reference answers of the shared data, written as the task's answer format asks, with a line after them."""
    items = get_task(task_name).load(n)
    if task_name == "gsm8k":
        out = []
        for it in items:
            work, answer = it.raw["answer"].rsplit("####", 1)
            out.append(f"{work}So the final answer is $\\boxed{{{answer.strip()}}}$.\n\nThat is all.")
        return out
    if task_name == "medqa":
        return [f"The findings point to one option.\n\nThe answer is \\boxed{{{it.gold}}}.\n\nDone." for it in items]
    return [f"Here it is:\n\n```python\n{it.raw['prompt']}{it.raw['canonical_solution']}```\n\nDone." for it in items]


def measure(rule: AnswerStop | None, texts: list[str], tokenizer, repeats: int = 3) -> dict:
    """Seconds spent per token in the picker's per-token bookkeeping (best of ``repeats``), tokens fed, checks run
    and items stopped, for ``texts`` fed token by token until the rule stops them."""
    ids = [list(tokenizer(t)["input_ids"]) for t in texts]
    best = float("inf")
    for _ in range(repeats):
        tokens = checks = stopped = 0
        elapsed = 0.0
        for seq in ids:
            picker = TokenPicker(DecodeConfig(), tokenizer, 1, set(), rule)
            start = time.perf_counter()
            for t in seq:
                picker.tokens[0].append(t)
                tokens += 1
                if picker.answer_stop is not None and picker._answer_complete(0, t):
                    stopped += 1
                    break
            elapsed += time.perf_counter() - start
            checks += picker.answer_checks
        best = min(best, elapsed)
    return {"seconds_per_token": best / max(tokens, 1), "tokens": tokens, "checks": checks, "stopped": stopped}


def find_tokenizer(folder: str | None):
    from transformers import AutoTokenizer

    if folder is None:
        found = sorted((cache_dir() / "models").glob("qwen2.5-coder-*/tokenizer.json"))
        if not found:
            raise SystemExit("no cached Qwen model: run `relay run` once, or give --tokenizer FOLDER")
        folder = str(found[-1].parent)
    return AutoTokenizer.from_pretrained(folder), Path(folder).name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a folder with tokenizer.json (default: a cached Qwen2.5-Coder model)")
    parser.add_argument("--items", type=int, default=100, help="items per task")
    args = parser.parse_args()
    tokenizer, name = find_tokenizer(args.tokenizer)
    print(f"tokenizer: {name}; {args.items} items per task; per token: rule's added time, checks per token")
    print(f"{'task':<10} {'rule':<11} {'tokens':>7} {'checks':>7} {'stopped':>7} {'us/token':>9} {'us/check':>9}")
    for task_name in ("gsm8k", "medqa", "humaneval"):
        rule = get_task(task_name).answer_stop
        texts = written_answers(task_name, args.items)
        base = measure(None, texts, tokenizer)
        with_rule = measure(rule, texts, tokenizer)
        added = with_rule["seconds_per_token"] - base["seconds_per_token"]  # the bookkeeping without a rule
        per_check = added * with_rule["tokens"] / max(with_rule["checks"], 1)
        print(
            f"{task_name:<10} {rule.name:<11} {with_rule['tokens']:>7} {with_rule['checks']:>7} "
            f"{with_rule['stopped']:>7} {added * 1e6:>9.2f} {per_check * 1e6:>9.1f}"
        )


if __name__ == "__main__":
    main()
