"""``relay report FILE...``: the side-by-side tables of saved records.

One table per task and model (name and fingerprint), one row per relay mode. Each item of a run counts once, by
its latest record (an error record retried by ``--resume`` counts as its retry). Runs that share a relay mode but
differ in their graph or settings (latent steps, latent input, decoding, a graph's own settings) get a row each,
labelled with what differs, so that no row mixes the records of two runs.
"""

from __future__ import annotations

from typing import Any

from latent_relay.relay.results import ItemResult, latest_records, run_key, summarize


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"decoding": {"max_new_tokens": 8}}`` -> ``{"decoding.max_new_tokens": "8"}``."""
    out: dict[str, str] = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = str(value)
    return out


def _features(r: ItemResult) -> dict[str, str]:
    return {"graph": r.graph, **_flat(r.settings)}


def _row_labels(runs: list[ItemResult]) -> dict[tuple, str]:
    """Row label of each run (keyed by :func:`run_key`; ``runs`` holds one record of each): the relay mode, plus
    what tells it apart from the other runs of that relay mode (its graph, its settings, else its graph digest)."""
    labels = {}
    for r in runs:
        mine = _features(r)
        peers = [_features(p) for p in runs if p.relay == r.relay and p is not r]
        if not peers:
            labels[run_key(r)] = r.relay
            continue
        names = sorted({n for p in peers for n in {*mine, *p} if p.get(n) != mine.get(n)})
        bits = [f"{n}={mine.get(n, '-')}" for n in names] or [f"graph digest {r.graph_digest or '-'}"]
        labels[run_key(r)] = f"{r.relay} [{', '.join(bits)}]"
    return labels


def report(records: list[ItemResult]) -> str:
    """The tables of ``records`` (from any number of files and runs)."""
    records = latest_records(records)
    groups: dict[tuple[str, str, str], list[ItemResult]] = {}
    for r in records:
        groups.setdefault((r.task, r.model, r.model_fingerprint), []).append(r)
    parts = []
    for (task, model, fingerprint), rows in groups.items():
        runs = {run_key(r): r for r in rows}
        labels = _row_labels(list(runs.values()))
        labelled = [r.model_copy(update={"relay": labels[run_key(r)]}) for r in rows]
        named = f"{model or '(unnamed model)'}" + (f" ({fingerprint[:12]})" if fingerprint else "")
        graphs = ", ".join(dict.fromkeys(r.graph for r in rows))
        parts.append(f"{task}, {len({r.item_id for r in rows})} items, graphs {graphs}, model {named}")
        parts.append(summarize(labelled))
    return "\n".join(parts)
