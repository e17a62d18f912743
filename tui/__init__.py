"""A Textual chat UI for qwen-mlx.

Layout (after ggozad/oterm): `app` holds the App and `run_chat`, `screens` its
screens, `widgets` the pieces of the chat screen, and `store`/`settings` what is
kept on disk. Generation itself is the library's: the UI drives
`qwen_mlx.ChatSession` from a thread worker and never samples a token itself.
"""

from __future__ import annotations

__all__ = ["ChatApp", "run_chat"]


def __getattr__(name: str):
    # Importing the package stays cheap: the App (and MLX) load on first use.
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
