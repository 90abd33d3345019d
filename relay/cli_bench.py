"""``relay bench``: a grid of methods x tasks x graphs x settings on the same items, then its report.

Locally the grid shares the agent steps its cells have in common (:mod:`latent_relay.relay.runtime.bench_grid`); on Ray
(one setting only: each setting would be a runtime of its own) each cell runs as ``relay compare`` would run it.
Every record is appended to ``--out`` as its batch ends, and ``--resume`` picks a grid up where it stopped. The
report (``report.md`` and PNG plots, :mod:`latent_relay.relay.bench_report`) is written at the end from every record
of the grid's cells in ``--out`` (those of earlier runs resumed included), also after Ctrl-C (exit status 130).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from latent_relay.relay.cli_checks import UsageError, check_run_args


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def bench(args) -> int:
    from latent_relay.relay.results import ResultWriter, read_results, run_key
    from latent_relay.relay.runtime.bench_grid import (
        GridError,
        Setting,
        grid_cells,
        parse_settings,
    )
    from latent_relay.tasks.registry import get_task

    if not args.out:
        raise UsageError("relay bench needs --out (the JSONL file that keeps every item's record)")
    tasks = args.task or ["gsm8k"]
    graph_names = args.graph or ["sequential"]
    methods = list(dict.fromkeys(args.method or ["single", "text", "latent"]))
    if "single" in graph_names:
        raise UsageError("--graph single: the one-agent baseline is a method here; use --method single")
    check_run_args(args, methods)
    base = Setting(args.latent_steps, args.latent_input, args.soft_temperature, max_new_tokens=args.max_new_tokens)
    try:
        settings, varied = parse_settings(args.set, base)
    except GridError as err:
        raise UsageError(str(err)) from None
    if args.runtime == "ray" and len(settings) > 1:
        raise UsageError("--set with several values runs with --runtime local (each setting is a runtime on Ray)")
    task_objects = [get_task(t) for t in tasks]
    cells = {t.name: grid_cells(t, graph_names, methods, settings) for t in task_objects}  # validates recipes
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from latent_relay.relay.cli import run_mode, runtime_for

    count = sum(len(c) for c in cells.values())
    print(
        f"bench: {len(tasks)} task(s) x {len(graph_names)} graph(s) x {len(methods)} method(s) x {len(settings)} "
        f"setting(s) = {count} runs of {args.n} items" + (f" (varying {', '.join(varied)})" if varied else ""),
        file=sys.stderr,
    )
    keys, ids = set(), {}
    interrupted = False
    with ResultWriter(args.out) as writer:
        runtime = runtime_for(args)
        try:
            for task in task_objects:
                items = task.load(args.offset + args.n, data_dir=args.data_dir)[args.offset :]
                ids[task.name] = {str(it.id) for it in items}
                if args.runtime == "ray":
                    for cell in cells[task.name]:
                        key = run_key(runtime.record_builder(cell.graph, task, cell.method).template())
                        keys.add(key)
                        done = writer.done(key, retry_errors=not args.no_retry_errors) if args.resume else set()
                        todo = [it for it in items if str(it.id) not in done]
                        run_mode(runtime, cell.graph, task, todo, cell.method, args, writer)
                else:
                    _run_task(runtime, task, cells[task.name], items, writer, varied, args)
                    keys |= {run_key(c.records.template()) for c in cells[task.name]}
        except KeyboardInterrupt:
            interrupted = True
            keys |= {run_key(c.records.template()) for cs in cells.values() for c in cs if c.records is not None}
            print("interrupted: the report covers the records written so far (--resume continues)", file=sys.stderr)
        finally:
            close = getattr(runtime, "close", None)
            if close is not None:
                close()
    records = [r for r in read_results(args.out) if run_key(r) in keys and r.item_id in ids.get(r.task, ())]
    status = _write_report(records, args) if records else 0
    return 130 if interrupted else status


def _run_task(runtime, task, cells, items, writer, varied, args) -> None:
    """One task's cells through the local grid, with a progress line per batch."""
    from latent_relay.relay.runtime import bench_grid

    started = time.perf_counter()

    def progress(p) -> None:
        if args.quiet:
            return
        label = lambda c: c.method + (f" [{c.setting.label(varied)}]" if varied else "")  # noqa: E731
        scores = " . ".join(f"{label(c)} {c.correct}/{c.done}" for c in p.cells if c.done)
        left = p.elapsed / p.batch * (p.batches - p.batch)
        shared = f"; {p.memo.hits} shared steps saved {_minutes(p.memo.saved_seconds)}" if p.memo.hits else ""
        print(
            f"[bench {task.name}] batch {p.batch}/{p.batches}: {scores or 'all resumed'} | "
            f"{_minutes(p.elapsed)}, ~{_minutes(left)} left{shared}",
            file=sys.stderr,
        )

    _, memo = bench_grid.run_grid(
        runtime,
        cells,
        items,
        batch_size=args.batch_size,
        writer=writer,
        resume=args.resume,
        retry_errors=not args.no_retry_errors,
        on_batch=progress,
    )
    print(
        f"[bench {task.name}] done in {_minutes(time.perf_counter() - started)}; {memo.misses} agent steps computed, "
        f"{memo.hits} shared ({_minutes(memo.saved_seconds)} saved)",
        file=sys.stderr,
    )


def _write_report(records, args) -> int:
    from latent_relay.relay.bench_report import groups, markdown_report, write_plots
    from latent_relay.relay.results import summarize

    folder = Path(args.report or str(Path(args.out).with_suffix("")) + "-report")
    folder.mkdir(parents=True, exist_ok=True)
    plots = []
    if not args.no_plots:
        try:
            plots = write_plots(records, folder)
        except ImportError as err:
            print(f"warning: {err}; writing the tables only", file=sys.stderr)
    (folder / "report.md").write_text(markdown_report(records, [p.relative_to(folder) for p in plots]) + "\n")
    for g in groups(records):
        print(f"\n{g.title}\n{summarize(g.records)}")
    print(
        f"\nper-item records: {args.out}\nreport: {folder / 'report.md'}" + (f" ({len(plots)} plots)" if plots else "")
    )
    failed = [m for m in {r.relay for r in records} if all(r.error for r in records if r.relay == m)]
    if failed:
        print(f"error: every item failed under method {', '.join(sorted(failed))}", file=sys.stderr)
        return 1
    return 0
