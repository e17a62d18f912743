"""Snapshots of the chat UI (pytest-textual-snapshot) at 80x24 and 100x30.

The conversation is a saved chat reopened at start, with its statistics and
thinking time in the file, so no timing from a real run reaches the pictures;
the clock is frozen too. Update with: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import json

import pytest

import qwen_mlx
from conftest import build_checkpoint, write_tiny_tokenizer
from tui.app import ChatApp
from tui.store import ChatStore

SIZES = [(80, 24), (100, 30)]
STATS = {"ttft": 0.21, "prompt_tokens": 14, "cached_tokens": 0, "prompt_tps": 812.0,
         "generation_tokens": 57, "generation_tps": 55.3, "peak_memory": 0.52,
         "context_tokens": 85, "finish_reason": "stop"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # The folder's name is in the header, so it must not carry pytest's numbering.
    folder = tmp_path_factory.mktemp("snap") / "Qwen3-tiny"
    folder.mkdir()
    build_checkpoint(folder, "qwen3", vocab_size=320, max_position_embeddings=256,
                     num_hidden_layers=2, head_dim=32)
    write_tiny_tokenizer(folder, vocab=320, chat_template="qwen3")
    return folder, qwen_mlx.load(folder)


def app_with_a_finished_chat(tiny, data_dir) -> ChatApp:
    folder, loaded = tiny
    (data_dir / "settings.json").write_text(json.dumps({"system_prompt": "Be brief."}))
    store = ChatStore(data_dir)
    record = store.new_chat(system="Be brief.")
    record.id = "snapshot"
    record.messages += [
        {"role": "user", "content": "What is MLX?"},
        {"role": "assistant",
         "reasoning_content": "The user asks about MLX: Apple's array framework. "
                              "A short answer with an example will do.",
         "content": "**MLX** is Apple's array framework for machine learning on Apple "
                    "silicon.\n\n```python\nimport mlx.core as mx\nx = mx.ones((2, 2))\n```"},
        {"role": "user", "content": "Thanks! /no_think"},
        {"role": "assistant", "reasoning_content": "", "content": "You're welcome."},
    ]
    record.meta = [None, {"stats": STATS, "thinking": {"tokens": 31, "seconds": 1.4}}, None,
                   {"stats": dict(STATS, generation_tokens=6, cached_tokens=80)}]
    store.save(record)
    return ChatApp(folder, data_dir=data_dir, preloaded=loaded, chat_id="snapshot",
                   clock=lambda: 0.0)


async def settle(pilot) -> None:
    """Let the context measurement (a worker) land before the picture."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_main_screen(snap_compare, tiny, tmp_path, size):
    assert snap_compare(app_with_a_finished_chat(tiny, tmp_path), terminal_size=size,
                        run_before=settle)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_settings_screen(snap_compare, tiny, tmp_path, size):
    async def open_settings(pilot) -> None:
        await settle(pilot)
        await pilot.press("f2")
        await pilot.pause()

    assert snap_compare(app_with_a_finished_chat(tiny, tmp_path), terminal_size=size,
                        run_before=open_settings)
