"""Per-item result records (JSON lines, appended and flushed as they complete) and the summary tables."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, Field


class ItemResult(BaseModel):
    """What one task item produced under one graph and relay mode."""

    item_id: str
    task: str
    graph: str
    relay: str
    model: str = ""
    answer: str = ""
    gold: str = ""
    correct: bool = False
    output_tokens: int = 0
    latent_steps: int = 0
    seconds: float = 0.0
    node_seconds: dict[str, float] = Field(default_factory=dict)
    edge_bytes: dict[str, int] = Field(default_factory=dict)
    edge_metrics: dict[str, dict] = Field(default_factory=dict)
    relay_bytes: int = 0
    error: str | None = None


class ResultWriter:
    """Appends records to a JSONL file line by line, flushing each, and knows which items are already done."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def done(self, relay: str) -> set[str]:
        """Item ids already recorded for ``relay`` (for ``--resume``)."""
        return (
            {r.item_id for r in read_results(self.path) if r.relay == relay}
            if self.path and self.path.exists()
            else set()
        )

    def write(self, results: Iterable[ItemResult]) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for r in results:
                f.write(r.model_dump_json() + "\n")
                f.flush()


def read_results(path: str | Path) -> list[ItemResult]:
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(ItemResult.model_validate(json.loads(line)))
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def summarize(results: Sequence[ItemResult], baseline: str | None = None) -> str:
    """A side-by-side table, one row per relay mode: accuracy, tokens, seconds, bytes (and ratio to full)."""
    modes: list[str] = []
    for r in results:
        if r.relay not in modes:
            modes.append(r.relay)
    rows = []
    full = None
    for mode in modes:
        rs = [r for r in results if r.relay == mode]
        ok = sum(r.correct for r in rs)
        mean_bytes = statistics.fmean(r.relay_bytes for r in rs)
        if mode == (baseline or "latent"):
            full = mean_bytes
        rows.append(
            [
                mode,
                f"{ok}/{len(rs)} ({100 * ok / len(rs):.0f}%)",
                f"{statistics.fmean(r.output_tokens for r in rs):.0f}",
                f"{statistics.fmean(r.seconds for r in rs):.1f}",
                human_bytes(mean_bytes),
                mean_bytes,
                sum(r.error is not None for r in rs),
            ]
        )
    header = ["relay", "accuracy", "out tokens", "s/problem", "relay bytes", "vs full", "errors"]
    table = []
    for row in rows:
        ratio = f"{full / row[5]:.1f}x smaller" if full and row[5] and row[0].startswith("latent+") else ""
        table.append([row[0], row[1], row[2], row[3], row[4], ratio, str(row[6])])
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in table)])
