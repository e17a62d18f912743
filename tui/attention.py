"""The chat UI's attention-map key: the map of the last reply's prompt, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen_mlx.errors import QwenMLXError

# Maps hold [heads, L, L] per layer: past this many tokens they grow too large to draw.
MAX_TOKENS = 512


def last_reply_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The messages the last assistant reply answered, or None before the first reply."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return messages[:i]
    return None


def save_attention_map(model: Any, tokenizer: Any, messages: list[dict[str, Any]],
                       enable_thinking: bool | None, path: Path) -> Path:
    """Render `messages` as the reply's prompt, and save its attention map (the mean over
    the softmax layers and heads) to `path`. Runs MLX: call it on the MLX thread."""
    from qwen_mlx.quality.attention_maps import attention_maps, save_png

    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             enable_thinking=enable_thinking))
    if len(ids) > MAX_TOKENS:
        raise QwenMLXError(f"the last reply's prompt has {len(ids):,} tokens; attention maps "
                           f"are drawn for prompts of up to {MAX_TOKENS} (use `qwen-mlx "
                           "attention` on a shorter prompt)")
    softmax = [i for i, kind in enumerate(model.config.layer_kinds) if kind == "attention"]
    maps = attention_maps(model, tokenizer, ids, layers=softmax)
    return save_png(maps, path, title=f"the last reply's prompt ({len(ids)} tokens)")
