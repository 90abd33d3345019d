"""Orthogonal Backfill's fast solvers against exact QR + SVD on real working memories (METHODS.md §3, issue 3).

Builds the critic's memory the way a sequential graph does (planner, then critic, each prefilling its role prompt
and thinking latently; no text is decoded) for a few GSM8K items, then solves every (layer, KV head) OBF problem
of L-OBF (rank 4) and H-OBF (rank 2) with each solver and prints, per method and solver, the relative difference
of the injected delta to exact and the spectral gaps sigma_p / sigma_{p+1} of the residuals.
``benchmarks/compression_overhead.py`` measures speed on Qwen3-4B-shaped random caches; this measures accuracy on
real ones.

    python -m latent_relay.benchmarks.obf_accuracy                      # default model, 4 items, 10 thoughts per agent
    python -m latent_relay.benchmarks.obf_accuracy --model smollm2-135m --items 2
"""

from __future__ import annotations

import argparse
import time

import torch

from latent_relay.agents.models import DEFAULT_MODEL, resolve_model
from latent_relay.agents.prompts import agent_message, chat_ids
from latent_relay.agents.runner import ModelRunner
from latent_relay.benchmarks.compression_overhead import spectral_gap
from latent_relay.compression.backfill import BackfillConfig, orthogonal_backfill
from latent_relay.compression.scores import compute_scores
from latent_relay.compression.selectors import current_agent_index, prompt_mask, select_headwise, select_layerwise
from latent_relay.tasks.registry import get_task

SOLVERS = ("subspace", "eigh")


def planner_step(runner: ModelRunner, questions: list[str], thoughts: int):
    """The first agent of a sequential graph: the planner reads each question and thinks latently (no text)."""
    prompts = [chat_ids(runner.tokenizer, agent_message("planner", q)) for q in questions]
    return runner.step([None] * len(questions), prompts, "planner", thoughts=thoughts)


def critic_memories(model: str, items: int, thoughts: int, data_dir: str | None):
    """(memory, observation) of the critic, per item, after planner -> critic."""
    loaded = resolve_model(model)
    runner = ModelRunner.from_loaded(loaded)
    tok = loaded.tokenizer
    questions = [item.question for item in get_task("gsm8k").load(items, data_dir)]
    planner = planner_step(runner, questions, thoughts)
    prompts = [chat_ids(tok, agent_message("critic", q, has_memory=True), continues=True) for q in questions]
    critic = runner.step(planner.memories, prompts, "critic", thoughts=thoughts)
    return loaded.name, list(zip(critic.memories, critic.observations, strict=True))


def memories_header(name: str, cases, thoughts: int) -> str:
    """``name: L layers x H KV heads x d=D, dtype; N GSM8K items, planner -> critic, T thoughts each``."""
    mem0 = cases[0][0]
    return (
        f"{name}: {mem0.num_layers} layers x {mem0.num_kv_heads} KV heads x d={mem0.head_dim}, {mem0.dtype}; "
        f"{len(cases)} GSM8K items, planner -> critic, {thoughts} thoughts each"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--items", type=int, default=4, help="GSM8K items (one memory each)")
    ap.add_argument("--thoughts", type=int, default=10, help="latent thoughts per agent")
    ap.add_argument("--budget", type=int, default=32, help="kept prompt tokens per agent")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    name, cases = critic_memories(args.model, args.items, args.thoughts, args.data_dir)
    print(
        f"{memories_header(name, cases, args.thoughts)}, budget {args.budget}; "
        f"memories built in {time.perf_counter() - start:.0f} s"
    )
    print(
        f"{'method':<8}{'solver':<10}{'problems':>9}{'gap median':>12}{'gap>1.5':>9}"
        f"{'err median':>12}{'err max':>10}{'err>1e-3':>10}"
    )
    methods = (("L-OBF", select_layerwise, 4), ("H-OBF", select_headwise, 2))
    for label, select, rank in methods:
        errors: dict[str, list[torch.Tensor]] = {s: [] for s in SOLVERS}
        gaps = []
        for memory, observation in cases:
            scores = compute_scores(memory, observation)
            selection = select(scores, prompt_mask(memory, current_agent_index(memory, observation)), args.budget)
            exact = orthogonal_backfill(memory, selection, scores, BackfillConfig(rank=rank, solver="exact"))
            applied = exact.applied
            gaps.append(spectral_gap(memory, selection, scores, rank)[applied])
            ref = exact.shift[applied]
            for solver in SOLVERS:
                got = orthogonal_backfill(memory, selection, scores, BackfillConfig(rank=rank, solver=solver))
                diff = (got.shift[applied] - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
                errors[solver].append(diff)
        gap = torch.cat(gaps)
        gap_cols = f"{float(gap.median()):>12.2f}{float((gap > 1.5).float().mean()):>9.0%}"
        for solver in SOLVERS:
            err = torch.cat(errors[solver])
            print(
                f"{label:<8}{solver:<10}{err.numel():>9}{gap_cols}"
                f"{float(err.median()):>12.1e}{float(err.max()):>10.1e}{int((err > 1e-3).sum()):>10}"
            )


if __name__ == "__main__":
    main()
