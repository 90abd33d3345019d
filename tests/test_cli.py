"""Bad input on the command line: non-zero exit, one line on stderr, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _relay(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "latent_relay.relay.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_model_reference():
    proc = _relay("run", "--model", "no-such-model-anywhere", "--n", "1", "--quiet")
    _one_line_error(proc, "no-such-model-anywhere", "qwen2.5-coder-0.5b")


def test_missing_data_folder(tmp_path):
    proc = _relay("run", "--data-dir", str(tmp_path / "nowhere"), "--n", "1", "--quiet")
    _one_line_error(proc, "nowhere")


def test_invalid_graph_and_recipe():
    _one_line_error(_relay("run", "--graph", "ring", "--n", "1"), "unknown graph 'ring'")
    _one_line_error(_relay("run", "--relay", "latent+h:budget=-3", "--n", "1"), "recipe")
    _one_line_error(_relay("run", "--relay", "carrier-pigeon", "--n", "1"), "relay mode")
    _one_line_error(_relay("run", "--task", "chess", "--n", "1"), "unknown task")


def test_gguf_checksum_mismatch_is_refused():
    pytest.importorskip("gguf")
    from latent_relay.agents.bundled import BUNDLED, locate_files

    try:
        locate_files(BUNDLED["smollm2-135m"])
    except Exception:
        pytest.skip("bundled smollm2 package not installed")
    code = (
        "import sys, dataclasses\n"
        "from latent_relay.agents import bundled\n"
        "spec = bundled.BUNDLED['smollm2-135m']\n"
        "bundled.BUNDLED['smollm2-135m'] = dataclasses.replace(spec, sha256='0' * 64)\n"
        "from latent_relay.relay.cli import main\n"
        "sys.exit(main(['run', '--model', 'smollm2-135m', '--n', '1', '--quiet']))\n"
    )
    _one_line_error(_relay(code=code), "0000000000", "b179c9523d0e")


def test_inspect_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a packet at all")
    proc = _relay("inspect", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


def test_report_prints_one_row_per_relay_mode(tmp_path):
    from latent_relay.relay.results import ItemResult, ResultWriter

    out = tmp_path / "r.jsonl"
    writer = ResultWriter(out)
    writer.write(
        [
            ItemResult(
                item_id=str(i), task="gsm8k", graph="sequential", relay="latent", correct=i == 0, relay_bytes=4000
            )
            for i in range(2)
        ]
    )
    writer.write(
        [
            ItemResult(
                item_id="0", task="gsm8k", graph="sequential", relay="latent+h:budget=8", correct=True, relay_bytes=1000
            )
        ]
    )
    proc = _relay("report", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("latent ") and "1/2 (50%)" in line for line in lines)
    assert any(line.startswith("latent+h:budget=8") and "4.0x smaller" in line for line in lines)
    _one_line_error(_relay("report", str(tmp_path / "missing.jsonl")), "missing.jsonl")
