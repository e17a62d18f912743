"""User settings: sampling, reply length, long context and KV cache, kept as JSON.

A sampling field left as None follows the model: `resolve_sampling` then picks
Qwen3's preset for the reply's thinking mode, or the checkpoint's
generation_config, so "auto" stays right when a chat switches modes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate.sampling import SamplingParams, family_preset

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
    # Speculative decoding: the checkpoint's MTP block, or a draft model (folder or hub id).
    speculative: str | None = None  # "mtp" or None
    draft_model: str | None = None
    num_draft_tokens: int | None = None  # None: the library's default per kind

    def speculation(self) -> dict[str, Any]:
        """What these settings ask of speculative decoding (ChatSession's keywords, the
        draft model as the path or hub id to load)."""
        out: dict[str, Any] = {}
        if self.speculative:
            out["speculative"] = self.speculative
        elif self.draft_model:
            out["draft_model"] = self.draft_model
        if out and self.num_draft_tokens is not None:
            out["num_draft_tokens"] = self.num_draft_tokens
        return out

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
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
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
        if self.speculative not in (None, "mtp"):
            raise SettingsError(f"speculative {self.speculative!r} is not known: mtp or none")
        if self.speculative and self.draft_model:
            raise SettingsError("choose one way to draft: the MTP head or a draft model")
        if self.num_draft_tokens is not None and not 1 <= self.num_draft_tokens <= 16:
            raise SettingsError(f"drafts per step must be from 1 to 16, got "
                                f"{self.num_draft_tokens}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        """Settings from saved JSON: unknown keys are ignored, missing ones default;
        raises SettingsError for a bad value (see `from_saved` to keep the good ones)."""
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return replace(cls(), **values).validate()

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "tuple[Settings, list[str]]":
        """Settings from saved JSON, dropping only the fields that are invalid.

        Returns (settings, one message per dropped field). One bad value must not cost
        the user the rest (a system prompt, say): the next save would write defaults
        over them. Fields apply in declaration order, so a value checked against an
        earlier one (the YaRN factor against the scaling) sees the kept one.
        """
        settings, problems = cls(), []
        for f in fields(cls):
            if f.name not in data:
                continue
            try:
                settings = replace(settings, **{f.name: data[f.name]}).validate()
            except (SettingsError, TypeError, ValueError) as e:
                problems.append(f"{f.name} ({e})")
        return settings, problems


_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
           "rope_factor"}
_INTS = {"top_k", "max_tokens", "max_context", "kv_bits", "num_draft_tokens"}
_OPTIONAL = set(SAMPLING_FIELDS) | {"rope_scaling", "max_context", "kv_bits", "speculative",
                                    "draft_model", "num_draft_tokens"}


def _check_type(name: str, value: Any) -> None:
    """Raise SettingsError unless `value` has the type field `name` holds (hand-edited
    JSON can hold anything: "hot", 20.5, true, NaN)."""
    label = name
    if value is None:
        if name not in _OPTIONAL:
            raise SettingsError(f"{label} needs a value")
        return
    if name in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{label} must be a number, got {_short(value)}")
        if not math.isfinite(value):
            raise SettingsError(f"{label} must be a finite number, got {value}")
    elif name in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{label} must be a whole number, got {_short(value)}")
    elif not isinstance(value, str):
        raise SettingsError(f"{label} must be text, got {_short(value)}")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) else f"{value:g}"
    return text if len(text) <= 40 else text[:39] + "…"


def preset(thinking: bool, family: str | None = None) -> dict[str, Any]:
    """The model card's sampling for a mode (via the library): the loaded model's
    family's (Qwen3.5's differ from Qwen3's), else Qwen3's. Fields the preset does not
    set come back empty (automatic)."""
    values = family_preset(family or "qwen3", thinking) or family_preset("qwen3", thinking)
    return {name: values.get(name) for name in SAMPLING_FIELDS}


def load_settings(path: Path) -> tuple[Settings, str | None]:
    """(settings, a warning naming what could not be used, or None)."""
    if not path.is_file():
        return Settings(), None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return Settings(), f"{path} could not be read ({e}); using default settings"
    settings, problems = Settings.from_saved(data)
    if not problems:
        return settings, None
    return settings, (f"{path}: ignored the invalid " + "; ".join(problems)
                      + ". The other settings are kept.")


def save_settings(path: Path, settings: Settings) -> None:
    """Write atomically, so a crash never leaves half a file."""
    write_json(path, settings.to_dict())


def write_json(path: Path, data: Any) -> None:
    """Write JSON to `path` atomically (see `write_text`)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file of its own, fsync, then a rename.

    The temporary name is unique per write (two app instances saving at once must not
    write into one file), and sits in the same folder, so the rename is atomic: a
    reader sees the old file or the new one, never a mix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:  # keep the mode of the file it replaces (mkstemp's is 0600, kept for new files)
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
