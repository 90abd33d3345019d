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


def summarize(results: Sequence[ItemResult], baseline: str | None = None, reference: str = "text") -> str:
    """A side-by-side table, one row per relay mode: accuracy with its 95% Wilson interval, the paired comparison
    with the ``reference`` mode on the same items (items only this mode got right / only the reference got right,
    exact McNemar p), tokens, seconds, bytes (and ratio to full). Each item of a run counts once, by its latest
    record (:func:`latest_records`); a record with an error counts as wrong."""
    results = latest_records(results)
    modes: list[str] = []
    for r in results:
        if r.relay not in modes:
            modes.append(r.relay)
    rows = []
    full = None
    outcomes = {m: {r.item_id: bool(r.correct) for r in results if r.relay == m} for m in modes}
    for mode in modes:
        rs = [r for r in results if r.relay == mode]
        ok = sum(r.correct for r in rs)
        low, high = wilson_interval(ok, len(rs))
        versus = ""
        if mode != reference and reference in outcomes:
            versus = str(paired_comparison(outcomes[mode], outcomes[reference]))
        mean_bytes = statistics.fmean(r.relay_bytes for r in rs)
        if mode == (baseline or "latent"):
            full = mean_bytes
        rows.append(
            [
                mode,
                f"{ok}/{len(rs)} ({100 * ok / len(rs):.0f}%) [{100 * low:.0f}-{100 * high:.0f}]",
                versus,
                f"{statistics.fmean(r.output_tokens for r in rs):.0f}",
                f"{statistics.fmean(r.seconds for r in rs):.1f}",
                human_bytes(mean_bytes),
                mean_bytes,
                sum(r.error is not None for r in rs),
            ]
        )
    header = ["relay", "accuracy [95% CI]", f"vs {reference} (McNemar)", "out tokens", "s/problem", "relay bytes"]
    header += ["vs full", "errors"]
    table = []
    for row in rows:
        ratio = f"{full / row[6]:.1f}x smaller" if full and row[6] and row[0].startswith("latent+") else ""
        table.append([*row[:6], ratio, str(row[7])])
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in table)])
