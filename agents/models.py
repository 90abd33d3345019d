"""Model references: resolve a name, folder, Hub id or GGUF file to a loaded model, tokenizer and fingerprint.

A reference is one of
- a bundled offline model name (`list_bundled()`; default `qwen2.5-coder-1.5b`),
- a path to a `.gguf` file,
- a local model folder or a Hugging Face id (from the local Hub cache unless `allow_download=True`).

GGUF weights (bundled or not) are converted once into a float32 safetensors folder in the user cache
(`latent_relay.agents.model_cache.cache_dir()`) and loaded from there afterwards, after checking that the folder
holds exactly the files recorded at conversion, unchanged (`latent_relay.agents.converted_files`). Weights are read
with safetensors only, never unpickled (`latent_relay.agents.safetensors_only`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from latent_relay.agents.bundled import BUNDLED, DEFAULT_MODEL, BundledModel, list_bundled, locate_files
from latent_relay.agents.converted_files import has_file_records, verify_files
from latent_relay.agents.fingerprint import config_essentials, model_fingerprint
from latent_relay.agents.gguf_convert import convert_gguf
from latent_relay.agents.model_cache import (
    COMPLETE_MARKER,
    build_once,
    cached_sha256,
    file_lock,
    log,
    models_dir,
    write_json_atomic,
)
from latent_relay.agents.model_errors import (
    BundledModelNotInstalledError,
    ChecksumMismatchError,
    ConvertedFolderChangedError,
    ModelReferenceError,
)
from latent_relay.agents.safetensors_only import hub_snapshot, safetensors_weights
from latent_relay.agents.weights import (
    SETTINGS,
    default_setting,
    quantize_linears,
    quantized_fingerprint,
    resolve_setting,
)

__all__ = [
    "DEFAULT_MODEL",
    "BundledModelNotInstalledError",
    "ChecksumMismatchError",
    "ConvertedFolderChangedError",
    "LoadedModel",
    "ModelReferenceError",
    "list_bundled",
    "resolve_model",
    "tiny_model",
]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: the transformers model (eval mode), its tokenizer and its fingerprint.

    `tokenizer` is None for the tiny random test models, which are used at the token-id level.
    """

    name: str
    model: Any
    tokenizer: Any | None
    fingerprint: str
    config_summary: dict[str, Any]
    source: str = ""  # where the weights came from (path, Hub id, or "random")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def summarize_config(model: Any) -> dict[str, Any]:
    """The architecture essentials plus dtype and parameter count, for logs and result records."""
    summary = config_essentials(model.config)
    cfg = model.config
    summary.setdefault("head_dim", cfg.hidden_size // cfg.num_attention_heads)
    summary.setdefault("num_key_value_heads", cfg.num_attention_heads)
    summary["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    summary["num_parameters"] = sum(p.numel() for p in model.parameters())
    return summary


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype of :func:`~latent_relay.agents.weights.default_setting` on ``device``: bfloat16 on accelerators and
    on CPUs with native bf16 units, float32 on other CPUs."""
    return SETTINGS[default_setting(device)][0]


def _as_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelReferenceError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    return resolved


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _loaded(name: str, model: Any, tokenizer: Any, fingerprint: str, source: str, **extra) -> LoadedModel:
    model.eval()
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        config_summary=summarize_config(model),
        source=source,
        extra=extra,
    )


def _load_pretrained(folder: Path, *, device, dtype: torch.dtype, attn_implementation):
    """A model folder's model and tokenizer, its weights read with safetensors only (:func:`safetensors_weights`
    first refuses a folder that would make transformers unpickle anything)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    safetensors_weights(folder)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model.to(device), tokenizer


def _update_marker(folder: Path, change) -> None:
    """Apply `change` to the folder's marker under the folder's lock; a read-only cache is left as it is."""
    marker_path = folder / COMPLETE_MARKER
    try:
        with file_lock(folder.parent / f"{folder.name}.lock"):
            marker = _read_json(marker_path)
            change(marker)
            write_json_atomic(marker_path, marker)
    except OSError as exc:
        log(f"could not update {marker_path}: {exc}")


def _verified_marker(folder: Path) -> dict:
    """The marker of a converted folder whose files are the ones it records (else `ConvertedFolderChangedError`,
    or `UntrustedCacheError` for a folder or file that is not this user's alone); new stamps of files hashed again
    are recorded."""
    if not has_file_records(folder):
        raise ConvertedFolderChangedError(folder, COMPLETE_MARKER, "records no file hashes (an older latent-relay)")
    marker = _read_json(folder / COMPLETE_MARKER)
    refreshed = verify_files(folder, marker["files"])
    if refreshed:

        def restamp(current: dict) -> None:
            for relative, stamp in refreshed.items():
                current["files"][relative]["stamp"] = stamp

        _update_marker(folder, restamp)
    return marker


def _load_converted(folder: Path, name: str, *, device, dtype: torch.dtype, attn_implementation) -> LoadedModel:
    """Load a converted cache folder (checked first), reusing (or adding) the fingerprint recorded for this dtype."""
    marker = _verified_marker(folder)
    model, tokenizer = _load_pretrained(folder, device=device, dtype=dtype, attn_implementation=attn_implementation)
    fingerprint = marker.get("fingerprints", {}).get(_dtype_name(dtype))
    if fingerprint is None:
        fingerprint = model_fingerprint(model, tokenizer)

        def remember(current: dict) -> None:  # for the next load in this dtype; a read-only cache just recomputes
            current.setdefault("fingerprints", {})[_dtype_name(dtype)] = fingerprint

        _update_marker(folder, remember)
    sha = marker.get("source_sha256")
    return _loaded(name, model, tokenizer, fingerprint, str(folder), source_sha256=sha)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _converted_folder(slug: str, sources: list[Path], sha: str) -> Path:
    """The converted folder of these GGUF sources, converting them first where there is no folder with file
    records (none yet, a killed conversion's leftover, or one made before file records existed)."""
    folder = models_dir() / f"{slug}-{sha[:12]}"
    if not has_file_records(folder):
        log(f"{slug}: first use, converting GGUF to safetensors in {folder} (about a minute)")
    return build_once(
        folder,
        lambda staging: convert_gguf(sources, sha, staging, name=slug, fingerprint_fn=model_fingerprint),
        is_valid=has_file_records,
    )


def _resolve_bundled(spec: BundledModel, **options) -> LoadedModel:
    sources = locate_files(spec)
    actual = cached_sha256(sources)
    if actual != spec.sha256:
        raise ChecksumMismatchError(f"bundled model {spec.name!r}", spec.sha256, actual)
    folder = _converted_folder(spec.name, sources, actual)
    return _load_converted(folder, spec.name, **options)


def _resolve_gguf(path: Path, **options) -> LoadedModel:
    if not path.is_file():
        raise ModelReferenceError(f"GGUF file not found: {path}")
    sha = cached_sha256([path])
    slug = "gguf-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:60]
    folder = _converted_folder(slug, [path], sha)
    return _load_converted(folder, path.name, **options)


def _unknown_reference(ref: str, why: str) -> ModelReferenceError:
    return ModelReferenceError(f"unknown model reference {ref!r} ({why}); bundled models: {', '.join(list_bundled())}")


def _resolve_hub_or_folder(ref: str, *, device, dtype, allow_download: bool, attn_implementation) -> LoadedModel:
    local_only = not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1"
    path = Path(ref).expanduser()
    looks_like_path = ref.startswith((".", "/", "~")) or path.exists()
    if looks_like_path and not path.is_dir():
        raise _unknown_reference(ref, "no such folder or .gguf file")
    if not looks_like_path and ref.count("/") != 1:
        raise _unknown_reference(ref, "not a bundled name, a path or a Hugging Face id like org/name")
    try:
        folder = path if looks_like_path else hub_snapshot(ref, local_only=local_only)
        model, tokenizer = _load_pretrained(folder, device=device, dtype=dtype, attn_implementation=attn_implementation)
    except ModelReferenceError:
        raise
    except (OSError, ValueError) as exc:  # missing files, or a folder transformers cannot read
        offline = not allow_download and not looks_like_path
        hint = " (not in the local Hugging Face cache; downloads are off)" if offline else ""
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _unknown_reference(ref, f"could not load it{hint}: {first_line}") from exc
    fingerprint = model_fingerprint(model, tokenizer)
    return _loaded(ref, model, tokenizer, fingerprint, str(path) if looks_like_path else ref)


def hide_loading_progress() -> None:
    """Turn off the progress bars transformers draws while it loads a model (a caller that reports its own)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_model(
    ref: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    weights: str | None = None,
    allow_download: bool = False,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load the model a reference names.

    ``weights`` is a setting of :data:`latent_relay.agents.weights.SETTINGS` (a dtype, or quantized linear layers
    such as ``int8``); ``dtype`` is the older way to name a plain dtype. With neither (or ``"auto"``) the model
    runs in :func:`default_dtype` for the device. A quantized model's fingerprint differs from its float one.

    Raises `ModelReferenceError` for a reference that names nothing loadable (the message lists the bundled
    models), `BundledModelNotInstalledError` (a `ModelReferenceError`) naming the pip command when a bundled
    model's package is missing, `ChecksumMismatchError` when GGUF bytes do not match the pinned SHA-256, and
    `WeightSettingError` (a `ValueError`) for a setting this device cannot run.
    """
    started = time.perf_counter()
    setting, torch_dtype, kind = _setting(dtype, weights, device)
    ref = ref.strip()
    if not ref:
        raise _unknown_reference(ref, "empty")
    common = {"device": device, "dtype": torch_dtype, "attn_implementation": attn_implementation}
    if ref in BUNDLED:
        loaded = _resolve_bundled(BUNDLED[ref], **common)
    elif ref.lower().endswith(".gguf"):
        loaded = _resolve_gguf(Path(ref).expanduser(), **common)
    else:
        loaded = _resolve_hub_or_folder(ref, allow_download=allow_download, **common)
    if kind is not None:
        loaded = quantized(loaded, setting, kind)
    elapsed = time.perf_counter() - started
    log(f"loaded {loaded.name} ({setting}, {device}) in {elapsed:.1f}s")
    return loaded


def quantized(loaded: LoadedModel, setting: str, kind: str) -> LoadedModel:
    """``loaded`` with its linear layers quantized to ``kind`` in place, under its new fingerprint."""
    quantize_linears(loaded.model, kind)
    return replace(
        loaded,
        fingerprint=quantized_fingerprint(loaded.fingerprint, kind),
        config_summary={**loaded.config_summary, "weights": setting},
        extra={**loaded.extra, "weights": setting},
    )


def _setting(dtype, weights, device) -> tuple[str, torch.dtype, str | None]:
    """The weight setting named by ``weights`` or (the older way) ``dtype``; naming two different ones is an error."""
    if weights in (None, "auto"):
        if dtype in (None, "auto"):
            return resolve_setting(None, device)
        torch_dtype = _as_dtype(dtype, device)
        return _dtype_name(torch_dtype), torch_dtype, None
    setting = resolve_setting(weights, device)
    if dtype not in (None, "auto") and _as_dtype(dtype, device) != setting[1]:
        raise ModelReferenceError(f"dtype {dtype!r} and weights {weights!r} disagree; give only weights")
    return setting


# Tiny random models for tests: 2 layers, hidden 64, 4 query heads, 2 KV heads, 256-token vocabulary.
TINY_ARCHS = ("llama", "qwen2", "qwen3")


def tiny_model(
    arch: str = "llama",
    seed: int = 0,
    *,
    vocab_size: int = 256,
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """A tiny randomly initialised model of one architecture (no tokenizer: use token ids directly).

    The same (arch, seed) always gives the same weights and fingerprint; the global RNG is left untouched.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    config_classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch not in config_classes:
        choices = ", ".join(TINY_ARCHS)
        raise ModelReferenceError(f"unknown tiny architecture {arch!r}; choose one of {choices}")
    config = config_classes[arch](
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    fingerprint = model_fingerprint(model, None)
    return _loaded(f"tiny-{arch}-seed{seed}", model, None, fingerprint, "random", arch=arch, seed=seed)
