"""Where the evaluation data lives: `--data-dir`, else `RELAY_DATA_DIR`, else `../shared/data`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV_VAR = "RELAY_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]  # tasks/data.py -> repository root


class DataNotFoundError(FileNotFoundError):
    """A data folder or file that is not where the loaders looked."""

    def __str__(self) -> str:  # one line, without FileNotFoundError's errno formatting
        return str(self.args[0]) if self.args else "data not found"


def default_data_dir() -> Path:
    return (REPO_ROOT.parent / "shared" / "data").resolve()


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The data folder and how it was chosen (for error messages)."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "--data-dir"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), ENV_VAR
    return default_data_dir(), "the default ../shared/data beside the checkout"


_HINT = f"point elsewhere with --data-dir or {ENV_VAR}"


def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder, which must exist."""
    folder, origin = resolve_data_dir(data_dir)
    if not folder.is_dir():
        raise DataNotFoundError(f"data folder {folder} (from {origin}) does not exist; {_HINT}")
    return folder


def data_file(relative: str, data_dir_arg: str | os.PathLike | None = None) -> Path:
    """A file inside the data folder, which must exist."""
    folder = data_dir(data_dir_arg)
    path = folder / relative
    if not path.is_file():
        raise DataNotFoundError(f"data file {path} not found in data folder {folder}; {_HINT}")
    return path


def read_jsonl(path: Path, n: int | None = None) -> list[dict[str, Any]]:
    """The first `n` (or all) JSON records of a JSON-lines file."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if n is not None and len(rows) >= n:
                break
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
    return rows


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
