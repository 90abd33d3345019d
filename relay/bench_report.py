"""The report of a benchmark grid: markdown tables and PNG plots that need no code to read.

Records are grouped by task, model, graph and settings (latent thoughts, latent input, decoding); the single agent's
records join every graph's group of the same settings. Each group is one table
(:func:`latent_relay.relay.results.summarize`): accuracy with a 95% Wilson interval, exact McNemar tests on the
same items against text relay and, for compressed recipes, against full latent relay, output tokens, seconds per
problem with the speed-up against text relay, relay bytes per problem with the ratio to full latent relay. Where
a grid varies settings, a sweep table lists every setting's methods side by side.

Plots (matplotlib, the ``bench`` extra): per group, accuracy against relay bytes (one point per method with its
interval; the single agent, which relays nothing, as a band), and seconds per problem per method.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from latent_relay.relay.results import ItemResult, latest_records, run_key, summarize
from latent_relay.relay.stats import paired_comparison, wilson_interval


@dataclass
class Group:
    """The records of one task, model, graph and settings; ``label`` names the settings."""

    task: str
    model: str
    graph: str
    settings: dict
    records: list[ItemResult]

    @property
    def title(self) -> str:
        items = len({r.item_id for r in self.records})
        return f"{self.task}, graph {self.graph}, {settings_label(self.settings)}: {items} items, model {self.model}"


def settings_label(settings: dict) -> str:
    """``10 thoughts, soft tokens (T=1.0), greedy, budget 512`` from a record's settings."""
    latent = settings.get("latent_input", {})
    mode = latent.get("mode", "?")
    how = {"soft": f"soft tokens (T={latent.get('temperature')})", "hidden": "norm-rescaled hidden states"}
    decoding = settings.get("decoding", {})
    sampled = f"sampled (T={decoding.get('temperature')}, seed {decoding.get('seed')})"
    return ", ".join(
        [
            f"{settings.get('latent_steps', '?')} thoughts",
            how.get(mode, "ridge-realigned hidden states" if mode == "realign" else mode),
            "greedy" if decoding.get("greedy", True) else sampled,
            f"budget {decoding.get('max_new_tokens', '?')}",
        ]
        + ([f"final agent sees {VIEW_NAMES.get(view, view)}"] if (view := settings.get("final_view")) else [])
    )


VIEW_NAMES = {"thoughts": "thoughts only", "last": "the last sender only"}


def groups(records: Sequence[ItemResult]) -> list[Group]:
    """The records split by task, model (name and fingerprint), graph and settings, in order of appearance. A
    single-agent record joins each graph's group with its task, model and decoding (latent settings mean nothing
    to one agent); one run of it per group, the first."""
    records = latest_records(records)
    found: dict[tuple, Group] = {}
    singles: dict[tuple, dict[tuple, list[ItemResult]]] = {}
    for r in records:
        model = r.model + (f" ({r.model_fingerprint[:12]})" if r.model_fingerprint else "")
        base = (r.task, model, json.dumps(r.settings.get("decoding"), sort_keys=True))
        if r.graph == "single":
            singles.setdefault(base, {}).setdefault(run_key(r), []).append(r)
            continue
        key = (*base, json.dumps(r.settings, sort_keys=True), r.graph)
        if key not in found:
            found[key] = Group(r.task, model, r.graph, r.settings, [])
        found[key].records.append(r)
    for base, runs in singles.items():
        first = next(iter(runs.values()))
        joined = [g for key, g in found.items() if key[:3] == base]
        for g in joined:
            g.records[:0] = first
        if not joined:
            for rs in runs.values():
                found[(*base, run_key(rs[0]), "single")] = Group(base[0], base[1], "single", rs[0].settings, rs)
    return list(found.values())


def markdown_report(records: Sequence[ItemResult], plots: Sequence[Path] = ()) -> str:
    """The whole report: a table per group, a sweep table per task, model and graph whose settings vary, and
    links to ``plots`` (paths relative to the report's folder)."""
    parts = []
    all_groups = groups(records)
    for g in all_groups:
        parts += [f"## {g.title}", "", summarize(g.records, markdown=True), ""]
    parts += _sweeps(all_groups)
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.as_posix()})" for p in plots] + [""]
    parts.append(_legend())
    return "\n".join(parts)


def _legend() -> str:
    return (
        "Accuracy: correct items / items, with the 95% Wilson score interval. vs text / vs latent: on the items both "
        "ran, +items only this method got right / -items only the other got right, and the two-sided exact McNemar "
        "p-value. Seconds are per problem as the method costs alone (a step a grid shared counts in full for each "
        "method). Relay bytes: what crossed the agents' edges per problem."
    )


