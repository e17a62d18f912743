"""Reasoning blocks: split a streamed reply into its thinking and its answer.

Qwen3 (and QwQ) reason inside ``<think>…</think>`` before answering. Both tags are
ordinary, non-special added tokens, so they survive decoding and reach us as text,
possibly cut anywhere by the stream. Qwen3 lays a reply out as
``<think>\\nreasoning\\n</think>\\n\\nanswer``, and with thinking off the template prefills
``<think>\\n\\n</think>\\n\\n``, which the model may also write itself after ``/no_think``.
Qwen3.5/3.6 templates prefill ``<think>\\n`` instead (thinking on) and have no soft switch.

`ThinkingParser` trims exactly this, so a UI gets clean text:

- each thinking segment loses its leading and trailing whitespace (``str.strip()``),
  so a whitespace-only segment, such as the empty block, yields nothing at all;
- the answer loses the newlines (``\\n``, ``\\r``) right after each ``</think>``.

Nothing else is touched: the answer keeps its own whitespace, and text before the first
``<think>`` is answer. In the answer a ``</think>`` is plain text, and in the reasoning a
``<think>`` is, since only the tag that ends the current phase is looked for.
"""

from __future__ import annotations

import re

__all__ = ["ThinkingParser", "mentions_soft_switch", "strip_reasoning", "thinking_enabled"]

THINKING, ANSWER = "thinking", "answer"


class ThinkingParser:
    """Incremental splitter of reply text into ("thinking" | "answer", text) pieces.

    Feeding a text in any chunks gives the same pieces (once merged) as feeding it whole.
    """

    def __init__(self, *, in_thinking: bool = False, open_tag: str = "<think>",
                 close_tag: str = "</think>"):
        """`in_thinking`: the prompt already opened a block (Qwen3-2507 Thinking, QwQ)."""
        if not open_tag or not close_tag:
            raise ValueError("open_tag and close_tag must be non-empty")
        self.open_tag, self.close_tag = open_tag, close_tag
        self._phase = THINKING if in_thinking else ANSWER
        self._held = ""  # the end of the last feed, which may begin a tag
        self._at_segment_start = True  # strip leading whitespace (thinking) / newlines (answer)
        self._after_close = False  # the current answer segment follows a </think>
        self._pending_space = ""  # thinking whitespace, emitted only if reasoning follows
        self._texts = {THINKING: [], ANSWER: []}

    @property
    def phase(self) -> str:
        """The current phase: "thinking" inside a block, even before its first text."""
        return self._phase

    @property
    def thinking_text(self) -> str:
        """All reasoning emitted so far, segments concatenated."""
        return "".join(self._texts[THINKING])

    @property
    def answer_text(self) -> str:
        """All answer text emitted so far."""
        return "".join(self._texts[ANSWER])

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Add streamed text; returns the (phase, text) pieces it settles, in order."""
        out: list[tuple[str, str]] = []
        buf = self._held + text
        while True:
            tag = self.close_tag if self._phase == THINKING else self.open_tag
            at = buf.find(tag)
            if at < 0:
                break
            self._emit(buf[:at], out)
            buf = buf[at + len(tag):]
            self._switch()
        keep = _partial_suffix(buf, tag)
        self._held = buf[len(buf) - keep:] if keep else ""
        self._emit(buf[:len(buf) - keep], out)
        return out

    def flush(self) -> list[tuple[str, str]]:
        """End of reply: a held partial tag is text after all; trailing thinking
        whitespace is dropped."""
        out: list[tuple[str, str]] = []
        held, self._held = self._held, ""
        self._emit(held, out)
        self._pending_space = ""
        return out

    def _switch(self) -> None:
        """Cross a tag: the other phase starts a new segment."""
        self._after_close = self._phase == THINKING
        self._phase = ANSWER if self._phase == THINKING else THINKING
        self._at_segment_start = True
        self._pending_space = ""  # trailing whitespace of a closed segment is dropped

    def _emit(self, text: str, out: list[tuple[str, str]]) -> None:
        """Trim `text` for the current phase and append it to `out`, merging phases."""
        if self._phase == THINKING:
            if self._at_segment_start:
                text = text.lstrip()
            text = self._pending_space + text
            body = text.rstrip()
            self._pending_space = text[len(body):]
            text = body
        elif self._after_close and self._at_segment_start:
            text = text.lstrip("\r\n")
        if not text:
            return
        self._at_segment_start = False
        self._texts[self._phase].append(text)
        if out and out[-1][0] == self._phase:
            out[-1] = (self._phase, out[-1][1] + text)
        else:
            out.append((self._phase, text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# A soft switch is a word of its own: "/think" in "/thinking", "src/think" or the tag
# "</think>" is not one.
_SWITCH = re.compile(r"(?<![\w/<])/(think|no_think)(?!\w)")


def mentions_soft_switch(text: str) -> bool:
    """Whether `text` holds a ``/think`` or ``/no_think`` switch word."""
    return _SWITCH.search(text) is not None


def _content_text(content) -> str:
    """A message's text: a string, or the text parts of a multimodal part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def thinking_enabled(messages: list[dict], enable_thinking: bool | None, *,
                     soft_switch: bool = True) -> bool:
    """Whether the model will reason in its next reply (spec §5, soft switch).

    ``enable_thinking=False`` turns thinking off whatever the messages say. Otherwise
    (None, the default, means on) the latest ``/think`` or ``/no_think`` in a user or
    system message decides, and with neither thinking is on. Pass ``soft_switch=False``
    for a chat template without the switch (`QwenTokenizer.has_soft_switch`): Qwen3.5/3.6
    open the reasoning block themselves and were not trained on it, so there the words
    are plain text and only `enable_thinking` counts.
    """
    if enable_thinking is False:
        return False
    if not soft_switch:
        return True
    for message in reversed(messages):
        if message.get("role") not in ("user", "system"):
            continue
        switches = _SWITCH.findall(_content_text(message.get("content")))
        if switches:
            return switches[-1] == "think"
    return True


def strip_reasoning(text: str, open_tag: str = "<think>",
                    close_tag: str = "</think>") -> tuple[str, str]:
    """(reasoning, answer) of a complete reply, by the Qwen3 template's rule (spec §5).

    Without a `close_tag` the whole text is answer. Otherwise the reasoning is the text
    before the first `close_tag`, after the last `open_tag` in it, with newlines trimmed
    at both ends; the answer is the text after that `close_tag`, leading newlines removed.
    (The template itself takes the answer after the *last* ``</think>``; splitting once
    keeps an answer that mentions the tag whole, and agrees whenever there is one tag.)
    """
    before, found, after = text.partition(close_tag)
    if not found:
        return "", text
    reasoning = before.rsplit(open_tag, 1)[-1]
    return reasoning.strip("\n"), after.lstrip("\n")
