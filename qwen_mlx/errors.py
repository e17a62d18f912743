"""User-facing errors.

Anything the user can fix (a bad config, a missing shard, a wrong flag) raises
`QwenMLXError` with a message that names the file, key or value and says what
to do. The CLI prints these without a traceback; anything else is a bug.
"""

from __future__ import annotations


class QwenMLXError(Exception):
    """An error caused by the user's input, reported without a traceback."""


class ConfigError(QwenMLXError):
    """config.json is missing, malformed or describes an unsupported model."""


class WeightsError(QwenMLXError):
    """The checkpoint's weight files are missing, unreadable or inconsistent."""
