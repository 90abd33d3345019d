"""Model weights are read with safetensors only: a folder that would make transformers unpickle a file is refused.

Pickle files (`pytorch_model.bin`, `*.pt`, ...) can run code when they are loaded. transformers is always asked for
safetensors (`use_safetensors=True`), but it still falls back to `torch.load` for a file that a folder's own
`config.json` names (`"transformers_weights"`) or that a safetensors shard index lists, so those are checked first:
the weights a folder loads from must be `model.safetensors` or the shards of `model.safetensors.index.json`, every
one a `.safetensors` file inside the folder. A Hub id is first resolved to its local snapshot folder (fetching only
safetensors weights, configs and tokenizer files where downloads are allowed) and checked the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from latent_relay.agents.model_errors import ModelReferenceError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: What a Hub snapshot is fetched with: configs, tokenizer files and safetensors weights; never a pickle or code.
HUB_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "model*.safetensors")


def _refuse(folder: Path, why: str) -> ModelReferenceError:
    return ModelReferenceError(
        f"{folder}: {why}; latent-relay loads weights with safetensors only, never pickle files (.bin, .pt), which "
        "can run code when loaded"
    )


def _plain_safetensors_name(folder: Path, name: object, where: str) -> Path:
    if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name:
        raise _refuse(folder, f"{where} names {name!r}, not a .safetensors file in the folder")
    return folder / name


def safetensors_weights(folder: Path) -> list[Path]:
    """The safetensors files transformers will load from `folder`; `ModelReferenceError` where it would load
    anything else."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    explicit = config.get("transformers_weights") if isinstance(config, dict) else None
    if explicit is not None and explicit not in (SAFE_WEIGHTS, SAFE_INDEX):
        raise _refuse(folder, f'config.json names its weights file "transformers_weights": {explicit!r}')
    if (folder / SAFE_WEIGHTS).is_file() and explicit != SAFE_INDEX:
        return [folder / SAFE_WEIGHTS]
    if (folder / SAFE_INDEX).is_file():
        try:
            weight_map = json.loads((folder / SAFE_INDEX).read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _refuse(folder, f"{SAFE_INDEX} is unreadable ({type(exc).__name__})") from exc
        return [_plain_safetensors_name(folder, name, SAFE_INDEX) for name in names]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    found = f" (only {', '.join(pickles)})" if pickles else ""
    raise _refuse(folder, f"no {SAFE_WEIGHTS} or {SAFE_INDEX}{found}")


def hub_snapshot(repo_id: str, *, local_only: bool) -> Path:
    """The local snapshot folder of a Hub model: the one holding its cached `config.json` in the Hugging Face
    cache, or, where `local_only` is false, one fetched with only the files of :data:`HUB_FILES`. `OSError` (or
    `ValueError`, for a malformed id) where there is none."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    if not local_only:
        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILES)))
    cached = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(cached, str):
        raise FileNotFoundError(f"no cached config.json for {repo_id}")
    return Path(cached).parent
