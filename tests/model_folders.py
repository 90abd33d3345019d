"""Tiny model folders for the model-loading tests: a tiny random llama saved with a real word-level tokenizer, and a
stand-in for the GGUF conversion that writes one into the cache the way the real one does."""

from __future__ import annotations

from pathlib import Path

from latent_relay.agents.gguf_convert import write_marker
from latent_relay.agents.models import tiny_model


def save_tiny_with_tokenizer(folder: Path, seed: int = 0) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(255)} | {"<unk>": 255}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    tiny_model("llama", seed=seed).model.save_pretrained(folder)


def fake_convert_gguf(calls: list | None = None, seed: int = 0):
    """A `convert_gguf` stand-in: a tiny model instead of the GGUF weights, finished by the real `write_marker`."""

    def convert(sources, source_sha256, staging, *, name, fingerprint_fn):
        if calls is not None:
            calls.append(name)
        save_tiny_with_tokenizer(staging, seed)
        write_marker(staging, {"name": name, "source_sha256": source_sha256, "fingerprints": {}})

    return convert
