"""Per-item result records and their summary tables.

The record and its run key live in :mod:`latent_relay.relay.item_result`, the JSON-lines file that holds them in
:mod:`latent_relay.relay.results_file`; both are importable from here too.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from latent_relay.relay.item_result import ItemResult, RunKey, done_items, latest_records, record_key, run_key
from latent_relay.relay.results_file import (
    ResultsFileBusyError,
    ResultsFileError,
    ResultWriter,
    parse_results,
    read_results,
)
from latent_relay.relay.stats import paired_comparison, wilson_interval

__all__ = [
    "ItemResult",
    "ResultWriter",
    "ResultsFileBusyError",
    "ResultsFileError",
    "RunKey",
    "done_items",
    "human_bytes",
    "latest_records",
    "parse_results",
    "read_results",
    "record_key",
    "run_key",
    "summarize",
]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def summarize(
    results: Sequence[ItemResult],
    baseline: str | None = None,
    reference: str = "text",
    markdown: bool = False,
) -> str:
    """A side-by-side table, one row per relay mode: accuracy with its 95% Wilson interval; paired comparisons on
    the same items with the ``reference`` mode (text relay) and, for compressed recipes, with the full latent relay
    ``baseline`` (items only this mode got right / only the other got right, exact McNemar p); output tokens;
    seconds per problem and the speed-up against the reference; relay bytes per problem and the ratio to full.
    Each item of a run counts once, by its latest record (:func:`latest_records`); a record with an error counts
    as wrong. ``markdown``: a markdown table instead of aligned text."""
    results = latest_records(results)
    full_mode = baseline or "latent"
    modes = list(dict.fromkeys(r.relay for r in results))
    by_mode = {m: [r for r in results if r.relay == m] for m in modes}
    outcomes = {m: {r.item_id: bool(r.correct) for r in rs} for m, rs in by_mode.items()}
    mean = {
        m: (statistics.fmean(r.seconds for r in rs), statistics.fmean(r.relay_bytes for r in rs))
        for m, rs in by_mode.items()
    }
    recipes = any(m.startswith("latent+") for m in modes) and full_mode in modes
    header = ["relay", "accuracy [95% CI]", f"vs {reference} (McNemar)"]
    header += [f"vs {full_mode} (McNemar)"] if recipes else []
    header += ["out tokens", "s/problem", f"speed-up vs {reference}", "relay bytes", f"vs {full_mode}", "errors"]
    table = []
    for mode, rs in by_mode.items():
        ok = sum(r.correct for r in rs)
        low, high = wilson_interval(ok, len(rs))
        seconds, size = mean[mode]
        row = [mode, f"{ok}/{len(rs)} ({100 * ok / len(rs):.0f}%) [{100 * low:.0f}-{100 * high:.0f}]"]
        row.append(_versus(outcomes, mode, reference))
        if recipes:
            row.append(_versus(outcomes, mode, full_mode) if mode.startswith("latent+") else "")
        row += [f"{statistics.fmean(r.output_tokens for r in rs):.0f}", f"{seconds:.1f}"]
        ref_seconds = mean[reference][0] if reference in mean else 0.0
        row.append(f"{ref_seconds / seconds:.1f}x" if mode != reference and ref_seconds and seconds else "")
        row.append(human_bytes(size))
        full_bytes = mean[full_mode][1] if full_mode in mean else 0.0
        row.append(f"{full_bytes / size:.1f}x smaller" if full_bytes and size and mode.startswith("latent+") else "")
        row.append(str(sum(r.error is not None for r in rs)))
        table.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table])
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in table)])


def _versus(outcomes: dict[str, dict[str, bool]], mode: str, other: str) -> str:
    """``mode`` against ``other`` on their shared items, or "" (the same mode, or no ``other``)."""
    if mode == other or other not in outcomes:
        return ""
    return str(paired_comparison(outcomes[mode], outcomes[other]))
