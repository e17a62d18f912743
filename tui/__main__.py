"""`python -m tui MODEL_FOLDER`: open the chat UI without the qwen-mlx command."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m tui MODEL_FOLDER  (or: qwen-mlx chat -m MODEL)", file=sys.stderr)
        return 2
    from .app import run_chat

    run_chat(Path(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
