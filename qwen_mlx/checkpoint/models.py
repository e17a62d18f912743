"""Which model `qwen-mlx chat` runs: a folder as is, or a hub repo made ready once.

A hub repo that is already in MLX form (mlx-community's, or one of ours) is
used from the Hugging Face cache. Any other is downloaded, converted to 4-bit
and kept in qwen-mlx's cache, so the first run pays for it once and later
runs start at once, offline too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..errors import QwenMLXError
from .hub import is_repo_id, resolve_model_path

DEFAULT_MODEL = "Qwen/Qwen3.5-0.8B"


def cache_dir() -> Path:
    """Where converted models live: $QWEN_MLX_CACHE, else the XDG cache folder."""
    if os.environ.get("QWEN_MLX_CACHE"):
        return Path(os.environ["QWEN_MLX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen-mlx"


def converted_path(repo_id: str, revision: str | None = None, bits: int = 4) -> Path:
    """The cache folder a hub repo converts into."""
    name = repo_id.replace("/", "--") + (f"@{revision}" if revision else "")
    return cache_dir() / "models" / f"{name}-{bits}bit"


def _is_mlx_folder(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "quantization" in config


def prepare_model(source: str | None = None, *, revision: str | None = None,
                  progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """A local folder ready to load for `source` (default: a small Qwen3)."""
    source = source or DEFAULT_MODEL
    if Path(source).expanduser().exists() or not is_repo_id(source):
        return resolve_model_path(source, revision=revision)
    target = converted_path(source, revision)
    if (target / "config.json").exists():
        return target
    try:
        snapshot = resolve_model_path(source, revision=revision)
    except QwenMLXError as e:
        raise QwenMLXError(
            f"{e}\nTo chat without downloading, pass --model PATH with a local model folder "
            "(a Hugging Face or MLX checkpoint).") from None
    if _is_mlx_folder(snapshot):
        return snapshot
    from .converter import TargetExistsError, convert

    log(f"First run with {source}: converting it to 4-bit into {target} (once).")
    try:
        result = convert(snapshot, target, quantize=True, bits=4, progress=progress, log=log)
    except TargetExistsError:
        # Another process (a second chat window) converted it meanwhile.
        if (target / "config.json").exists():
            return target
        raise
    log(result.summary())
    return result.path
