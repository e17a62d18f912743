"""The context window: how full it is, what fits, and what Qwen3's template saves.

All of it asks the tokenizer and the chat template, so it holds for any Qwen
template; the heavier calls run in worker threads.
"""

from __future__ import annotations

from typing import Any

WARN_AT = 0.85  # warn when the context is this full, before it overflows


class ContextFull(Exception):
    """Even the newest message alone does not fit the context."""


def kv_cache_bytes(session: Any) -> int:
    """Bytes a session's cache holds (allocated buffers, every layer), and the turn
    snapshots a hybrid model's session keeps beside it."""
    return sum(int(c.nbytes) for c in session.cache) + int(getattr(session, "snapshot_bytes", 0))


def limit_label(model: Any) -> str:
    """"YaRN 4x" when the model was loaded with YaRN and the context limit reaches past
    the native context (a max context within it leaves YaRN nothing to extend), "DCA"
    when Dual Chunk Attention is on, both joined, else ""."""
    labels = ["DCA"] if getattr(model, "dca", None) is not None else []
    rope = model.config.rope
    native = rope.original_max_position_embeddings or 0
    if rope.rope_type == "yarn" and model.max_context > native:
        labels.append(f"YaRN {rope.factor:g}x")
    return " · ".join(labels)


def reply_reserve(limit: int, max_tokens: int) -> int:
    """Positions kept free for the reply: max tokens, but at most a quarter of the context
    (a long max_tokens should not empty a small context of its history)."""
    return max(1, min(max_tokens, limit // 4))


def prompt_length(tokenizer: Any, messages: list[dict], *, enable_thinking: bool | None) -> int:
    """Tokens of the prompt that asks for a reply to `messages`."""
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             enable_thinking=enable_thinking))


def history_length(tokenizer: Any, messages: list[dict], *, enable_thinking: bool | None) -> int:
    """Positions the conversation occupies as the next turn will render it (0 when empty)."""
    if not messages:
        return 0
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                             enable_thinking=enable_thinking))


def turns_to_drop(tokenizer: Any, messages: list[dict], *, limit: int, reserve: int,
                  enable_thinking: bool | None) -> int:
    """How many of the oldest non-system messages to drop so that the prompt for
    `messages` (ending with the user message to answer) leaves `reserve` free.

    Whole turns go, up to the next user message, so the rest still starts with a
    user turn; the system prompt always stays. Raises ContextFull when the last
    user message alone does not fit.
    """
    head = [m for m in messages[:1] if m.get("role") == "system"]
    body = messages[len(head):]
    drop = 0
    while True:
        needed = prompt_length(tokenizer, head + body[drop:], enable_thinking=enable_thinking)
        if needed + reserve <= limit:
            return drop
        later = [i for i in range(drop + 1, len(body)) if body[i].get("role") == "user"]
        if not later:
            raise ContextFull(
                f"the message needs more than the {limit}-token context: {needed:,} tokens "
                f"with what must stay, and {reserve} kept for the reply; shorten it, or raise "
                "the max context / turn on YaRN in the settings")
        drop = later[0]


def reasoning_not_resent(tokenizer: Any, messages: list[dict], *,
                         enable_thinking: bool | None) -> int:
    """Tokens of earlier replies' reasoning that the next prompt leaves out.

    Qwen3's template drops the reasoning of turns before the last user query; a
    template that keeps it saves nothing. We render the next prompt and count the
    reasoning that is not in it.
    """
    reasoning = [m.get("reasoning_content") or "" for m in messages
                 if m.get("role") == "assistant"]
    reasoning = [r for r in reasoning if r.strip()]
    if not reasoning:
        return 0
    probe = list(messages) + [{"role": "user", "content": "\ue000"}]
    rendered = tokenizer.apply_chat_template(probe, add_generation_prompt=True,
                                             enable_thinking=enable_thinking, tokenize=False)
    return sum(len(tokenizer.encode(r)) for r in reasoning if r not in rendered)
