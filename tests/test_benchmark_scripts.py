"""The benchmark scripts still run end to end (their --quick modes, seconds each): a benchmark that only breaks
when someone needs its numbers is found too late."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["codec", "--quick", "--repeats", "1"], ["raw encode + decode vs memcpy", "hops again"]),
        (["compression_overhead", "--quick", "--rounds", "1"], ["L-OBF loop (paper)", "relative |delta|"]),
        (["ray_transport", "--quick", "--repeats", "1"], ["numpy / bytes", "relay hop between two hosts"]),
        (
            ["cpu_speed", "--quick"],
            ["torch CPU capability", "decode b2", "vs float32", "top-1 same", "relay cost", "latent s/item"],
        ),
        pytest.param(
            ["asl_longctx", "--quick"],
            ["accuracy by KV budget", "ASL selection layer L*", "prefill time / full"],
            id="asl_longctx",
        ),
    ],
)
def test_quick_benchmark_runs(args, expect):
    module, *options = args
    command = [sys.executable, "-m", f"latent_relay.benchmarks.{module}", *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for text in expect:
        assert text in done.stdout


def test_compression_overhead_asks_for_a_gpu_it_cannot_see():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device; the GPU run is a device check, not a unit test")
    args = ["latent_relay.benchmarks.compression_overhead", "--quick", "--device", "cuda"]
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "torch sees no CUDA device" in done.stderr


def test_gpu_smoke_quick_runs_every_mode_at_fixed_token_counts():
    """The GPU smoke benchmark's tiny CPU run: one row per mode, every decoding agent decodes exactly its 8 tokens (no
    end of sequence on a random model), and compressed relays carry fewer bytes than the full memory."""
    args = ["latent_relay.benchmarks.gpu_smoke", "--quick", "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "random Qwen3 2 layers" in done.stdout
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    recipes = ["latent+h-obf:budget=64+int8", "latent+l-obf:budget=32+int4"]
    for mode in ["text", "latent", *recipes]:
        assert mode in rows, done.stdout
    assert rows["text"][4] == "32" and rows["latent"][4] == "8"  # output tokens: 4 agents x 8, the judger's 8
    assert all(float(rows[mode][6]) < 1 for mode in recipes)  # relay bytes / full latent
    assert all(rows[mode][-1].endswith("%") for mode in recipes)  # compression overhead's share


def test_zstd_relay_quick_runs_every_recipe_and_level():
    """The zstd benchmark's smoke test on smollm2-135m: a raw, zstd-1 and zstd-3 row per default recipe and one
    verdict line each."""
    args = ["latent_relay.benchmarks.zstd_relay", "--quick", "--threads", "1"]
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for text in ("hop ms 1G", "hop ms 100G", "zstd-1", "zstd-3", "verdict"):
        assert text in done.stdout
    verdicts = done.stdout.split("verdict")[1].splitlines()[1:-1]  # one line per recipe, then the time
    recipes = ["latent (full)", "h-obf:budget=32", "int8", "l-obf:budget=32+int8", "l-obf:budget=32+int4"]
    assert [line.split(": ")[0] for line in verdicts] == recipes


def test_kernels_gpu_quick_prints_every_kernel_and_hop_per_shape():
    """The GPU kernel benchmark's CPU smoke run (tiny shapes, torch paths): per shape a header, one row per kernel,
    each matching its twin, and a hop row per recipe and kernel path; without a GPU, the full run is a one-line
    error."""
    args = ["latent_relay.benchmarks.kernels_gpu", "--quick"]
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("== ")] == ["== qwen3-4b", "== qwen3-32b"]
    assert all("copy" in line and "torch" in line and "triton" in line for line in lines if line.startswith("== "))
    kernels = ["gather", "residual mean", "backfill shift", "injection"]
    kernels += [f"{step} int{bits}" for bits in (8, 4) for step in ("quantize-pack", "unpack-dequantize")]
    for kernel in kernels:
        rows = [line for line in lines if line.startswith(kernel + "  ")]
        assert len(rows) == 2 and all(" exact" in row or " ok (" in row for row in rows), (kernel, rows)
    hops = [line.split()[:2] for line in lines if line.startswith(("h-obf:budget=8+int8 ", "l-obf:budget=8+int4 "))]
    assert sorted(path for _, path in hops) == ["auto"] * 4 + ["torch"] * 4
    assert "<=50 ms" in done.stdout and "checks: every kernel matches its torch twin" in done.stdout
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, "-m", args[0]], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "torch sees no CUDA device" in done.stderr
