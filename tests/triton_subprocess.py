"""Run a Triton check script in a fresh Python under ``TRITON_INTERPRET=1`` (the interpreter must be chosen before
triton is imported) and require that it ends with an ``OK ...`` line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from latent_relay.kernels import dispatch

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: Path, *args: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop(dispatch.ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("OK ")
