"""Model fingerprints: a SHA-256 that identifies a model's weights and tokenizer.

Hashing every weight of a multi-billion-parameter model would take seconds to minutes, so each parameter
contributes its name, shape, dtype and a deterministic sample of its values: the first and last
`EDGE` elements and `STRIDED` evenly spaced elements. Values are hashed as float32 bytes on the CPU, so the
same weights give the same fingerprint on any device. The config's architecture essentials and the
tokenizer's vocabulary are hashed too. Two memories with different fingerprints must not be mixed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

EDGE = 256
STRIDED = 1024

# Config fields that change what the KV cache means or how it is laid out.
CONFIG_ESSENTIALS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rms_norm_eps",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "hidden_act",
)


def config_essentials(config: Any) -> dict[str, Any]:
    """The architecture fields of a transformers config that are set (JSON-safe)."""
    out: dict[str, Any] = {}
    for key in CONFIG_ESSENTIALS:
        value = getattr(config, key, None)
        if value is not None:
            out[key] = value
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def parameter_sample(tensor: torch.Tensor) -> torch.Tensor:
    """First and last `EDGE` elements plus `STRIDED` evenly spaced ones, as float32 on the CPU."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n <= 2 * EDGE + STRIDED:
        picked = flat
    else:
        steps = torch.arange(STRIDED, dtype=torch.int64, device=flat.device)
        strided_idx = steps * (n - 1) // (STRIDED - 1)  # integer arithmetic: exact for any size
        picked = torch.cat([flat[:EDGE], flat[strided_idx], flat[-EDGE:]])
    return picked.to(device="cpu", dtype=torch.float32).contiguous()


def tokenizer_digest(tokenizer: Any | None) -> str:
    """SHA-256 of the sorted vocabulary (token -> id), or of a marker when there is no tokenizer."""
    if tokenizer is None:
        return hashlib.sha256(b"no-tokenizer").hexdigest()
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        digest.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, shape, dtype and value sample (tied weights counted once)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        header = f"{name}|{tuple(param.shape)}|{str(param.dtype).removeprefix('torch.')}\n"
        digest.update(header.encode())
        digest.update(parameter_sample(param).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module, tokenizer: Any | None) -> str:
    """The fingerprint of a (model, tokenizer) pair: config essentials, weight samples and vocabulary."""
    digest = hashlib.sha256()
    digest.update(b"latent-relay-fingerprint-v1\n")
    digest.update(json.dumps(config_essentials(model.config), sort_keys=True).encode())
    digest.update(weights_digest(model).encode())
    digest.update(tokenizer_digest(tokenizer).encode())
    return digest.hexdigest()
