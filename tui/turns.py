"""One turn, in the generation thread: fit the context, stream the reply, report.

Runs on the library's MLX thread (qwen_mlx.generate.worker) and touches only the
ChatSession it was given; every result reaches the UI as a message through `post`
(thread-safe, never waits).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from textual.message import Message

from qwen_mlx.errors import QwenMLXError

from .context import (
    ContextFull,
    kv_cache_bytes,
    prompt_length,
    reasoning_not_resent,
    reply_reserve,
    turns_to_drop,
)
from .settings import Settings
from .streaming import PrefillProgress, TurnDone, TurnStreamer, TurnTrimmed


@dataclass(frozen=True)
class TurnRequest:
    """What the worker is asked to do: send, regenerate, or edit message `index`."""

    kind: str  # "send" | "regenerate" | "edit"
    turn: int
    settings: Settings  # as they were when the turn started
    text: str = ""
    index: int = -1  # a ChatSession.messages index, for "edit"


def run_turn(request: TurnRequest, session: Any, cancel: threading.Event, *,
             post: Callable[[Message], Any], clock: Callable[[], float],
             interval: float) -> None:
    """Trim to fit, stream the reply through a TurnStreamer, then post TurnDone."""
    settings = request.settings
    streamer = TurnStreamer(post, turn=request.turn, clock=clock, interval=interval,
                            kv_bytes=lambda: kv_cache_bytes(session))
    before = session.messages[-1] if session.messages else None
    error = None
    try:
        index, prompt_tokens = fit_to_context(request, session, post)
        watch = PrefillWatch(cancel, post, request.turn, session, prompt_tokens)
        options = dict(max_tokens=settings.max_tokens, cancel=watch, **settings.sampling())
        if request.kind == "send":
            replies = session.send(request.text, **options)
        elif request.kind == "edit":
            replies = session.edit(index, request.text, **options)
        else:
            replies = session.regenerate(**options)
        for r in replies:
            watch.prefilling = False
            streamer.add(r)
    except (ContextFull, QwenMLXError) as e:
        error = str(e)
    except Exception as e:  # a bug should not leave the UI waiting forever
        error = f"{type(e).__name__}: {e}"
    streamer.flush()
    messages = [dict(m) for m in session.messages]
    # ChatSession appends its reply even when stopped or failed mid-stream; a new last
    # message means this turn has one (the prompt may also have been refused outright).
    replied = bool(messages) and messages[-1].get("role") == "assistant" \
        and session.messages[-1] is not before
    try:
        saved = reasoning_not_resent(session.tokenizer, messages,
                                     enable_thinking=session.enable_thinking)
    except Exception:  # a template that cannot render the probe: no figure to show
        saved = 0
    post(TurnDone(
        request.turn, messages=messages, stats=streamer.stats() if replied else None,
        thinking=streamer.thinking() if replied else None,
        context_tokens=session.cache[0].offset, kv_bytes=kv_cache_bytes(session),
        reasoning_saved=saved, error=error, replied=replied))


class PrefillWatch:
    """The turn's cancel check, which the library polls between prefill chunks (and
    after each token): it also posts PrefillProgress from the cache's growth, since a
    long prompt takes seconds before its first token."""

    def __init__(self, cancel: threading.Event, post: Callable[[Message], Any], turn: int,
                 session: Any, prompt_tokens: int) -> None:
        self.cancel, self.post, self.turn = cancel, post, turn
        self.session, self.prompt_tokens = session, prompt_tokens
        self.prefilling = True  # until the first response
        self._start: tuple[float, int] | None = None

    def __call__(self) -> bool:
        if self.prefilling:
            offset = getattr(self.session.cache[0], "offset", None)
            if isinstance(offset, int):
                now = time.perf_counter()
                if self._start is None:  # the first poll: what the cache reused
                    self._start = (now, offset)
                began, reused = self._start
                # The last prompt token runs with the first decode step, not in a chunk.
                total = max(0, self.prompt_tokens - 1 - reused)
                self.post(PrefillProgress(self.turn, min(offset - reused, total), total,
                                          now - began))
        return self.cancel.is_set()


def fit_to_context(request: TurnRequest, session: Any,
                   post: Callable[[Message], Any]) -> tuple[int, int]:
    """Drop the oldest turns from the session when the prompt would not fit, and post
    TurnTrimmed; returns (the edit index shifted by what was dropped, the prompt's
    length in tokens). Raises ContextFull when the new message alone does not fit."""
    messages = session.messages
    new_user = [{"role": "user", "content": request.text}]
    if request.kind == "send":
        upcoming = messages + new_user
    elif request.kind == "edit":
        upcoming = messages[:request.index] + new_user
    else:  # regenerate: the history up to the last user message
        upcoming = messages[:-1] if messages and messages[-1]["role"] == "assistant" \
            else list(messages)
    limit = session.model.max_context
    reserve = reply_reserve(limit, request.settings.max_tokens)
    think = session.enable_thinking
    drop = turns_to_drop(session.tokenizer, upcoming, limit=limit, reserve=reserve,
                         enable_thinking=think)
    if not drop:
        return request.index, prompt_length(session.tokenizer, upcoming, enable_thinking=think)
    head = 1 if messages and messages[0]["role"] == "system" else 0
    full = prompt_length(session.tokenizer, upcoming, enable_thinking=think)
    kept = prompt_length(session.tokenizer, upcoming[:head] + upcoming[head + drop:],
                         enable_thinking=think)
    dropped = messages[head:head + drop]
    session.messages = messages[:head] + messages[head + drop:]
    # Everything after the system prompt moves, so little of the cache could be reused;
    # a fresh one is sized to what is left and frees the rest (a trimmed cache keeps
    # its buffers, and the meter's KV figure would never shrink).
    bits = next((c.bits for c in session.cache if getattr(c, "bits", None)), None)
    session.cache = session.model.make_cache(kv_bits=bits)
    session.cached = []
    post(TurnTrimmed(request.turn, [dict(m) for m in dropped], full - kept))
    return request.index - drop, kept
