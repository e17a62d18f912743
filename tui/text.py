"""Text helpers for display: control characters, code blocks, titles, durations."""

from __future__ import annotations

import re

# C0 and C1 control characters except tab and newline. A model (or a saved chat)
# can produce them, and some would reach the terminal as escape sequences.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# A fenced code block: ``` or ~~~ (three or more), optional info string, body, same fence.
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})[^\n]*\n(?P<body>.*?)"
                    r"(?:^(?P=indent)(?P=fence)[`~]*[ \t]*$|\Z)", re.M | re.S)


def clean(text: str) -> str:
    """`text` safe to show: control characters become U+FFFD, \\r\\n becomes \\n."""
    return _CONTROL.sub("\ufffd", text.replace("\r\n", "\n"))


def code_blocks(markdown: str) -> list[str]:
    """The bodies of the fenced code blocks in `markdown`, in order (an unclosed
    fence runs to the end, as Markdown renders it)."""
    return [m.group("body").rstrip("\n") for m in _FENCE.finditer(markdown)]


def chat_title(text: str, width: int = 60) -> str:
    """A one-line title for a chat from its first user message."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def duration(seconds: float) -> str:
    """3.2 s, 1 min 05 s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def byte_size(n: int | float) -> str:
    """Bytes in decimal units, as the library reports peak memory: 512 B, 1.2 MB, 3.40 GB."""
    n = float(n)
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"
