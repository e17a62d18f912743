"""User settings: sampling, reply length, long context and KV cache, kept as JSON.

A sampling field left as None follows the model: `resolve_sampling` then picks
Qwen3's preset for the reply's thinking mode, or the checkpoint's
generation_config, so "auto" stays right when a chat switches modes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate.sampling import QWEN3_NON_THINKING, QWEN3_THINKING, SamplingParams

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty")
KV_BITS = (None, 8, 4)


class SettingsError(ValueError):
    """A setting out of range; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Everything the settings screen edits."""

    system_prompt: str = ""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    max_tokens: int = 2048
    # Long context: loader options, so changing them reloads the model.
    rope_scaling: str | None = None  # "yarn" or None
    rope_factor: float = 4.0
    max_context: int | None = None
    kv_bits: int | None = None  # applies to chats started afterwards

    def sampling(self) -> dict[str, Any]:
        """The sampling keywords to pass to ChatSession (None means: the model's default)."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS
                if getattr(self, name) is not None}

    def model_options(self) -> dict[str, Any]:
        """Keyword arguments for `qwen_mlx.load` that these settings decide."""
        return {"rope_scaling": self.rope_scaling, "rope_factor": self.rope_factor,
                "max_context": self.max_context}

    def validate(self) -> "Settings":
        """Return self, or raise SettingsError naming the first bad value."""
        given = self.sampling()
        try:  # the library's own ranges, so the UI never accepts what generation refuses
            SamplingParams(**{k: v for k, v in given.items() if k != "presence_penalty"}).validate()
        except QwenMLXError as e:
            raise SettingsError(str(e)) from None
        if self.max_tokens < 1:
            raise SettingsError(f"max tokens must be at least 1, got {self.max_tokens}")
        if self.rope_scaling not in (None, "yarn", "linear", "dynamic"):
            raise SettingsError(f"rope scaling {self.rope_scaling!r} is not supported")
        if self.rope_scaling and self.rope_factor <= 1:
            raise SettingsError(f"the YaRN factor must be above 1, got {self.rope_factor:g}")
        if self.max_context is not None and self.max_context < 2:
            raise SettingsError(f"max context must be at least 2, got {self.max_context}")
        if self.kv_bits not in KV_BITS:
            raise SettingsError(f"KV cache bits must be 4, 8 or none, got {self.kv_bits}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        """Settings from saved JSON: unknown keys are ignored, missing ones default."""
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return replace(cls(), **values).validate()


def preset(thinking: bool) -> dict[str, Any]:
    """Qwen3's recommended sampling for a mode (from the model card, via the library)."""
    return dict(QWEN3_THINKING if thinking else QWEN3_NON_THINKING)


def load_settings(path: Path) -> tuple[Settings, str | None]:
    """(settings, a warning when the file was unreadable and defaults are used)."""
    if not path.is_file():
        return Settings(), None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return Settings.from_dict(data), None
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        return Settings(), f"{path} could not be read ({e}); using default settings"


def save_settings(path: Path, settings: Settings) -> None:
    """Write atomically, so a crash never leaves half a file."""
    write_json(path, settings.to_dict())


def write_json(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
