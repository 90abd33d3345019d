"""Which dtype runs agent steps fastest on this machine: prefill, latent thoughts and decoding timed per dtype.

The default weights of `relay run` (`latent_relay.agents.weights.default_setting`: bfloat16 where the CPU has native
bf16 units, else float32) rest on this benchmark and on `cpu_speed`, and the answer depends on the CPU. CPUs without
native bf16 dot products (AVX2 only; AVX-512 parts without AVX512_BF16, such as Skylake-SP to Ice Lake) run bf16
matmuls through a slow path, so a compute-bound prefill can be several times slower in bf16 than in fp32 even though
bf16 halves the weight bytes. CPUs with AVX512_BF16 (AMD Zen 4 and later, Intel Cooper Lake) or AMX (Intel Sapphire
Rapids and later) run them natively: the project's 2-core AMD EPYC build machine has AVX512_BF16 and AVX512_VNNI (no
AMX), and there bf16 prefill was about 4.4x *faster* than fp32 on qwen2.5-coder-1.5b
(`benchmarks/results/cpu_speed_2026-12-07.txt`, which also limits torch to AVX2 to show the other case).
`python -m latent_relay.benchmarks.cpu_speed` prints what torch sees on your CPU.

    python -m latent_relay.benchmarks.cpu_dtype                # default bundled model, batch 8, 200-token prompts
    python -m latent_relay.benchmarks.cpu_dtype --model smollm2-135m --quick

Each phase is timed `--repeats` times on the same inputs; the table shows medians and the ratio to the first dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from latent_relay.agents.decoding import DecodeConfig
from latent_relay.agents.models import resolve_model
from latent_relay.agents.runner import ModelRunner


def time_phases(runner: ModelRunner, batch: int, prompt: int, thoughts: int, tokens: int, repeats: int) -> dict:
    """Median seconds of: prefill alone, prefill + thoughts, prefill + decoding (greedy, no EOS stop)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 5000, (prompt,), generator=gen).tolist() for _ in range(batch)]
    decode = DecodeConfig(max_new_tokens=tokens)
    runner._eos_ids = set  # decode every token: random prompts may otherwise stop at EOS early
    runs = {
        "prefill": lambda: runner.step([None] * batch, prompts, "a", observe=False),
        "thoughts": lambda: runner.step([None] * batch, prompts, "a", thoughts=thoughts),
        "decode": lambda: runner.step([None] * batch, prompts, "a", decode=decode),
    }
    out = {}
    for name, fn in runs.items():
        fn()  # warm-up: first-call allocations and kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    out["thoughts"] = max(out["thoughts"] - out["prefill"], 0.0) / max(thoughts, 1)
    out["decode"] = max(out["decode"] - out["prefill"], 0.0) / max(tokens - 1, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=200)
    parser.add_argument("--thoughts", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="batch 2, 32-token prompts, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.prompt, args.thoughts, args.tokens, args.repeats = 2, 32, 3, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name in args.dtypes.split(","):
        loaded = resolve_model(args.model, dtype=name.strip())
        runner = ModelRunner.from_loaded(loaded)
        timed = time_phases(runner, args.batch, args.prompt, args.thoughts, args.tokens, args.repeats)
        rows.append((name.strip(), timed))
        del runner, loaded

    print(
        f"\n{args.model}, batch {args.batch}, {args.prompt}-token prompts, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    base = rows[0][1]
    print(f"{'dtype':10} {'prefill s':>10} {'thought ms':>11} {'decode ms/tok':>14}   ratio to {rows[0][0]}")
    for name, t in rows:
        ratios = " / ".join(f"{t[k] / base[k]:.2f}x" if base[k] else "-" for k in ("prefill", "thoughts", "decode"))
        print(f"{name:10} {t['prefill']:10.2f} {t['thoughts'] * 1e3:11.0f} {t['decode'] * 1e3:14.0f}   {ratios}")


if __name__ == "__main__":
    main()
