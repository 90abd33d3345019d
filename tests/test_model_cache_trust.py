"""agents/converted_files.py, agents/safetensors_only.py and the model cache's folders: a converted model is loaded
only from an owner-only folder holding exactly the files recorded at conversion, unchanged, and weights are never
unpickled. Tiny model folders in tmp_path stand in for converted GGUF models (nothing real is converted here)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file

import latent_relay.agents.converted_files as converted_files
import latent_relay.agents.models as models
from latent_relay.agents.model_cache import COMPLETE_MARKER, cached_sha256, file_stamp
from latent_relay.agents.models import ConvertedFolderChangedError, ModelReferenceError, resolve_model
from latent_relay.kernels import cache_folder
from latent_relay.kernels.cache_folder import UntrustedCacheError
from tests.model_folders import fake_convert_gguf, save_tiny_with_tokenizer

SHA = "ab" * 32
OPTIONS = {"device": "cpu", "dtype": torch.float32, "attn_implementation": None}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("RELAY_CACHE_DIR", str(root))
    return root


@pytest.fixture
def converted(cache, monkeypatch):
    """A converted folder in the cache, as the first use of a GGUF model leaves it."""
    monkeypatch.setattr(models, "convert_gguf", fake_convert_gguf())
    return models._converted_folder("toy", [], SHA)


def _load(folder):
    return models._load_converted(folder, "toy", **OPTIONS)


def _resolve():
    """What `resolve_model` does for a GGUF model once its source SHA-256 is known."""
    return _load(models._converted_folder("toy", [], SHA))


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


# --- what a conversion records ------------------------------------------------------------------------------


def test_a_conversion_is_owner_only_and_records_every_file_it_wrote(cache, monkeypatch):
    monkeypatch.setattr(models, "convert_gguf", fake_convert_gguf())
    previous = os.umask(0o002)  # a umask that would make new folders group-writable
    try:
        folder = models._converted_folder("toy", [], SHA)
    finally:
        os.umask(previous)
    assert [_mode(f) for f in (cache, cache / "models", folder)] == [0o700] * 3
    assert {_mode(p) for p in folder.iterdir()} == {0o600}
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["format"] == 2 and marker["source_sha256"] == SHA
    written = {p.name for p in folder.iterdir()} - {COMPLETE_MARKER}
    assert set(marker["files"]) == written and {"model.safetensors", "config.json", "tokenizer.json"} <= written
    weights = folder / "model.safetensors"
    assert marker["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert marker["files"]["model.safetensors"]["stamp"] == file_stamp(weights)


# --- swapped, added and missing files -----------------------------------------------------------------------


@pytest.mark.parametrize("mtime", ["new", "set back"])
def test_swapped_weights_are_refused(converted, tmp_path, mtime):
    _load(converted)  # records the fingerprint of the converted weights
    other = tmp_path / "other"
    save_tiny_with_tokenizer(other, seed=1)
    weights = converted / "model.safetensors"
    before = weights.stat()
    assert (other / "model.safetensors").stat().st_size == before.st_size  # same size: only the bytes differ
    shutil.copyfile(other / "model.safetensors", weights)
    if mtime == "set back":  # as `cp -p` or `touch -d` would: size and mtime both as recorded
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ConvertedFolderChangedError) as err:
        _load(converted)
    message = str(err.value)
    assert "model.safetensors changed since conversion" in message and f"rm -rf {converted}" in message
    assert "\n" not in message and err.value.file == "model.safetensors"


def test_unchanged_files_are_not_hashed_again_and_touched_ones_once(converted, monkeypatch):
    hashed = []
    real = converted_files.sha256_of_files
    monkeypatch.setattr(converted_files, "sha256_of_files", lambda paths: hashed.append(paths[0].name) or real(paths))
    _load(converted)
    assert hashed == []  # the stamps recorded at conversion vouch for the files
    weights = converted / "model.safetensors"
    os.utime(weights)  # the same bytes, a new mtime
    _load(converted)
    assert hashed == ["model.safetensors"]
    _load(converted)
    assert hashed == ["model.safetensors"]  # the new stamp was recorded
    marker = json.loads((converted / COMPLETE_MARKER).read_text())
    assert marker["files"]["model.safetensors"]["stamp"] == file_stamp(weights)


def test_a_file_added_to_or_missing_from_a_converted_folder_is_refused(converted):
    torch.save({"x": torch.zeros(1)}, converted / "pytorch_model.bin")
    with pytest.raises(ConvertedFolderChangedError, match="pytorch_model.bin was not written by the conversion"):
        _load(converted)
    (converted / "pytorch_model.bin").unlink()
    (converted / "tokenizer.json").unlink()
    with pytest.raises(ConvertedFolderChangedError, match="tokenizer.json is missing"):
        _load(converted)


def test_a_folder_converted_before_file_records_is_converted_again(cache, monkeypatch):
    legacy = cache / "models" / f"toy-{SHA[:12]}"
    save_tiny_with_tokenizer(legacy, seed=1)
    old_marker = {"format": 1, "source_sha256": SHA, "fingerprints": {"float32": "recorded-by-an-older-version"}}
    (legacy / COMPLETE_MARKER).write_text(json.dumps(old_marker))
    with pytest.raises(ConvertedFolderChangedError, match="records no file hashes"):
        _load(legacy)
    calls = []
    monkeypatch.setattr(models, "convert_gguf", fake_convert_gguf(calls))
    loaded = _resolve()
    assert calls == ["toy"] and loaded.fingerprint != old_marker["fingerprints"]["float32"]
    assert json.loads((legacy / COMPLETE_MARKER).read_text())["format"] == 2
    assert _resolve().fingerprint == loaded.fingerprint and calls == ["toy"]  # converted once


# --- folders and files that are not this user's alone -------------------------------------------------------


@pytest.mark.parametrize("what", ["cache root", "models folder", "model folder", "weights", "marker"])
def test_a_model_cache_folder_or_file_others_can_write_is_refused(converted, cache, what):
    path = {
        "cache root": cache,
        "models folder": cache / "models",
        "model folder": converted,
        "weights": converted / "model.safetensors",
        "marker": converted / COMPLETE_MARKER,
    }[what]
    path.chmod(0o777 if path.is_dir() else 0o666)
    with pytest.raises(UntrustedCacheError, match="is writable by group and others") as err:
        _resolve()
    assert str(path) in str(err.value) and "chmod go-w" in str(err.value) and "\n" not in str(err.value)


def test_a_model_folder_another_user_owns_is_refused(converted, monkeypatch):
    monkeypatch.setattr(cache_folder, "trusted_owners", lambda: {os.geteuid() + 1})
    with pytest.raises(UntrustedCacheError, match="belongs to another user"):
        _resolve()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_weights_file_another_user_owns_is_refused(converted):
    os.chown(converted / "model.safetensors", 54321, -1)
    with pytest.raises(UntrustedCacheError, match=r"model.safetensors belongs to another user \(uid 54321\)"):
        _resolve()


def test_a_hash_index_others_can_write_is_refused(cache, tmp_path):
    source = tmp_path / "weights.gguf"
    source.write_bytes(b"gguf")
    cached_sha256([source])
    assert _mode(cache) == 0o700 and _mode(cache / "sha256-index.json") == 0o600
    (cache / "sha256-index.json").chmod(0o646)
    with pytest.raises(UntrustedCacheError, match="sha256-index.json is writable by others"):
        cached_sha256([source])


# --- safetensors only -----------------------------------------------------------------------------------------


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickling entry point refuses, and says so."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError("a weights file was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    return calls


def _with_pickle_weights(folder, layout):
    save_tiny_with_tokenizer(folder)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    if layout == "only a .bin":
        torch.save(state, folder / "pytorch_model.bin")
        weights.unlink()
    elif layout == "config.json names a .bin":
        torch.save(state, folder / "adapter_model.bin")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    elif layout == "the index lists a .bin":
        torch.save(state, folder / "pytorch_model.bin")
        weights.unlink()
        index = {"metadata": {}, "weight_map": dict.fromkeys(state, "pytorch_model.bin")}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("layout", ["only a .bin", "config.json names a .bin", "the index lists a .bin"])
def test_pickle_weights_are_refused_never_unpickled(tmp_path, no_unpickling, layout):
    folder = tmp_path / "model"
    _with_pickle_weights(folder, layout)
    with pytest.raises(ModelReferenceError, match="safetensors only") as err:
        resolve_model(str(folder))
    assert "\n" not in str(err.value) and no_unpickling == []


def test_a_folder_with_both_loads_the_safetensors(tmp_path, no_unpickling):
    folder = tmp_path / "model"
    save_tiny_with_tokenizer(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    assert resolve_model(str(folder)).tokenizer("w1 w2").input_ids == [1, 2]
    assert no_unpickling == []


def test_a_hub_id_loads_from_its_snapshot_with_safetensors_only(tmp_path, monkeypatch, no_unpickling):
    import huggingface_hub.constants as hub_constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    snapshot = hub / "models--org--tiny" / "snapshots" / "0123abcd"
    save_tiny_with_tokenizer(snapshot)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    loaded = resolve_model("org/tiny")
    assert loaded.source == "org/tiny" and loaded.tokenizer("w1 w2").input_ids == [1, 2]
    torch.save(load_file(snapshot / "model.safetensors"), snapshot / "pytorch_model.bin")
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelReferenceError, match="safetensors only"):
        resolve_model("org/tiny")
    assert no_unpickling == []
