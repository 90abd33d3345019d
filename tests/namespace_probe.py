"""Imports every latent_relay module, then builds a tiny Qwen2 and a tiny Llama model and runs one forward pass.

Run by tests/test_namespace.py in a fresh interpreter, once as ``python -m tests.namespace_probe`` from the repository
root and once from an unrelated folder through the installed package. transformers 5.25 imports Hugging Face's
``kernels`` distribution while it loads a model class; had a folder of this repository shadowed that name (as our
``kernels/`` once did), the model classes would fail to load here. Prints one JSON line with what it found.
"""

from __future__ import annotations

import importlib
import json
import pkgutil

import torch


def project_modules() -> list[str]:
    import latent_relay

    names = ["latent_relay"]
    for sub in latent_relay.SUBPACKAGES:
        package = importlib.import_module(f"latent_relay.{sub}")
        names.append(package.__name__)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")]
    return names


def load_model_classes() -> list[str]:
    """A tiny random Qwen2 and Llama through transformers' model classes, and one forward pass each."""
    from latent_relay.agents.models import tiny_model

    built = []
    for arch in ("qwen2", "llama"):
        model = tiny_model(arch).model
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3]])).logits
        assert logits.shape == (1, 3, model.config.vocab_size)
        built.append(type(model).__name__)
    return built


def main() -> None:
    modules = project_modules()
    for name in modules:
        importlib.import_module(name)
    models = load_model_classes()
    kernels = importlib.import_module("kernels")  # Hugging Face's distribution, after every project module
    from latent_relay.relay import wire

    found = {"modules": modules, "models": models, "kernels_file": kernels.__file__, "wire_file": wire.__file__}
    print(json.dumps(found))


if __name__ == "__main__":
    main()
