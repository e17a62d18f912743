"""Snapshots of the chat UI (pytest-textual-snapshot) at 80x24 and 100x30.

The conversation is a saved chat reopened at start, with its statistics and
thinking time in the file, so no timing from a real run reaches the pictures;
the clock is frozen too. Update with: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import json
import time
from typing import Callable

import pytest
from textual.widgets import TextArea

import qwen_mlx
from conftest import build_checkpoint, write_tiny_tokenizer
from tui.app import ChatApp
from tui.context import history_length
from tui.screens.settings import SettingsScreen
from tui.store import ChatStore
from tui.text import clean
from tui.widgets.messages import AssistantMessage
from tui.widgets.status import ContextMeter

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


async def settle(pilot, ready: Callable[[], bool], what: str) -> None:
    """Wait until `ready()` holds with no worker left running, then stop the cursors
    blinking (whether a blinking cursor shows depends on when the picture is taken,
    which a busy machine makes random). Never a fixed sleep: a condition, polled."""
    app = pilot.app
    deadline = time.monotonic() + 60
    while True:
        await app.workers.wait_for_complete()
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()
        if ready() and not any(w.is_running for w in app.workers):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
    for widget in app.screen.query("TextArea, Input"):
        widget.cursor_blink = False
    await pilot.pause()


def chat_shown(app: ChatApp) -> bool:
    """The saved chat is on screen, its Markdown rendered and its context measured."""
    chat = app.chat
    if chat.record is None or chat.record.id != "snapshot" or app.screen is not chat:
        return False
    widgets = chat.conversation.messages
    replies = [w for w in widgets if isinstance(w, AssistantMessage)]
    meter = chat.query_one(ContextMeter)
    expected = history_length(app.tokenizer, chat.record.messages, enable_thinking=None)
    return (len(widgets) == 4 and meter.state is not None and meter.state.used == expected
            and all(r.body.source == clean(r.answer) and r.body.children for r in replies))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_main_screen(snap_compare, tiny, tmp_path, size):
    async def shown(pilot) -> None:
        await settle(pilot, lambda: chat_shown(pilot.app), "the chat")

    assert snap_compare(app_with_a_finished_chat(tiny, tmp_path), terminal_size=size,
                        run_before=shown)


@pytest.mark.parametrize("size", SIZES + [(50, 24)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_settings_screen(snap_compare, tiny, tmp_path, size):
    # 50 columns: each pair of fields takes two lines instead of being cut off.
    async def open_settings(pilot) -> None:
        app = pilot.app
        await settle(pilot, lambda: chat_shown(app), "the chat")
        await pilot.press("f2")

        def ready() -> bool:
            if not isinstance(app.screen, SettingsScreen):
                return False
            prompt = app.screen.query_one("#system_prompt", TextArea)
            return (prompt.has_focus and prompt.text == "Be brief."
                    and prompt.cursor_location == prompt.document.end)

        await settle(pilot, ready, "the settings dialog")

    assert snap_compare(app_with_a_finished_chat(tiny, tmp_path), terminal_size=size,
                        run_before=open_settings)


@pytest.fixture(autouse=True, scope="module")
def report_under_tmp(request, tmp_path_factory):
    """A failed snapshot's HTML report goes under pytest's temporary folder, not into
    the working directory (unless --snapshot-report names a place)."""
    option = request.config.option
    if getattr(option, "snapshot_report", None) == "snapshot_report.html":
        option.snapshot_report = str(tmp_path_factory.getbasetemp() / "snapshot_report.html")