def _sweeps(all_groups: list[Group]) -> list[str]:
    """Per task, model and graph with more than one settings group: one row per (settings, method)."""
    by_run: dict[tuple, list[Group]] = {}
    for g in all_groups:
        by_run.setdefault((g.task, g.model, g.graph), []).append(g)
    parts = []
    for (task, model, graph), gs in by_run.items():
        if len(gs) < 2:
            continue
        header = "| settings | method | accuracy [95% CI] | vs text (McNemar) | s/problem |"
        rows = [header, "|---|---|---|---|---|"]
        for g in gs:
            outcomes = _outcomes(g.records)
            for method, rs in _by_method(g.records).items():
                ok = sum(r.correct for r in rs)
                low, high = wilson_interval(ok, len(rs))
                versus = str(paired_comparison(outcomes[method], outcomes["text"])) if "text" in outcomes else ""
                versus = "" if method == "text" else versus
                seconds = statistics.fmean(r.seconds for r in rs)
                accuracy = f"{ok}/{len(rs)} ({100 * ok / len(rs):.0f}%) [{100 * low:.0f}-{100 * high:.0f}]"
                rows.append(f"| {settings_label(g.settings)} | {method} | {accuracy} | {versus} | {seconds:.1f} |")
        parts += [f"## Sweep: {task}, graph {graph}, model {model}", "", *rows, ""]
    return parts


def _by_method(records: Sequence[ItemResult]) -> dict[str, list[ItemResult]]:
    out: dict[str, list[ItemResult]] = {}
    for r in records:
        out.setdefault(r.relay, []).append(r)
    return out


def _outcomes(records: Sequence[ItemResult]) -> dict[str, dict[str, bool]]:
    return {m: {r.item_id: bool(r.correct) for r in rs} for m, rs in _by_method(records).items()}


def write_plots(records: Sequence[ItemResult], folder: str | Path) -> list[Path]:
    """Two PNGs per group with more than one method (accuracy against relay bytes; seconds per problem), written
    into ``folder``; returns their paths. Needs matplotlib (``pip install 'latent-relay[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'latent-relay[bench]' (or matplotlib)") from err
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number, g in enumerate(groups(records), 1):
        methods = _by_method(g.records)
        if len(methods) < 2:
            continue
        stem = _slug(f"{number:02d}-{g.task}-{g.graph}")
        written.append(_accuracy_plot(plt, g, methods, folder / f"{stem}-accuracy-vs-bytes.png"))
        written.append(_seconds_plot(plt, g, methods, folder / f"{stem}-seconds.png"))
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")


def _accuracy_plot(plt, g: Group, methods: dict[str, list[ItemResult]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5.5 + 0.25 * len(methods)))
    markers = "osD^v<>pPX*h"
    for i, (method, rs) in enumerate(methods.items()):
        ok = sum(r.correct for r in rs)
        p, (low, high) = ok / len(rs), wilson_interval(ok, len(rs))
        size = statistics.fmean(r.relay_bytes for r in rs) / 1e6
        label = f"{method}: {ok}/{len(rs)}"
        if size <= 0:  # the single agent relays nothing: its accuracy as a band
            ax.axhspan(100 * low, 100 * high, color="0.88", zorder=0, label=f"{label} (no relay; band: 95% CI)")
            ax.axhline(100 * p, color="0.5", lw=1, zorder=1)
            continue
        yerr = [[100 * (p - low)], [100 * (high - p)]]
        ax.errorbar(size, 100 * p, yerr=yerr, fmt=markers[i % len(markers)], capsize=4, color=f"C{i % 10}", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("relay per problem (MB, log scale)")
    ax.set_ylabel("accuracy (%), 95% Wilson interval")
    ax.set_title(f"{g.task}, {g.graph}: accuracy against relay bytes\n{settings_label(g.settings)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _seconds_plot(plt, g: Group, methods: dict[str, list[ItemResult]], path: Path) -> Path:
    names = list(methods)
    seconds = [statistics.fmean(r.seconds for r in methods[m]) for m in names]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    bars = ax.barh(names, seconds, color=[f"C{i % 10}" for i in range(len(names))])
    ax.bar_label(bars, labels=[f"{s:.1f} s" for s in seconds], padding=3, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per problem (mean)")
    ax.set_title(f"{g.task}, {g.graph}: time per method\n{settings_label(g.settings)}", fontsize=10)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
