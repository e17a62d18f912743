"""From the generation thread to the UI: batched, non-blocking updates.

The worker thread iterates `ChatSession`'s responses and hands them to a
`TurnStreamer`, which merges the text deltas and posts a `TurnProgress` at most
every `interval` seconds. `post_message` is thread-safe and only enqueues, so
decoding never waits for the UI to render (App.call_from_thread would block
the worker until the event loop had run the callback).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from textual.message import Message

from .stats import TurnStats

THINKING, ANSWER = "thinking", "answer"


@dataclass(frozen=True)
class ThinkingInfo:
    """How long and how many tokens the model reasoned."""

    tokens: int
    seconds: float
    done: bool  # the answer has started


class TurnProgress(Message):
    """A batch of streamed text, [(phase, text)], with the latest statistics."""

    def __init__(self, turn: int, pieces: list[tuple[str, str]], stats: TurnStats | None,
                 thinking: ThinkingInfo | None, kv_bytes: int | None = None) -> None:
        super().__init__()
        self.turn, self.pieces, self.stats, self.thinking = turn, pieces, stats, thinking
        self.kv_bytes = kv_bytes  # the KV cache as it grows; None when not known


class PrefillProgress(Message):
    """The prompt is being run into the cache: `done` of `total` new tokens so far."""

    def __init__(self, turn: int, done: int, total: int, seconds: float) -> None:
        super().__init__()
        self.turn, self.done, self.total, self.seconds = turn, done, total, seconds

    @property
    def tps(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


class TurnTrimmed(Message):
    """Older messages were dropped from the context so that the new prompt fits."""

    def __init__(self, turn: int, dropped: list[dict[str, Any]], freed: int) -> None:
        super().__init__()
        self.turn, self.dropped, self.freed = turn, dropped, freed


class TurnDone(Message):
    """The reply ended (finished, stopped or failed) and the history as it now stands."""

    def __init__(self, turn: int, *, messages: list[dict[str, Any]], stats: TurnStats | None,
                 thinking: ThinkingInfo | None, context_tokens: int, kv_bytes: int,
                 reasoning_saved: int, error: str | None = None, replied: bool = True) -> None:
        super().__init__()
        self.replied = replied  # the session gained a reply (even a stopped or failed one)
        self.turn, self.messages, self.stats, self.thinking = turn, messages, stats, thinking
        self.context_tokens, self.kv_bytes = context_tokens, kv_bytes
        self.reasoning_saved, self.error = reasoning_saved, error


class TurnStreamer:
    """Accumulates GenerationResponses in the worker thread and posts them in batches.

    `clock` times the thinking (injectable so tests and snapshots can freeze it);
    batching always uses the real monotonic clock.
    """

    def __init__(self, post: Callable[[Message], Any], *, turn: int,
                 clock: Callable[[], float] = time.monotonic, interval: float = 0.05,
                 kv_bytes: Callable[[], int] | None = None):
        self.post, self.turn, self.clock, self.interval = post, turn, clock, interval
        self.kv_bytes = kv_bytes
        self.pending: list[tuple[str, str]] = []
        self.last: Any = None
        self.thinking_tokens = 0
        self._thinking_from: float | None = None
        self._answer_from: float | None = None
        self._posted_at = float("-inf")
        self._dirty = False

    def add(self, r: Any) -> None:
        """Take one response; post a batch if the last one is old enough."""
        if r.text:
            now = self.clock()
            if r.phase == THINKING and self._thinking_from is None:
                self._thinking_from = now
            elif (r.phase == ANSWER and self._answer_from is None
                  and self._thinking_from is not None):
                self._answer_from = now
            if self.pending and self.pending[-1][0] == r.phase:
                self.pending[-1] = (r.phase, self.pending[-1][1] + r.text)
            else:
                self.pending.append((r.phase, r.text))
        if r.phase == THINKING:
            self.thinking_tokens = r.generation_tokens
        self.last, self._dirty = r, True
        if time.monotonic() - self._posted_at >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Post what has accumulated (nothing when nothing changed)."""
        if not self._dirty or self.last is None:
            return
        pieces, self.pending, self._dirty = self.pending, [], False
        self._posted_at = time.monotonic()
        kv = self.kv_bytes() if self.kv_bytes is not None else None
        self.post(TurnProgress(self.turn, pieces, self.stats(), self.thinking(), kv))

    def stats(self) -> TurnStats | None:
        return TurnStats.from_response(self.last) if self.last is not None else None

    def thinking(self) -> ThinkingInfo | None:
        """None when the reply has shown no reasoning (an empty think block stays hidden)."""
        if self._thinking_from is None:
            return None
        end = self._answer_from if self._answer_from is not None else self.clock()
        return ThinkingInfo(self.thinking_tokens, max(0.0, end - self._thinking_from),
                            self._answer_from is not None)
