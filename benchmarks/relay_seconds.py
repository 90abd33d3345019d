"""Seconds per GSM8K item for the single agent, text relay and latent relay under one loaded model: the cost a user
of ``relay compare`` meets, for :mod:`latent_relay.benchmarks.cpu_speed`.

Each mode runs the same items as one batch (the sequential graph for text and latent relay, 10 latent thoughts per
agent by default, every item stopping at its answer as ``relay run`` does). Items decode to different lengths under
different settings, so the output tokens are printed beside the seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from latent_relay.relay.decode_config import DecodeConfig
from latent_relay.relay.graph import build_graph
from latent_relay.relay.runtime.local import LocalRuntime
from latent_relay.tasks.registry import get_task

MODES = ("single", "text", "latent")


@dataclass(frozen=True)
class ModeCost:
    """One relay mode's cost over the items: wall seconds per item, output tokens per item, items correct."""

    seconds: float
    tokens: float
    correct: int
    items: int


def relay_costs(loaded, n_items: int, *, budget: int, latent_steps: int, data_dir=None) -> dict[str, ModeCost]:
    """Every mode of :data:`MODES` over GSM8K test items ``0..n_items-1``, one batch each."""
    task = get_task("gsm8k")
    items = task.load(n_items, data_dir=data_dir)
    runtime = LocalRuntime(loaded, decode=DecodeConfig(max_new_tokens=budget))
    costs = {}
    for mode in MODES:
        graph = build_graph(
            "single" if mode == "single" else "sequential", "latent" if mode == "single" else mode, latent_steps
        )
        started = time.perf_counter()
        results = runtime.run(graph, task, items, mode, batch_size=len(items))
        elapsed = time.perf_counter() - started
        costs[mode] = ModeCost(
            seconds=elapsed / len(items),
            tokens=sum(r.output_tokens for r in results) / len(items),
            correct=sum(bool(r.correct) for r in results),
            items=len(items),
        )
    return costs


def cost_lines(costs: dict[str, dict[str, ModeCost]]) -> list[str]:
    """The table: per setting and mode, seconds per item (ratio to the first setting's) and output tokens per item."""
    base_name = "float32" if "float32" in costs else next(iter(costs))
    base = costs[base_name]
    n = next(iter(base.values())).items
    lines = [f"{'setting':12}" + "".join(f"{m + ' s/item':>30}" for m in MODES)]
    for name, per_mode in costs.items():
        cells = [
            f"{c.seconds:7.1f} ({base[m].seconds / c.seconds:5.2f}x) {c.tokens:5.0f} tok" for m, c in per_mode.items()
        ]
        lines.append(f"{name:12}" + "".join(f"{c:>30}" for c in cells))
    correct = ", ".join(f"{name} " + "/".join(str(c.correct) for c in pm.values()) for name, pm in costs.items())
    return [
        *lines,
        f"GSM8K items 0-{n - 1} as one batch; (Nx) = {base_name}'s seconds / this setting's (higher is faster)",
        "tok = output tokens per item, all agents together",
        f"correct (single/text/latent) of {n}: {correct}",
    ]
