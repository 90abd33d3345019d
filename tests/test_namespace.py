"""One import namespace: the repository's folders never shadow another distribution's import name.

transformers 5.25 imports Hugging Face's ``kernels`` distribution while it loads any model class; when our
``kernels/`` folder was a top-level package, no model loaded. These tests fail if a top-level folder becomes
importable as a bare name again (an ``__init__.py`` in it, or a packaging change), both in the installed package and
in a Python started in the repository root.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import latent_relay

ROOT = Path(__file__).resolve().parents[1]
#: Every top-level folder with Python files, except the namespace itself and the tests.
FOLDERS = sorted(
    p.name for p in ROOT.iterdir() if p.is_dir() and any(p.glob("*.py")) and p.name not in ("latent_relay", "tests")
)


def run_python(args: list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_folders_are_the_namespace_subpackages():
    assert set(latent_relay.SUBPACKAGES) <= set(FOLDERS)
    assert set(FOLDERS) - set(latent_relay.SUBPACKAGES) == {"examples"}


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_top_level_folder_is_a_regular_package(folder):
    assert not (ROOT / folder / "__init__.py").exists(), (
        f"{folder}/__init__.py makes `{folder}` importable as a bare name from the repository root, shadowing any "
        f"installed distribution of that import name; the folder is `latent_relay.{folder}` (latent_relay/__init__.py)"
    )


def test_repository_root_never_shadows_installed_names(tmp_path):
    """Plant a regular package under every folder's name on PYTHONPATH: a Python started in the repository root
    (where the folders sit on ``sys.path[0]``) must import the planted ones, and the project must still work."""
    for name in FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("WHO = 'installed'\n")
    names = ", ".join(FOLDERS)
    code = (
        f"import {names}; import latent_relay.relay.wire, latent_relay.kernels.dispatch; "
        f"print(' '.join(m.WHO for m in ({names},)))"
    )
    done = run_python(["-c", code], cwd=ROOT, extra_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["installed"] * len(FOLDERS)


def test_hugging_face_kernels_is_the_one_imported_here():
    importlib.metadata.distribution("kernels")  # transformers brings it; the dev extras ask for it as well
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().parent != (ROOT / "kernels").resolve()


def run_probe(cwd: Path, extra_path: Path | None = None) -> dict:
    """Run tests/namespace_probe.py by its path from ``cwd`` (so ``sys.path[0]`` is ``cwd``) and check its findings."""
    code = f"import runpy; runpy.run_path({str(ROOT / 'tests' / 'namespace_probe.py')!r}, run_name='__main__')"
    return _probe_result(run_python(["-c", code], cwd=cwd, extra_path=extra_path))


def _probe_result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"latent_relay.relay.wire", "latent_relay.agents.runner", "latent_relay.kernels.obf"} <= set(
        result["modules"]
    )
    assert result["models"] == ["Qwen2ForCausalLM", "LlamaForCausalLM"]
    assert "site-packages" in result["kernels_file"]
    return result


def test_every_module_imports_and_models_load_from_the_repository_root():
    _probe_result(run_python(["-m", "tests.namespace_probe"], cwd=ROOT))


def test_every_module_imports_and_models_load_through_the_installed_package(tmp_path):
    assert run_probe(tmp_path)["modules"][0] == "latent_relay"


def test_the_wheel_holds_one_namespace_and_works(tmp_path):
    """Build the wheel as a user's ``pip install`` would, unpack it and run the probe against it alone. It is built
    from a copy of the sources, so no ``build/`` folder is left in the checkout (a stale one would ship deleted
    modules in a later wheel)."""
    skip = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "out")
    source = shutil.copytree(ROOT, tmp_path / "source", ignore=skip)
    pip_wheel = ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)]
    built = run_python(pip_wheel, ROOT)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("latent_relay-*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        shipped = set(archive.namelist())
        sources = {
            f"latent_relay/{p.relative_to(ROOT)}"
            for sub in latent_relay.SUBPACKAGES
            for p in (ROOT / sub).rglob("*.py")
        }
        assert sources | {"latent_relay/__init__.py", "latent_relay/kernels/cpu_obf.c"} <= shipped
        archive.extractall(unpacked)
    assert {t for t in tops if not t.endswith(".dist-info")} == {"latent_relay"}
    result = run_probe(tmp_path, extra_path=unpacked)
    wire_package = unpacked / "latent_relay" / "relay" / "wire" / "__init__.py"
    assert Path(result["wire_file"]).resolve() == wire_package.resolve()


def test_no_source_imports_a_folder_by_its_bare_name():
    """From the repository root ``import agents`` would still find the ``agents/`` folder as a namespace package (it
    cannot shadow an installed ``agents``, which wins, but it would load our modules a second time under other
    names): every import, in code or in code held in a string, goes through ``latent_relay``."""
    bare = re.compile(rf"^\s*[\"']?\s*(?:from|import)\s+({'|'.join(FOLDERS)})\b", re.M)
    offenders = []
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") or part in ("build", "dist") for part in path.relative_to(ROOT).parts):
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                tops = [m.group(1) for m in bare.finditer(node.value)]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {top}" for top in tops if top in FOLDERS]
    assert not offenders, "bare imports of repository folders:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module", ["latent_relay", "latent_relay.relay.cli"])
def test_the_command_runs_as_a_module_from_the_repository_root(module):
    done = run_python(["-m", module, "models"], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "smollm2-135m" in done.stdout
