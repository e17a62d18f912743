"""Saved conversations: one JSON file per chat under <data dir>/chats, and Markdown exports.

A chat's `messages` are exactly what `ChatSession.messages` holds (the model's
context, system prompt first), so reopening one is `ChatSession(messages=...)`.
Older turns trimmed to fit the context move to `dropped`; the transcript the
user sees is dropped + messages. `meta` runs alongside the transcript with what
only the UI needs (turn statistics, how long the model thought).

A file's name is its chat's id (a user's backup copy of a file is a chat of its
own). Two app instances may hold one chat: every save runs under a lock on the
store and merges what the other wrote since this one last read or saved the
file (see `ChatStore.save`), so no turn is lost.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; saves stay atomic, merges unlocked
    fcntl = None  # type: ignore[assignment]

from .settings import Settings, load_settings, save_settings, write_json, write_text
from .text import chat_title

FORMAT = 1
HISTORY_LIMIT = 500  # sent messages kept for Up/Down across runs


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
    # The transcript as this process last read or wrote the file: what a save compares
    # the file with to find another instance's turns. None: never on disk.
    synced: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)

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
    def from_dict(cls, data: dict[str, Any], *, chat_id: str | None = None) -> "ChatRecord":
        """A record from a file's JSON; `chat_id` (the file's name) overrides its "id".

        Raises ValueError (or KeyError without an id) when `data` is not a chat."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")

        def messages(key: str) -> list[dict[str, Any]]:
            value = data.get(key) or []
            if not isinstance(value, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content", ""), str) for m in value):
                raise ValueError(f"'{key}' must be a list of messages with role and content")
            return [dict(m) for m in value]

        meta = data.get("meta") or []
        return cls(id=chat_id or str(data["id"]), created=str(data.get("created", "")),
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


@dataclass(frozen=True)
class SaveResult:
    """What a save did beyond writing: turns merged in from another instance, and the
    id of a copy kept of the file when the two histories could not be merged."""

    path: Path
    merged: int = 0  # messages another instance had added, now in the record too
    copy_id: str | None = None


class ChatStore:
    """The data folder: settings.json, history.json (sent messages, for Up/Down) and
    chats/<id>.json (+ <id>.md exports)."""

    def __init__(self, root: Path, *, now: Callable[[], str] = _now):
        self.root = Path(root)
        self.chats_dir = self.root / "chats"
        self.settings_path = self.root / "settings.json"
        self.history_path = self.root / "history.json"
        self._now = now

    # ----------------------------------------------------------------- settings

    def load_settings(self) -> tuple[Settings, str | None]:
        return load_settings(self.settings_path)

    def save_settings(self, settings: Settings) -> None:
        save_settings(self.settings_path, settings)

    # ------------------------------------------------------------------ history

    def load_history(self) -> list[str]:
        """Messages sent before, oldest first ([] when none or unreadable)."""
        try:
            data = json.loads(self.history_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return []
        return [m for m in data if isinstance(m, str)] if isinstance(data, list) else []

    def add_history(self, text: str) -> None:
        """Append a sent message (not twice in a row), keeping the last HISTORY_LIMIT;
        under the lock, so two instances both keep theirs."""
        with self._locked():
            history = self.load_history()
            if not history or history[-1] != text:
                history.append(text)
            write_json(self.history_path, history[-HISTORY_LIMIT:])

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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's lock (one lock file, never removed, so a waiter can never
        lock a file another process has just unlinked)."""
        self.chats_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        with open(self.chats_dir / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _read(self, chat_id: str) -> ChatRecord | None:
        """The record as the file holds it now; None when missing or not a chat."""
        try:
            return self.load(chat_id)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
            return None

    def save(self, record: ChatRecord) -> SaveResult | None:
        """Save `record`; a chat with no user message is not kept (its file is removed).

        Under the store's lock, the file is compared with what this record last synced:
        turns another instance appended meanwhile are merged into `record` (ours follow
        theirs), and when the histories diverged (an edit here, turns there) ours is
        written and theirs kept as a copy. Returns what happened; None when not kept.
        """
        path = self.path(record.id)
        with self._locked():
            disk = self._read(record.id)
            merged, copy_id = 0, None
            theirs = disk.transcript if disk is not None else None
            base = record.synced or []
            if theirs is not None and theirs != base and theirs != record.transcript:
                ours = record.transcript
                if _starts_with(theirs, base) and _starts_with(ours, base):
                    merged = len(theirs) - len(base)
                    _append_after(record, disk, len(base))
                elif not _starts_with(ours, theirs):
                    copy_id = self._keep_copy(disk)
            record.synced = [dict(m) for m in record.transcript]
            if not any(m.get("role") == "user" for m in record.transcript):
                path.unlink(missing_ok=True)
                return None
            record.updated = self._now()
            write_json(path, record.to_dict())
        return SaveResult(path, merged, copy_id)

    def _keep_copy(self, record: ChatRecord) -> str:
        """Write `record` under a new id (the lock is held); returns the id."""
        copy = ChatRecord.from_dict(record.to_dict(),
                                    chat_id=f"{record.id}-copy-{secrets.token_hex(3)}")
        write_json(self.path(copy.id), copy.to_dict())
        return copy.id

    def load(self, chat_id: str) -> ChatRecord:
        """Raises OSError or ValueError for a missing or damaged file."""
        data = json.loads(self.path(chat_id).read_text(encoding="utf-8"))
        record = ChatRecord.from_dict(data, chat_id=chat_id)
        record.synced = [dict(m) for m in record.transcript]
        return record

    def delete(self, chat_id: str) -> None:
        """Remove the chat's file (its Markdown export, if any, stays)."""
        with self._locked():
            self.path(chat_id).unlink(missing_ok=True)

    def summaries(self) -> list[ChatSummary]:
        """Saved chats, most recently updated first; unreadable files are skipped (see
        `scan` for their names)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[ChatSummary], list[tuple[str, str]]]:
        """(saved chats, most recently updated first; [(file name, why it was skipped)]).

        A chat's id is its file's name, so a copy of a file (same "id" inside) is
        listed and opened as a chat of its own."""
        out, bad = [], []
        paths = sorted(self.chats_dir.glob("*.json")) if self.chats_dir.is_dir() else []
        for path in paths:
            if path.name.startswith("."):
                continue
            try:
                record = self.load(path.stem)
            except FileNotFoundError:
                continue  # deleted meanwhile
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError,
                    RecursionError) as e:
                reason = "no id" if isinstance(e, KeyError) else str(e) or type(e).__name__
                bad.append((path.name, reason))
                continue
            turns = sum(1 for m in record.transcript if m.get("role") == "user")
            out.append(ChatSummary(record.id, record.title, record.updated, turns))
        return sorted(out, key=lambda s: (s.updated, s.id), reverse=True), bad

    def export_markdown(self, record: ChatRecord) -> Path:
        """Write the chat as Markdown next to its JSON file; returns the path."""
        path = self.path(record.id).with_suffix(".md")
        write_text(path, to_markdown(record))
        return path


def _starts_with(messages: list[dict[str, Any]], prefix: list[dict[str, Any]]) -> bool:
    return len(messages) >= len(prefix) and messages[:len(prefix)] == prefix


def _append_after(record: ChatRecord, disk: ChatRecord, base: int) -> None:
    """Make `record` the file's transcript followed by the messages `record` added
    after its first `base` (both sides only appended since then)."""
    ours, theirs = record.transcript, disk.transcript
    meta = (record.meta + [None] * len(ours))[:len(ours)]
    disk_meta = (disk.meta + [None] * len(theirs))[:len(theirs)]
    transcript = theirs + ours[base:]
    # The model's context stays a suffix of the transcript: as much was dropped as
    # either side dropped; turns ours dropped among its own new ones push theirs out too.
    ours_dropped = len(record.dropped)
    dropped = (len(theirs) + ours_dropped - base if ours_dropped > base
               else max(len(disk.dropped), ours_dropped))
    head = [m for m in record.messages[:1] if m.get("role") == "system"]
    record.dropped = [dict(m) for m in transcript[:dropped]]
    record.messages = head + [dict(m) for m in transcript[dropped:]]
    record.meta = disk_meta + meta[base:]


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
