"""How fast agent steps run on this CPU per model and weight setting, and what each setting costs in fidelity.

    python -m latent_relay.benchmarks.cpu_speed            # both Qwen models, five settings, relay cost
    python -m latent_relay.benchmarks.cpu_speed --models qwen2.5-coder-1.5b --settings float32,bfloat16
    python -m latent_relay.benchmarks.cpu_speed --relay-items 0   # no relay cost: ~10 min
    python -m latent_relay.benchmarks.cpu_speed --quick    # smollm2-135m, tiny shapes, a few minutes (a smoke test)

For each model, the settings run one after another in one process (one copy of the model in memory at a time):
prefill tokens/s (``--batch`` prompts of ``--prompt`` tokens, and one prompt), decoding tokens/s at batch 1 and
``--batch`` (greedy, ``--tokens`` tokens per item), and latent thoughts/s at ``--batch`` (one thought for each item
per step, as plain latent relay runs them), each per item: a batch-8 step counts 8. Phases are timed inside one
agent step (:mod:`latent_relay.benchmarks.step_phases`). Rates are medians over ``--repeats``; a setting's ratio
is its rate over float32's (higher is faster).

Fidelity: NLL per token of GSM8K reference solutions (``--items`` items, :mod:`latent_relay.benchmarks.answer_nll`)
under each setting, its paired difference to float32 with a 95% bootstrap interval over items, and how often the
most likely token is float32's.

Relay cost: seconds per GSM8K item for the single agent, text relay and latent relay (``--relay-items`` items as one
batch, :mod:`latent_relay.benchmarks.relay_seconds`) under each of ``--relay-settings``, as ratios to float32.

Settings are ``relay run --weights`` settings (:mod:`latent_relay.agents.weights`): ``float32`` and ``bfloat16``
load the model in that dtype; ``int8`` and ``int4`` are bfloat16 with every linear layer (output head included) on
torch's int8 or int4 (32-input groups) weight-only CPU kernel; ``row-int8`` is float32 with every linear layer on
int8 dot products (``torch._int_mm``), int8 weights per output row and each token's activations quantized on the fly
with its own scale. ``dynamic-int8`` (here only, on request) is torch.ao's dynamic int8 linear, one activation scale
per call, which one outlier token ruins.

Whether bfloat16 can be fast depends on the CPU: the first lines say what torch sees (native bf16 dot products:
AVX512_BF16 or AMX; without them oneDNN reports bf16 unsupported and bf16 matmuls take a slow path). To see such a
CPU on one with native bf16, limit torch before it starts (fbgemm, behind ``dynamic-int8``, is not limited)::

    export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
    python -m latent_relay.benchmarks.cpu_speed
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch

from latent_relay.agents.models import hide_loading_progress, resolve_model
from latent_relay.agents.runner import ModelRunner
from latent_relay.agents.weights import SETTINGS as WEIGHT_SETTINGS
from latent_relay.benchmarks.answer_nll import (
    AnswerScore,
    mean_per_token,
    paired_difference,
    reference_items,
    score_answers,
    top1_agreement,
)
from latent_relay.benchmarks.relay_seconds import ModeCost, cost_lines, relay_costs
from latent_relay.benchmarks.step_phases import StepTimes, random_prompts, time_step

#: The ``--weights`` settings, and torch.ao's dynamic int8 (float32, then :func:`quantize_dynamic_int8`).
SETTINGS = (*WEIGHT_SETTINGS, "dynamic-int8")
#: What a plain run measures: ``dynamic-int8`` loses too much (see the results file), so only on request.
DEFAULT_SETTINGS = ("float32", "bfloat16", "int8", "int4", "row-int8")
#: Environment variables that make torch use less of the CPU than it has (to see a CPU without native bf16).
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
#: Column -> (what it reads from a batch-``B`` and a batch-1 step, as a per-item rate).
METRICS = {
    "prefill b{B}": lambda a, big, one: a.batch * a.prompt / big.prefill,
    "prefill b1": lambda a, big, one: a.prompt / one.prefill,
    "decode b1": lambda a, big, one: 1 / one.decode,
    "decode b{B}": lambda a, big, one: a.batch / big.decode,
    "thoughts b{B}": lambda a, big, one: a.batch / big.thought,
}


def cpu_features() -> list[str]:
    """What this CPU offers and what torch makes of it."""
    flags: set[str] = set()
    name = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
    mkldnn = torch.ops.mkldnn
    bf16 = mkldnn._is_mkldnn_bf16_supported() if hasattr(mkldnn, "_is_mkldnn_bf16_supported") else "unknown"
    fp16 = mkldnn._is_mkldnn_fp16_supported() if hasattr(mkldnn, "_is_mkldnn_fp16_supported") else "unknown"
    listed = " ".join(f"{f}{'+' if f in flags else '-'}" for f in CPU_FLAGS) if flags else "(no /proc/cpuinfo)"
    limits = " ".join(f"{k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k))
    return [
        f"CPU: {name}, {torch.get_num_threads()} torch threads; torch {torch.__version__}",
        f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; oneDNN bf16 supported: {bf16}, "
        f"fp16 supported: {fp16}",
        f"flags: {listed}",
        *([f"limited by: {limits}"] if limits else []),
    ]


def quantize_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (float32) with every ``nn.Linear`` swapped for torch's dynamic int8 linear, in place."""
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def load(model: str, setting: str):
    """The loaded model (:class:`~latent_relay.agents.models.LoadedModel`) under ``setting``."""
    if setting == "dynamic-int8":
        loaded = resolve_model(model, weights="float32")
        quantize_dynamic_int8(loaded.model)
        return loaded
    return resolve_model(model, weights=setting)


