"""Where the chat UI keeps its files (no platformdirs: one rule, stated here).

Precedence: the `data_dir` argument, then $QWEN_MLX_DATA_DIR, then
$XDG_DATA_HOME/qwen-mlx (an absolute XDG_DATA_HOME only, as the spec asks),
then ~/.local/share/qwen-mlx.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "QWEN_MLX_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder to use (not created here)."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "qwen-mlx"
