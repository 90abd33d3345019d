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