def time_setting(runner: ModelRunner, args) -> list[tuple[StepTimes, StepTimes]]:
    """Per repeat: (the batch step's times, the batch-1 step's times)."""
    big, one = random_prompts(args.batch, args.prompt), random_prompts(1, args.prompt, seed=1)
    time_step(runner, random_prompts(2, 8), 2, 3)  # warm-up: first-call allocations and kernel selection
    return [
        (time_step(runner, big, args.thoughts, args.tokens), time_step(runner, one, 0, args.tokens))
        for _ in range(args.repeats)
    ]


def speed_table(times: dict[str, list[tuple[StepTimes, StepTimes]]], args) -> list[str]:
    columns = [c.format(B=args.batch) for c in METRICS]
    base_name = "float32" if "float32" in times else next(iter(times))
    rates = {
        name: [statistics.median(fn(args, *pair) for pair in runs) for fn in METRICS.values()]
        for name, runs in times.items()
    }
    lines = [f"{'setting':12}" + "".join(f"{c:>22}" for c in columns)]
    for name, values in rates.items():
        cells = [f"{v:12.1f} ({v / b:5.2f}x)" for v, b in zip(values, rates[base_name], strict=True)]
        lines.append(f"{name:12}" + "".join(f"{c:>22}" for c in cells))
    return [*lines, f"per-item rates (tokens or thoughts per second), medians of repeats; (Nx) = rate / {base_name}'s"]


def fidelity_lines(scores: dict[str, list[AnswerScore]], tokens: int) -> list[str]:
    base_name = "float32" if "float32" in scores else next(iter(scores))
    base = scores[base_name]
    lines = [f"fidelity: NLL per token of {len(base)} GSM8K reference solutions ({tokens} tokens)"]
    for name, s in scores.items():
        line = f"{name:12} NLL/token {mean_per_token(s):.4f}"
        if name != base_name:
            mean, lo, hi = paired_difference(s, base)
            agree = top1_agreement(s, base)
            line += f"   vs {base_name}: {mean:+.4f} [95% {lo:+.4f}, {hi:+.4f}], top-1 same {agree:.1%}"
        lines.append(line)
    return lines


def relay_cost_block(costs: dict[str, dict[str, ModeCost]], args) -> list[str]:
    head = f"relay cost: seconds per GSM8K item, budget {args.relay_budget} tokens, 10 latent thoughts per agent"
    return [head, *cost_lines(costs)]


def run_model(model: str, settings: list[str], args) -> None:
    """Each setting in turn (one model in memory at a time): load, time, score the references."""
    started = time.perf_counter()
    times, scores, costs, items = {}, {}, {}, None
    for setting in settings:
        load_start = time.perf_counter()
        loaded = load(model, setting)
        runner = ModelRunner.from_loaded(loaded)
        ready = time.perf_counter() - load_start
        items = items or reference_items(runner.tokenizer, args.items, args.data_dir)
        times[setting] = time_setting(runner, args)
        scores[setting] = score_answers(runner, items)
        done = "timed and scored"
        if args.relay_items and setting in args.relay_settings:
            costs[setting] = relay_costs(
                loaded, args.relay_items, budget=args.relay_budget, latent_steps=10, data_dir=args.data_dir
            )
            done += ", relay modes run"
        print(f"  {model} {setting}: ready in {ready:.1f}s, {done}", flush=True)
        del runner, loaded
        gc.collect()
    print(
        f"\n{model}: batch {args.batch}, {args.prompt}-token prompts, {args.thoughts} thoughts, {args.tokens} tokens, "
        f"median of {args.repeats} repeats"
    )
    print("\n".join(speed_table(times, args)))
    print("\n".join(fidelity_lines(scores, sum(len(i.answer) for i in items))))
    if costs:
        print("\n".join(relay_cost_block(costs, args)))
    print(f"({model}: {time.perf_counter() - started:.0f}s)\n", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen2.5-coder-1.5b,qwen2.5-coder-0.5b")
    choices = ", ".join(SETTINGS)
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"comma-separated, of {choices}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens of the timed steps")
    parser.add_argument("--thoughts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8, help="tokens decoded per item (at least 2)")
    parser.add_argument("--items", type=int, default=16, help="GSM8K items for the NLL")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", default=None, help="the shared data folder (default: as `relay run` finds it)")
    parser.add_argument("--relay-items", type=int, default=2, help="GSM8K items for the relay cost (0: skip it)")
    parser.add_argument(
        "--relay-settings", default="float32,bfloat16", help="settings whose relay cost is measured (comma-separated)"
    )
    parser.add_argument(
        "--relay-budget",
        type=int,
        default=256,
        help="decoding budget per agent of the relay cost (default 256: a float32 text relay of the 1.5B model "
        "over 2 items took 12 minutes with it; the float32 + bfloat16 run of that model, 27 minutes)",
    )
    parser.add_argument("--quick", action="store_true", help="smollm2-135m, batch 2, 16-token prompts, 2 items")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.prompt, args.thoughts, args.tokens = "smollm2-135m", 2, 16, 2, 3
        args.items, args.repeats, args.relay_items, args.relay_budget = 2, 1, 1, 8
    if args.tokens < 2 or min(args.batch, args.prompt, args.thoughts, args.items, args.repeats) < 1:
        raise SystemExit("--tokens needs at least 2; --batch, --prompt, --thoughts, --items, --repeats at least 1")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.relay_settings = [s.strip() for s in args.relay_settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise SystemExit(f"unknown settings {unknown or args.settings!r}; choose from {', '.join(SETTINGS)}")
    hide_loading_progress()
    print("\n".join(cpu_features()), flush=True)
    started = time.perf_counter()
    for model in (m.strip() for m in args.models.split(",") if m.strip()):
        run_model(model, settings, args)
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
