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
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    built = []
    for config_class, model_class in ((Qwen2Config, Qwen2ForCausalLM), (LlamaConfig, LlamaForCausalLM)):
        torch.manual_seed(0)
        model = model_class(config_class(**small)).eval()
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3]])).logits
        assert logits.shape == (1, 3, 64)
        built.append(model_class.__name__)
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
