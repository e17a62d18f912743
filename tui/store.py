"""Saved conversations: one JSON file per chat under <data dir>/chats, and Markdown exports.

A chat's `messages` are exactly what `ChatSession.messages` holds (the model's
context, system prompt first), so reopening one is `ChatSession(messages=...)`.
Older turns trimmed to fit the context move to `dropped`; the transcript the
user sees is dropped + messages. `meta` runs alongside the transcript with what
only the UI needs (turn statistics, how long the model thought).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from .settings import Settings, load_settings, save_settings, write_json
from .text import chat_title

FORMAT = 1


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


@dataclass
class ChatRecord:
    """One conversation as it is saved."""

    id: str
    created: str
    updated: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    meta: list[dict[str, Any] | None] = field(default_factory=list)
    enable_thinking: bool | None = None  # the chat's thinking switch (None: on)

    @property
    def transcript(self) -> list[dict[str, Any]]:
        """Every message the user has seen, oldest first, without the system prompt."""
        return self.dropped + [m for m in self.messages if m.get("role") != "system"]

    @property
    def system(self) -> str:
        head = self.messages[:1]
        return head[0].get("content", "") if head and head[0].get("role") == "system" else ""

    @property
    def title(self) -> str:
        first = next((m for m in self.transcript if m.get("role") == "user"), None)
        return chat_title(str(first.get("content", ""))) if first else "New chat"

    def meta_at(self, index: int) -> dict[str, Any]:
        """The UI metadata of transcript message `index` ({} when none)."""
        return (self.meta[index] if index < len(self.meta) else None) or {}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "id": self.id, "title": self.title, "created": self.created,
                "updated": self.updated, "enable_thinking": self.enable_thinking,
                "messages": self.messages, "dropped": self.dropped, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChatRecord":
        def messages(key: str) -> list[dict[str, Any]]:
            value = data.get(key) or []
            if not isinstance(value, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content", ""), str) for m in value):
                raise ValueError(f"'{key}' must be a list of messages with role and content")
            return [dict(m) for m in value]

        meta = data.get("meta") or []
        return cls(id=str(data["id"]), created=str(data.get("created", "")),
                   updated=str(data.get("updated", "")), messages=messages("messages"),
                   dropped=messages("dropped"),
                   meta=[m if isinstance(m, dict) else None for m in meta]
                   if isinstance(meta, list) else [],
                   enable_thinking=data.get("enable_thinking")
                   if data.get("enable_thinking") in (None, True, False) else None)


@dataclass(frozen=True)
class ChatSummary:
    """A line of the chat list."""

    id: str
    title: str
    updated: str
    turns: int


class ChatStore:
    """The data folder: settings.json and chats/<id>.json (+ <id>.md exports)."""

    def __init__(self, root: Path, *, now: Callable[[], str] = _now):
        self.root = Path(root)
        self.chats_dir = self.root / "chats"
        self.settings_path = self.root / "settings.json"
        self._now = now

    # ----------------------------------------------------------------- settings

    def load_settings(self) -> tuple[Settings, str | None]:
        return load_settings(self.settings_path)

    def save_settings(self, settings: Settings) -> None:
        save_settings(self.settings_path, settings)

    # -------------------------------------------------------------------- chats

    def new_chat(self, *, system: str = "", enable_thinking: bool | None = None) -> ChatRecord:
        stamp = self._now()
        # Sortable by creation time, and unique within a second.
        chat_id = stamp.replace(":", "").replace("-", "")[:15] + "-" + secrets.token_hex(3)
        messages = [{"role": "system", "content": system}] if system else []
        return ChatRecord(id=chat_id, created=stamp, updated=stamp, messages=messages,
                          enable_thinking=enable_thinking)

    def path(self, chat_id: str) -> Path:
        if not chat_id or "/" in chat_id or "\\" in chat_id or chat_id.startswith("."):
            raise ValueError(f"bad chat id {chat_id!r}")
        return self.chats_dir / f"{chat_id}.json"

    def save(self, record: ChatRecord) -> Path | None:
        """Save `record`; a chat with no user message is not kept (its file is removed)."""
        path = self.path(record.id)
        if not any(m.get("role") == "user" for m in record.transcript):
            path.unlink(missing_ok=True)
            return None
        record.updated = self._now()
        write_json(path, record.to_dict())
        return path

    def load(self, chat_id: str) -> ChatRecord:
        """Raises OSError or ValueError for a missing or damaged file."""
        data = json.loads(self.path(chat_id).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return ChatRecord.from_dict(data)

    def delete(self, chat_id: str) -> None:
        self.path(chat_id).unlink(missing_ok=True)

    def summaries(self) -> list[ChatSummary]:
        """Saved chats, most recently updated first; unreadable files are skipped."""
        out = []
        for path in self.chats_dir.glob("*.json") if self.chats_dir.is_dir() else ():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                record = ChatRecord.from_dict(data)
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
                continue
            turns = sum(1 for m in record.transcript if m.get("role") == "user")
            out.append(ChatSummary(record.id, record.title, record.updated, turns))
        return sorted(out, key=lambda s: (s.updated, s.id), reverse=True)

    def export_markdown(self, record: ChatRecord) -> Path:
        """Write the chat as Markdown next to its JSON file; returns the path."""
        path = self.path(record.id).with_suffix(".md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_markdown(record), encoding="utf-8")
        return path


def to_markdown(record: ChatRecord) -> str:
    """The transcript as Markdown; reasoning goes in a <details> block."""
    parts = [f"# {record.title}", "", f"*{record.created}*", ""]
    if record.system:
        parts += ["## System", "", record.system, ""]
    for message in record.transcript:
        role = message.get("role")
        if role == "user":
            parts += ["## You", "", message.get("content", ""), ""]
        elif role == "assistant":
            parts += ["## Qwen", ""]
            reasoning = message.get("reasoning_content") or ""
            if reasoning.strip():
                parts += ["<details><summary>Reasoning</summary>", "", reasoning, "",
                          "</details>", ""]
            parts += [message.get("content", ""), ""]
    return "\n".join(parts).rstrip() + "\n"
