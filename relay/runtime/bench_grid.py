"""A benchmark grid: relay methods x tasks x graphs x settings, run on the same item ids, sharing common work.

Settings are parameters of the runtime, never forks of a method: latent thoughts per agent, how a thought's hidden
state becomes the next input (soft tokens at a temperature, norm-rescaled, ridge realignment), what the final agent
sees of its memory (all of it; the thoughts only; the last sender only: LatentMAS's ``latent_only`` and
``sequential_info_only``), and decoding (greedy, or sampled at a temperature with a seed). ``--set name=v1,v2``
lists values; the grid is their product.

The grid runs batch by batch: every cell (method, graph, setting) runs the same batch of items before the next
batch starts, through one :class:`~latent_relay.relay.runtime.step_memo.StepMemo`, so an agent step two cells
share (the upstream agents of every recipe on an edge; thinking agents under several decoding seeds; the single
agent under every latent setting) is computed once. Each cell resumes from its own records (``--resume``), and every
record is written as its batch ends.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from latent_relay.agents.latent import LatentInput
from latent_relay.relay.decode_config import DecodeConfig
from latent_relay.relay.graph import AgentGraph, build_graph
from latent_relay.relay.memory import MEMORY_VIEWS
from latent_relay.relay.results import ItemResult, ResultWriter, run_key
from latent_relay.relay.runtime.local import LocalRuntime, batches
from latent_relay.relay.runtime.records import RecordBuilder
from latent_relay.relay.runtime.step_memo import StepMemo

log = logging.getLogger("relay")


class GridError(ValueError):
    """A malformed grid: an unknown setting, a bad value, an empty list."""


@dataclass(frozen=True)
class Setting:
    """One point of the settings grid (the defaults are ``relay run``'s)."""

    latent_steps: int = 10
    latent_input: str = "soft"
    soft_temperature: float = 1.0
    decoding: str = "greedy"  # greedy | sample
    temperature: float = 0.7  # of sampled decoding
    seed: int = 0
    max_new_tokens: int = 512
    final_view: str = "all"  # all | thoughts | last: what the final agent sees of its memory

    def latent(self, like: LatentInput | None = None) -> LatentInput:
        like = like or LatentInput()
        return like.variant(self.latent_input, self.soft_temperature, like.ridge)

    def decode(self) -> DecodeConfig:
        return DecodeConfig(
            max_new_tokens=self.max_new_tokens,
            greedy=self.decoding == "greedy",
            temperature=self.temperature,
            seed=self.seed,
        )

    def label(self, names: Sequence[str]) -> str:
        """``name=value`` for each of ``names`` (the settings a grid varies)."""
        return ", ".join(f"{n}={getattr(self, n)}" for n in names)


#: Each setting a grid may vary: its parser and the values it accepts.
SETTING_TYPES: dict[str, Callable[[str], Any]] = {
    "latent_steps": int,
    "latent_input": str,
    "soft_temperature": float,
    "decoding": str,
    "temperature": float,
    "seed": int,
    "max_new_tokens": int,
    "final_view": str,
}
_CHOICES = {
    "latent_input": ("soft", "hidden", "realign"),
    "decoding": ("greedy", "sample"),
    "final_view": MEMORY_VIEWS,
}
_RANGES = {"latent_steps": (0, 4096), "max_new_tokens": (1, 32768)}


def parse_settings(specs: Sequence[str], base: Setting | None = None) -> tuple[list[Setting], list[str]]:
    """The grid of ``specs`` (each ``name=v1,v2,...``) over ``base``: every combination, and the names varied.

    >>> [s.latent_steps for s in parse_settings(["latent_steps=0,10"])[0]]
    [0, 10]
    """
    base = base or Setting()
    axes: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in SETTING_TYPES:
            raise GridError(f"--set {spec!r}: use name=v1,v2 with name one of {', '.join(SETTING_TYPES)}")
        if name in axes:
            raise GridError(f"--set {name} is given twice; list its values once, comma-separated")
        parsed = []
        for text in values.split(","):
            try:
                value = SETTING_TYPES[name](text.strip())
            except ValueError:
                raise GridError(f"--set {name}: {text.strip()!r} is not a {SETTING_TYPES[name].__name__}") from None
            if name in _CHOICES and value not in _CHOICES[name]:
                raise GridError(f"--set {name}: {value!r} is not one of {', '.join(_CHOICES[name])}")
            low, high = _RANGES.get(name, (None, None))
            if low is not None and not low <= value <= high:
                raise GridError(f"--set {name}: {value} is outside {low}..{high}")
            if name in ("soft_temperature", "temperature") and value <= 0:
                raise GridError(f"--set {name}: {value} must be positive")
            if value not in parsed:
                parsed.append(value)
        axes[name] = parsed
    names = [n for n, vs in axes.items() if len(vs) > 1]
    grid = [replace(base, **dict(zip(axes, combo))) for combo in itertools.product(*axes.values())]
    return grid, names


@dataclass
class Cell:
    """One method on one graph under one setting, over one task: its graph, record builder and items to run."""

    task: Any
    method: str
    setting: Setting
    graph: AgentGraph
    records: RecordBuilder | None = None
    todo: set[str] = field(default_factory=set)
    done: int = 0
    correct: int = 0


def grid_cells(task, graphs: Sequence[str], methods: Sequence[str], settings: Sequence[Setting]) -> list[Cell]:
    """Every (method, graph, setting) of one task. ``single`` runs on its own one-agent graph, once per decoding
    setting (latent settings mean nothing to it). Builds (and so validates) every graph and recipe."""
    cells = []
    decodings: list[DecodeConfig] = []
    for setting in settings:
        for graph_name in graphs:
            for method in methods:
                if method == "single":
                    if setting.decode() in decodings:
                        continue
                    decodings.append(setting.decode())
                graph = build_graph(graph_name if method != "single" else "single", method, setting.latent_steps)
                if method != "single" and setting.final_view != "all":
                    graph = graph.with_final_view(setting.final_view)
                cells.append(Cell(task, method, setting, graph))
    return cells


@dataclass
class GridProgress:
    """What :func:`run_grid` reports after each batch: the cells so far, the batch's place, the time spent."""

    cells: list[Cell]
    batch: int
    batches: int
    elapsed: float
    memo: StepMemo


def run_grid(
    runtime: LocalRuntime,
    cells: Sequence[Cell],
    items: Sequence,
    *,
    batch_size: int = 4,
    writer: ResultWriter | None = None,
    resume: bool = False,
    retry_errors: bool = True,
    on_batch: Callable[[GridProgress], None] | None = None,
) -> tuple[list[ItemResult], StepMemo]:
    """Run every cell over ``items`` (all cells of one task), batch by batch through one memo per batch; return
    this run's records and a memo whose counters cover the whole run (hits, misses, seconds saved)."""
    executor = runtime.executor
    base_latent, base_decode = executor.runner.latent, executor.default_decode
    latents: dict[Setting, LatentInput] = {}
    ids = [str(it.id) for it in items]
    for cell in cells:
        _use(executor, cell.setting, latents, base_latent)
        cell.records = runtime.record_builder(cell.graph, cell.task, cell.method)
        done = set()
        if resume and writer is not None:
            done = writer.done(run_key(cell.records.template()), retry_errors=retry_errors)
        cell.todo = {i for i in ids if i not in done}
    total = StepMemo()
    results: list[ItemResult] = []
    started = time.perf_counter()
    chunks = list(batches(list(items), max(1, batch_size)))
    try:
        for number, chunk in enumerate(chunks, 1):
            memo = StepMemo()
            for cell in cells:
                todo = [it for it in chunk if str(it.id) in cell.todo]
                if not todo:
                    continue
                _use(executor, cell.setting, latents, base_latent)
                try:
                    outputs = runtime.run_batch(cell.graph, cell.task, todo, memo=memo)
                    out = cell.records.batch(todo, outputs)
                except Exception as err:  # one failed batch must not lose the others' results
                    log.warning("%s: batch of %d items failed: %s: %s", cell.method, len(todo), type(err).__name__, err)
                    out = [cell.records.failed(it, f"{type(err).__name__}: {err}") for it in todo]
                if writer is not None:
                    writer.write(out)
                cell.done += len(out)
                cell.correct += sum(r.correct for r in out)
                results.extend(out)
            total.hits += memo.hits
            total.misses += memo.misses
            total.saved_seconds += memo.saved_seconds
            if on_batch is not None:
                on_batch(GridProgress(list(cells), number, len(chunks), time.perf_counter() - started, total))
    finally:
        executor.runner.latent, executor.default_decode = base_latent, base_decode
    return results, total


def _use(executor, setting: Setting, latents: dict[Setting, LatentInput], base: LatentInput) -> None:
    """Make ``setting`` the executor's: its latent input (one object per setting, sharing the fp32 embedding) and
    its default decoding."""
    key = replace(
        setting, decoding="greedy", temperature=1.0, seed=0, max_new_tokens=1, final_view="all"
    )  # latent part
    if key not in latents:
        latents[key] = setting.latent(executor.runner.latent if latents else base)
    executor.runner.latent = latents[key]
    executor.default_decode = setting.decode()
