"""The chat UI, headless with Textual's Pilot, on a tiny random Qwen3 checkpoint.

Turns go through the real library (ChatSession, the decode loop, the chat
template); only the thinking-fold test feeds responses to the widgets directly,
since random weights never close a <think> block on cue.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from textual.widgets import Checkbox, Input

import qwen_mlx
from conftest import build_checkpoint, write_tiny_tokenizer
from qwen_mlx.generate.generation import ChatSession, GenerationResponse
from qwen_mlx.text.tokenizer import QwenTokenizer
from tui.app import ChatApp
from tui.paths import resolve_data_dir
from tui.screens.chats import ChatsScreen
from tui.screens.confirm import ConfirmScreen
from tui.screens.help import HelpScreen
from tui.screens.settings import SettingsScreen
from tui.store import ChatStore
from tui.streaming import TurnStreamer
from tui.text import clean
from tui.widgets.messages import AssistantMessage, NoticeMessage, UserMessage
from tui.widgets.status import ContextMeter, ContextState

pytestmark = pytest.mark.anyio

VOCAB = 320
SIZE = (100, 30)
# A template whose generation prompt opens a reasoning block (as Qwen3-2507 Thinking
# does) and which, like Qwen3's, never resends earlier reasoning.
THINKING_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + "
    "'<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tui") / "Qwen3-tiny"
    folder.mkdir()
    build_checkpoint(folder, "qwen3", vocab_size=VOCAB, max_position_embeddings=256,
                     num_hidden_layers=2, head_dim=32)
    write_tiny_tokenizer(folder, vocab=VOCAB, chat_template="qwen3")
    model, tokenizer = qwen_mlx.load(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def thinking_tokenizer(tiny, tmp_path_factory):
    folder, _, _ = tiny
    copy = tmp_path_factory.mktemp("tui-think")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (folder / name).exists():
            shutil.copy(folder / name, copy / name)
    (copy / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    return QwenTokenizer.from_folder(copy)


def make_app(tiny, data_dir: Path, *, settings: dict | None = None, preloaded=None,
             **kwargs) -> ChatApp:
    """An app on the tiny model; greedy and short replies unless `settings` say otherwise."""
    folder, model, tokenizer = tiny
    values = {"temperature": 0.0, "max_tokens": 12, **(settings or {})}
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "settings.json").write_text(json.dumps(values))
    return ChatApp(folder, data_dir=data_dir, preloaded=preloaded or (model, tokenizer),
                   flush_interval=0.01, **kwargs)


async def wait_for(pilot, condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until `condition()` holds (one pause is never proof that a worker finished)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def send(pilot, text: str) -> None:
    """Type `text` into the message box, press Enter, and wait for the reply to end."""
    chat = pilot.app.chat
    await wait_for(pilot, lambda: chat.session is not None, what="the model")
    turns = chat.turn
    chat.prompt.set_text(text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: chat.turn > turns and not chat.busy, what="the reply")
    await pilot.pause()


def replies(app) -> list[AssistantMessage]:
    return [m for m in app.chat.conversation.messages if isinstance(m, AssistantMessage)]


# ------------------------------------------------------------------------- turns


async def test_send_shows_the_streamed_reply_and_saves_the_chat(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"hello")
        await send(pilot, "hello world")
        chat = app.chat
        session = chat.session
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
        answer = session.messages[-1]["content"]
        assert answer  # random weights still say something
        user, reply = chat.conversation.messages
        assert isinstance(user, UserMessage) and user.text == "hello world"
        assert reply.answer == answer and reply.body.source == clean(answer)
        assert not reply.thinking_block.display  # no reasoning: no empty block
        stats = str(chat.query_one("#stats").render())
        assert "TTFT" in stats and "decode" in stats and "peak" in stats
        meter = str(chat.query_one("#context").render())
        assert f"{session.cache[0].offset:,}/256" in meter and "KV" in meter
        saved = json.loads(app.store.path(chat.record.id).read_text())
        assert saved["messages"] == session.messages
        assert saved["meta"][-1]["stats"]["generation_tokens"] >= 1


def test_streamed_progress_carries_the_growing_kv_cache(tiny):
    from tui.context import kv_cache_bytes
    from tui.settings import Settings
    from tui.streaming import TurnDone, TurnProgress
    from tui.turns import TurnRequest, run_turn

    _, model, tokenizer = tiny
    session = ChatSession(model, tokenizer)
    posted = []
    request = TurnRequest("send", 1, Settings(temperature=0.0, max_tokens=8), "hello")
    run_turn(request, session, threading.Event(), post=posted.append, clock=time.monotonic,
             interval=0)
    kv = [m.kv_bytes for m in posted if isinstance(m, TurnProgress)]
    assert kv and kv[0] > 0 and kv == sorted(kv)
    done = posted[-1]
    assert isinstance(done, TurnDone) and kv[-1] == done.kv_bytes == kv_cache_bytes(session)


class ThreadRecordingSession(ChatSession):
    threads: list[int] = []

    def respond(self, **options):
        type(self).threads.append(threading.get_ident())
        yield from super().respond(**options)


async def test_every_turn_runs_on_the_apps_one_mlx_thread(tiny, tmp_path):
    # MLX keeps each thread's streams for good: a thread per turn would pile them up.
    app = make_app(tiny, tmp_path, session_factory=ThreadRecordingSession)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "one")
        await send(pilot, "two")
        assert len(ThreadRecordingSession.threads) == 2
        assert set(ThreadRecordingSession.threads) == {app.mlx.ident}


class GatedSession(ChatSession):
    """A real ChatSession that pauses after its first streamed response until released,
    so the test can press Esc while the reply is mid-stream."""

    started = threading.Event()
    release = threading.Event()

    def respond(self, **options):
        for i, r in enumerate(super().respond(**options)):
            yield r
            if i == 0:
                type(self).started.set()
                type(self).release.wait(30)


@pytest.mark.parametrize("key", ["escape", "ctrl+c"])
async def test_stop_mid_reply_keeps_the_history_consistent(tiny, tmp_path, key):
    GatedSession.started.clear()
    GatedSession.release.clear()
    app = make_app(tiny, tmp_path, settings={"max_tokens": 40},
                   session_factory=GatedSession)
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        await wait_for(pilot, lambda: chat.session is not None)
        chat.prompt.set_text("hello world")
        await pilot.press("enter")
        await wait_for(pilot, GatedSession.started.is_set, what="the first token")
        assert chat.busy
        await pilot.press(key)
        assert chat.cancel_event.is_set()  # at once, before the worker comes back
        GatedSession.release.set()
        await wait_for(pilot, lambda: not chat.busy, what="the stop")
        session = chat.session
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
        meta = chat.record.meta[-1]["stats"]
        assert meta["finish_reason"] == "cancelled" and meta["generation_tokens"] <= 2
        assert "stopped" in str(replies(app)[-1].note.render())
        # The cache holds exactly the history as the next turn renders it ...
        assert len(session.cached) == session.cache[0].offset > 0
        # ... so the next turn reuses it and replies normally.
        await send(pilot, "the quick brown fox")
        assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
        stats = chat.record.meta[-1]["stats"]
        assert stats["cached_tokens"] > 0 and stats["finish_reason"] != "cancelled"


async def test_regenerate_replaces_the_last_reply(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello world")
        chat = app.chat
        first_widget = replies(app)[-1]
        first = chat.session.messages[-1]["content"]
        turns = chat.turn
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: chat.turn > turns and not chat.busy)
        assert [m["role"] for m in chat.session.messages] == ["user", "assistant"]
        assert len(replies(app)) == 1 and replies(app)[0] is not first_widget
        assert chat.session.messages[-1]["content"] == first  # greedy: the same reply
        assert chat.record.meta[-1]["stats"]["cached_tokens"] > 0  # the prompt was reused


async def test_edit_resends_an_earlier_message(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello world")
        await send(pilot, "the quick brown fox")
        chat = app.chat
        chat.conversation.messages[0].focus()
        await pilot.press("e")
        assert chat.editing == 0 and chat.prompt.text == "hello world"
        assert chat.query_one("#edit-banner").display
        turns = chat.turn
        chat.prompt.set_text("def main")
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.turn > turns and not chat.busy)
        messages = chat.session.messages
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[0]["content"] == "def main"
        widgets = chat.conversation.messages
        assert len(widgets) == 2 and widgets[0].text == "def main"
        assert not chat.query_one("#edit-banner").display


# ---------------------------------------------------------------------- thinking


def response(text: str, phase: str, tokens: int) -> GenerationResponse:
    return GenerationResponse(text=text, token=1, phase=phase, prompt_tokens=9, prompt_tps=90.0,
                              generation_tokens=tokens, generation_tps=30.0, peak_memory=0.5,
                              context_tokens=9 + tokens)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_thinking_streams_open_then_folds_when_the_answer_starts(tiny, tmp_path):
    clock = FakeClock()
    app = make_app(tiny, tmp_path, clock=clock)
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        reply = AssistantMessage()
        await chat.conversation.mount(reply)
        reply.start()
        chat.turn += 1
        chat.reply = reply
        streamer = TurnStreamer(chat.post_message, turn=chat.turn, clock=clock, interval=0)
        block = reply.thinking_block
        streamer.add(response("", "thinking", 1))  # the opening tag: nothing to show yet
        await pilot.pause()
        assert not block.display
        streamer.add(response("Let me see", "thinking", 2))
        clock.now += 1.5
        streamer.add(response(": 2 + 2.", "thinking", 4))
        await wait_for(pilot, lambda: block.body.source == "Let me see: 2 + 2.")
        assert block.display and not block.collapsed
        assert block.title.startswith("Thinking…") and "4 tokens" in block.title
        clock.now += 1.0
        streamer.add(response("It is **4**.", "answer", 6))
        await wait_for(pilot, lambda: block.collapsed, what="the fold")
        assert block.title == "Thought for 2.5 s · 4 tokens"
        await wait_for(pilot, lambda: reply.body.source == "It is **4**.")


async def test_reasoning_lands_in_the_thinking_block(tiny, thinking_tokenizer, tmp_path):
    _, model, _ = tiny
    app = make_app(tiny, tmp_path, settings={"max_tokens": 8},
                   preloaded=(model, thinking_tokenizer))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello world")
        chat = app.chat
        last = chat.session.messages[-1]
        reasoning = last["reasoning_content"]
        assert reasoning  # the template opened <think>, so the reply began as reasoning
        block = replies(app)[-1].thinking_block
        assert block.display and block.body.source == clean(reasoning)
        assert "tokens" in block.title and block.title.startswith("Thought for")
        # The next prompt leaves this reasoning out; the meter says what that saved.
        saved = len(thinking_tokenizer.encode(reasoning))
        meter = chat.query_one(ContextMeter)
        assert meter.state.reasoning_saved == saved
        assert f"not resent: {saved:,} tok" in str(meter.render())


async def test_thinking_toggle_and_soft_switches(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        await wait_for(pilot, lambda: chat.session is not None)
        meter = lambda: str(chat.query_one("#context").render())  # noqa: E731
        await wait_for(pilot, lambda: "thinking on" in meter())
        await pilot.press("ctrl+t")
        assert chat.session.enable_thinking is False and chat.record.enable_thinking is False
        assert "thinking off" in meter()
        await pilot.press("ctrl+t")
        assert chat.session.enable_thinking is None and "thinking on" in meter()
        await pilot.press(*"hi /no_think")
        assert "thinking off (/no_think)" in meter()


# ------------------------------------------------------------- settings and chats


async def test_the_model_loads_in_a_worker_and_load_errors_show(tiny, tmp_path):
    folder, _, _ = tiny
    app = ChatApp(folder, data_dir=tmp_path / "a")
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat  # the window is up before the model
        await wait_for(pilot, lambda: chat.session is not None, what="the load")
        assert not chat.query_one("#loading").display
        assert "ctx" in str(chat.query_one("#context").render())
    app = ChatApp(tmp_path / "missing", data_dir=tmp_path / "b")
    async with app.run_test(size=SIZE) as pilot:
        label = app.chat.query_one("#loading-label")
        await wait_for(pilot, lambda: "no such model folder" in str(label.render()))
        assert app.chat.session is None and app.chat.query_one("#loading").display


async def test_settings_persist_and_long_context_reloads_the_model(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        await wait_for(pilot, lambda: chat.session is not None)
        old_model = app.model
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        screen = app.screen
        await pilot.click("#preset-thinking")
        assert screen.query_one("#temperature", Input).value == "0.6"
        assert screen.query_one("#top_k", Input).value == "20"
        screen.query_one("#top_p", Input).value = "1.5"  # out of range: refused
        await pilot.press("ctrl+s")
        assert app.screen is screen and "top_p" in str(screen.query_one("#settings-error").render())
        screen.query_one("#top_p", Input).value = "0.9"
        screen.query_one("#max_tokens", Input).value = "7"
        screen.query_one("#yarn", Checkbox).value = True
        screen.query_one("#rope_factor", Input).value = "4"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen is chat)
        saved = json.loads((tmp_path / "settings.json").read_text())
        assert saved["temperature"] == 0.6 and saved["top_p"] == 0.9
        assert saved["max_tokens"] == 7 and saved["rope_scaling"] == "yarn"
        # The long-context change reloads the model in a worker, with YaRN on.
        await wait_for(pilot, lambda: app.model is not None and app.model is not old_model
                       and chat.session is not None, what="the reload")
        assert app.model.config.rope.rope_type == "yarn" and app.model.max_context == 1024
        await wait_for(pilot, lambda: "/1,024 YaRN 4x" in str(chat.query_one("#context").render()))
    # A new run reads them back.
    again = ChatApp(tiny[0], data_dir=tmp_path, preloaded=tiny[1:])
    assert again.settings.temperature == 0.6 and again.settings.max_tokens == 7


async def test_reopening_a_saved_chat_restores_it(tiny, tmp_path):
    app = make_app(tiny, tmp_path, settings={"system_prompt": "Be brief."})
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        await send(pilot, "hello world")
        saved_id, saved_messages = chat.record.id, list(chat.session.messages)
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: chat.record.id != saved_id)
        assert chat.conversation.messages == []
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen))
        await pilot.pause()
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.record.id == saved_id, what="the reopened chat")
        assert chat.session.messages == saved_messages
        assert saved_messages[0] == {"role": "system", "content": "Be brief."}
        widgets = chat.conversation.messages
        assert [type(w) for w in widgets] == [UserMessage, AssistantMessage]
        assert widgets[1].answer == saved_messages[-1]["content"]
        assert chat.session.cache[0].offset == 0  # rebuilt lazily, by the next turn
        await send(pilot, "the quick brown fox")
        stats = chat.record.meta[-1]["stats"]
        assert stats["cached_tokens"] == 0 and stats["prompt_tokens"] > 20


async def test_overflow_drops_the_oldest_turns_and_says_so(tiny, tmp_path):
    folder, _, tokenizer = tiny
    small, _ = qwen_mlx.load(folder, max_context=64)
    app = make_app(tiny, tmp_path, settings={"system_prompt": "Be brief.", "max_tokens": 8},
                   preloaded=(small, tokenizer))
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        for _ in range(6):
            await send(pilot, "the quick brown fox jumps over the lazy dog.")
            if chat.record.dropped:
                break
        record = chat.record
        assert record.dropped and record.dropped[0]["role"] == "user"
        messages = chat.session.messages
        assert messages[0] == {"role": "system", "content": "Be brief."}
        assert messages[1]["role"] == "user" and messages[-1]["role"] == "assistant"
        notices = [str(n.render()) for n in chat.query(NoticeMessage)]
        turns = sum(1 for m in record.dropped if m["role"] == "user")
        said = ("the oldest turn (", "no longer goes to the model") if turns == 1 else \
            (f"the {turns} oldest turns (", "no longer go to the model")
        assert any(all(part in n for part in said) for n in notices), notices
        widgets = chat.conversation.messages
        assert all(w.has_class("dropped") for w in widgets[:len(record.dropped)])
        assert not widgets[-1].has_class("dropped")
        # The transcript on disk keeps what was dropped, and reopens the same way.
        saved = ChatStore(tmp_path).load(record.id)
        assert saved.transcript == record.transcript and saved.dropped == record.dropped
        # A message that cannot fit even alone is refused, and given back to edit.
        before = list(chat.session.messages)
        huge = "the quick brown fox jumps over the lazy dog. " * 12
        await send(pilot, huge)
        assert chat.session.messages == before and chat.prompt.text == huge
        notice = str(chat.query(NoticeMessage)[-1].render())
        assert "needs more than the 64-token context" in notice
        assert re.search(r"context: [\d,]+ tokens with what must stay", notice), notice


# --------------------------------------------------------------- keys and copies


async def test_message_box_keys_history_copy_export_and_help(tiny, tmp_path):
    store = ChatStore(tmp_path)
    record = store.new_chat()
    answer = "Here:\n\n```python\nprint('hi')\n```\n\nand\n\n```sh\nls -la\n```"
    record.messages = [{"role": "user", "content": "show code"},
                       {"role": "assistant", "content": answer, "reasoning_content": ""}]
    store.save(record)
    app = make_app(tiny, tmp_path, chat_id=record.id)
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        prompt = chat.prompt
        await pilot.press("a", "shift+enter", "b", "ctrl+j", "c")
        assert prompt.text == "a\nb\nc"
        prompt.set_text("")
        prompt.remember("first")
        prompt.remember("second")
        await pilot.press("x", "up")
        assert prompt.text == "second"
        await pilot.press("up")
        assert prompt.text == "first"
        await pilot.press("down", "down")
        assert prompt.text == "x"  # the draft comes back
        await pilot.press("ctrl+b")
        assert app.clipboard == "ls -la"
        reply = chat.conversation.messages[1]
        reply.focus()
        await pilot.press("c")
        assert app.clipboard == answer
        await pilot.press("b")
        assert app.clipboard == "ls -la"
        await pilot.press("ctrl+s")
        exported = store.path(record.id).with_suffix(".md")
        assert exported.is_file() and "## You" in exported.read_text()
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is chat)
        # While nothing streams, Esc and Ctrl+C do not claim to stop anything.
        assert chat.check_action("stop", ()) is False
        # Clear asks first (Ctrl+L is many terminals' redraw): n keeps everything ...
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        question = str(app.screen.query_one("#confirm-question").render())
        detail = str(app.screen.query_one("#confirm-detail").render())
        assert "2 messages" in question and str(exported) in detail and "stays" in detail
        await pilot.press("n")
        await wait_for(pilot, lambda: app.screen is chat)
        assert len(chat.conversation.messages) == 2 and store.path(record.id).exists()
        # ... and y clears: the chat empties and its file goes; the export stays.
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: not chat.conversation.messages)
        assert chat.record.messages == [] and chat.session.messages == []
        assert not store.path(record.id).exists() and exported.is_file()


def test_the_context_meter_warns_before_overflow_and_shortens_to_fit():
    meter = ContextMeter()
    meter.state = ContextState(used=230, limit=256, kv_bytes=2_500_000, label="YaRN 4x",
                               thinking="thinking on", reasoning_saved=1234)
    wide, narrow = meter.line(160), meter.line(78)
    assert "230/256 YaRN 4x 90%" in wide and "⚠ nearly full" in wide and "KV 2.5 MB" in wide
    assert "reasoning from earlier turns not resent: 1,234 tokens" in wide
    assert len(narrow) <= 78 and "⚠" in narrow and "not resent: 1,234" in narrow
    meter.state = ContextState(used=100, limit=256, kv_bytes=0)
    assert "⚠" not in meter.line(160)


def test_the_data_dir_argument_beats_the_env_var_which_beats_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("QWEN_MLX_DATA_DIR", raising=False)
    assert resolve_data_dir() == tmp_path / "xdg" / "qwen-mlx"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert resolve_data_dir() == Path.home() / ".local" / "share" / "qwen-mlx"
    monkeypatch.setenv("QWEN_MLX_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_the_ui_never_imports_torch_or_transformers():
    code = ("import sys, tui.app; bad = [m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'transformers')]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------- a new user's findings (issue 18)


def notes(app) -> list[str]:
    """The notifications shown so far."""
    return [n.message for n in app._notifications]


async def open_settings(pilot) -> SettingsScreen:
    app = pilot.app
    await wait_for(pilot, lambda: app.chat.session is not None, what="the model")
    await pilot.press("f2")
    await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), what="the settings")
    await pilot.pause()
    return app.screen


async def test_a_bad_setting_shows_its_error_in_the_dialog(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_settings(pilot)
        error = screen.query_one("#settings-error")
        assert not error.display  # nothing to say yet
        screen.query_one("#top_p", Input).value = "5"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: error.display and error.region.height > 0,
                       what="the error line")
        assert app.screen is screen and "top_p 5" in str(error.render())
        assert screen.query_one("#settings-dialog").region.contains_region(error.region)


async def test_settings_fields_left_empty_are_not_marked_invalid(tiny, tmp_path):
    app = make_app(tiny, tmp_path, settings={"temperature": None})
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_settings(pilot)
        fields = list(screen.query(Input))
        assert any(not f.value for f in fields)
        for _ in range(len(fields) + 8):  # Tab through every field, empty ones included
            await pilot.press("tab")
        await pilot.pause()
        assert [f.id for f in fields if f.has_class("-invalid")] == []
        screen.query_one("#top_k", Input).value = "x"  # a real mistake still shows
        screen.query_one("#top_k", Input).focus()
        await pilot.press("tab")
        await wait_for(pilot, lambda: screen.query_one("#top_k").has_class("-invalid"))


async def test_the_system_prompt_cursor_starts_after_its_text(tiny, tmp_path):
    app = make_app(tiny, tmp_path, settings={"system_prompt": "Be brief.\nUse English."})
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_settings(pilot)
        prompt = screen.query_one("#system_prompt")
        assert prompt.has_focus and prompt.cursor_location == prompt.document.end
        await pilot.press(*" Thanks")
        assert prompt.text == "Be brief.\nUse English. Thanks"


async def test_the_settings_fit_50_columns(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=(50, 24)) as pilot:
        screen = await open_settings(pilot)
        box = screen.query_one("#settings-body").content_region
        cut = [w.id or str(w) for w in screen.query("#settings-body Label, #settings-body Input, "
                                                    "#settings-body Button, #settings-body Select, "
                                                    "#settings-body Checkbox")
               if w.region.width and w.region.right > box.right]
        assert cut == []


async def test_ctrl_g_then_esc_gives_the_draft_back(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello world")
        chat = app.chat
        chat.prompt.set_text("half a thought")
        await pilot.press("ctrl+g")
        assert chat.editing == 0 and chat.prompt.text == "hello world"
        await pilot.press("escape")
        assert chat.editing is None and chat.prompt.text == "half a thought"
        # After an edit is sent, the draft comes back too.
        await pilot.press("ctrl+g")
        turns = chat.turn
        chat.prompt.set_text("hello there")
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.turn > turns and not chat.busy)
        assert chat.session.messages[0]["content"] == "hello there"
        assert chat.prompt.text == "half a thought"


async def test_deleting_a_saved_chat_asks_first_and_keeps_its_export(tiny, tmp_path):
    store = ChatStore(tmp_path)
    record = store.new_chat()
    record.messages = [{"role": "user", "content": "keep me"},
                       {"role": "assistant", "content": "ok", "reasoning_content": ""}]
    store.save(record)
    export = store.export_markdown(record)
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.session is not None)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen))
        chats = app.screen
        await pilot.pause()
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "keep me" in str(app.screen.query_one("#confirm-question").render())
        assert str(export) in str(app.screen.query_one("#confirm-detail").render())
        await pilot.press("enter")  # the focused answer is the safe one
        await wait_for(pilot, lambda: app.screen is chats)
        assert store.path(record.id).exists()
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: not store.path(record.id).exists(), what="the delete")
        assert export.is_file()
        assert any("Deleted" in n for n in notes(app))


async def test_keys_that_wait_for_the_reply_say_so(tiny, tmp_path):
    GatedSession.started.clear()
    GatedSession.release.clear()
    app = make_app(tiny, tmp_path, settings={"max_tokens": 40}, session_factory=GatedSession)
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        await wait_for(pilot, lambda: chat.session is not None)
        chat.prompt.set_text("hello world")
        await pilot.press("enter")
        await wait_for(pilot, GatedSession.started.is_set, what="the first token")
        try:
            for key in ("ctrl+n", "f2", "ctrl+o", "ctrl+l", "ctrl+r", "ctrl+t"):
                before = len(notes(app))
                await pilot.press(key)
                await wait_for(pilot, lambda: len(notes(app)) > before, what=f"a word on {key}")
                assert "reply is streaming" in notes(app)[-1]
                assert app.screen is chat and chat.busy
        finally:
            GatedSession.release.set()
        await wait_for(pilot, lambda: not chat.busy)


async def test_sent_messages_come_back_with_up_after_a_restart(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello world")
        await send(pilot, "the quick brown fox")
    again = make_app(tiny, tmp_path)
    async with again.run_test(size=SIZE) as pilot:
        prompt = again.chat.prompt
        await pilot.press("up")
        assert prompt.text == "the quick brown fox"
        await pilot.press("up")
        assert prompt.text == "hello world"


async def test_the_header_names_the_model_and_a_failed_load_says_so(tiny, tmp_path):
    folder, model, tokenizer = tiny
    app = make_app(tiny, tmp_path / "a", model_name="Qwen/Qwen3-0.6B")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.chat.session is not None)
        assert app.chat.sub_title.startswith("Qwen/Qwen3-0.6B · ")
    broken = tmp_path / "no-config"
    broken.mkdir()
    app = ChatApp(broken, data_dir=tmp_path / "b")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.model_error is not None, what="the failed load")
        app.chat.prompt.set_text("hello")
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("No model is loaded" in n for n in notes(app)))
        assert not any("still loading" in n for n in notes(app))


async def test_a_blank_line_follows_a_code_block(tiny, tmp_path):
    store = ChatStore(tmp_path)
    record = store.new_chat()
    record.messages = [{"role": "user", "content": "code?"},
                       {"role": "assistant", "content": "Here:\n\n```python\nprint(1)\n```\n"
                        "And after.", "reasoning_content": ""}]
    store.save(record)
    app = make_app(tiny, tmp_path, chat_id=record.id)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: len(replies(app)) == 1
                       and len(replies(app)[0].body.children) == 3, what="the markdown")
        await pilot.pause()
        _, fence, after = replies(app)[0].body.children
        assert type(fence).__name__ == "MarkdownFence"
        assert after.region.y - fence.region.bottom == 1  # one blank line between


def test_the_help_screen_shows_whole_section_titles():
    import io

    from rich.console import Console

    from tui.screens.help import rows

    console = Console(width=72, file=io.StringIO(), record=True)
    console.print(rows([("A focused message (Tab to reach it)", [("c", "copy the message")])]))
    assert "A focused message (Tab to reach it)" in console.export_text()


def test_the_context_meter_never_passes_100_percent():
    meter = ContextMeter()
    meter.state = ContextState(used=11_558, limit=100, kv_bytes=0, thinking="thinking on")
    line = meter.line(200)
    assert "100/100 100%" in line and "11558%" not in line and "11,558" not in line
    assert "⚠ over" in line and "drop" in line
    assert "11,558 tokens" in ContextMeter.describe(meter.state)
    assert len(meter.line(60)) <= 60


def test_yarn_is_not_named_when_a_cap_leaves_it_nothing_to_extend(tiny):
    from tui.context import limit_label

    folder = tiny[0]
    extended, _ = qwen_mlx.load(folder, rope_scaling={"rope_type": "yarn", "factor": 4.0},
                                max_context=1000)
    assert limit_label(extended) == "YaRN 4x"
    capped, _ = qwen_mlx.load(folder, rope_scaling={"rope_type": "yarn", "factor": 4.0},
                              max_context=200)  # within the native 256
    assert limit_label(capped) == ""


def test_the_kv_figure_shrinks_when_old_turns_are_dropped(tiny):
    from tui.context import kv_cache_bytes
    from tui.settings import Settings
    from tui.streaming import TurnDone, TurnTrimmed
    from tui.turns import TurnRequest, run_turn

    folder, _, tokenizer = tiny
    model, _ = qwen_mlx.load(folder, max_context=400)
    words = "the quick brown fox jumps over the lazy dog. "  # 21 tokens
    history = [{"role": "user", "content": words * 16},
               {"role": "assistant", "content": "ok", "reasoning_content": ""}]
    session = ChatSession(model, tokenizer, messages=history)
    settings = Settings(temperature=0.0, max_tokens=4)
    posted = []
    run_turn(TurnRequest("send", 1, settings, "hi"), session, threading.Event(),
             post=posted.append, clock=time.monotonic, interval=0)
    full = posted[-1]
    assert isinstance(full, TurnDone) and full.context_tokens > 256  # two steps of 256
    posted.clear()
    # The next message does not fit beside the first turn, which goes: what is left
    # needs one buffer step instead of two.
    run_turn(TurnRequest("send", 2, settings, words * 8), session, threading.Event(),
             post=posted.append, clock=time.monotonic, interval=0)
    assert any(isinstance(m, TurnTrimmed) for m in posted)
    done = posted[-1]
    assert done.error is None and done.context_tokens < full.context_tokens
    assert done.kv_bytes < full.kv_bytes and done.kv_bytes == kv_cache_bytes(session)


# ----------------------------------------------- chat files from elsewhere (issue 17)


async def test_opening_chats_survives_files_that_are_not_chats_and_shared_ids(tiny, tmp_path):
    store = ChatStore(tmp_path)
    record = store.new_chat()
    record.messages = [{"role": "user", "content": "the original"},
                       {"role": "assistant", "content": "ok", "reasoning_content": ""}]
    store.save(record)
    data = json.loads(store.path(record.id).read_text())
    data["messages"][0]["content"] = "the backup"
    (store.chats_dir / "backup.json").write_text(json.dumps(data))  # the same "id"
    for name, text in {"list.json": "[1, 2, 3]", "null.json": "null", "n.json": "42"}.items():
        (store.chats_dir / name).write_text(text)
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        await wait_for(pilot, lambda: chat.session is not None)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen))
        await wait_for(pilot, lambda: any("Skipped 3 files" in n for n in notes(app)))
        warning = next(n for n in notes(app) if "Skipped" in n)
        assert all(name in warning for name in ("list.json", "null.json", "n.json"))
        options = app.screen.query_one("#chat-list")
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert sorted(ids) == sorted([record.id, "backup"])
        options.highlighted = ids.index("backup")
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.record.id == "backup", what="the backup")
        assert chat.conversation.messages[0].text == "the backup"
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen))
        options = app.screen.query_one("#chat-list")
        options.highlighted = ids.index(record.id)
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.record.id == record.id, what="the original")
        assert chat.conversation.messages[0].text == "the original"


async def test_turns_saved_by_another_window_join_the_open_chat(tiny, tmp_path):
    app = make_app(tiny, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        await send(pilot, "hello world")
        other = ChatStore(tmp_path).load(chat.record.id)  # a second window on this chat
        other.messages += [{"role": "user", "content": "from the other window"},
                           {"role": "assistant", "content": "seen", "reasoning_content": ""}]
        ChatStore(tmp_path).save(other)
        await send(pilot, "the quick brown fox")
        await wait_for(pilot, lambda: len(chat.conversation.messages) == 6, what="the merge")
        texts = [w.text for w in chat.conversation.messages]
        assert texts[0] == "hello world" and texts[2:4] == ["from the other window", "seen"]
        assert texts[4] == "the quick brown fox"
        assert [m["content"] for m in chat.session.messages][2:5] == texts[2:5]
        assert any("another window" in n for n in notes(app))
        saved = ChatStore(tmp_path).load(chat.record.id)
        assert [m["content"] for m in saved.transcript] == texts


# --------------------------------------------------------------- the command line


def test_chat_without_a_terminal_says_so_and_exits(tiny, tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen_mlx.cli", "chat", "-m", str(tiny[0])],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent.parent,
                       env={**os.environ, "QWEN_MLX_DATA_DIR": str(tmp_path)})
    assert r.returncode == 2 and "chat needs a terminal" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json"])
def test_chat_on_a_folder_that_cannot_load_fails_before_the_window(tiny, tmp_path, missing):
    import pty
    import select

    folder = tmp_path / "model"
    shutil.copytree(tiny[0], folder)
    (folder / missing).unlink()
    leader, follower = pty.openpty()  # a terminal, so only the folder can be at fault
    proc = subprocess.Popen([sys.executable, "-m", "qwen_mlx.cli", "chat", "-m", str(folder)],
                            stdin=follower, stdout=follower, stderr=follower,
                            cwd=Path(__file__).parent.parent,
                            env={**os.environ, "QWEN_MLX_DATA_DIR": str(tmp_path / "data"),
                                 "TERM": "xterm"})
    os.close(follower)
    out, deadline = b"", time.monotonic() + 120
    try:
        while proc.poll() is None or select.select([leader], [], [], 0)[0]:
            assert time.monotonic() < deadline, out.decode(errors="replace")
            if select.select([leader], [], [], 0.1)[0]:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the child closed its end
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(leader)
    text = out.decode(errors="replace")
    assert proc.returncode == 2, text
    assert f"{folder / missing}" in text and "Traceback" not in text


# ------------------------------------------------------------------ prefill progress


class SmallChunks(ChatSession):
    """A real ChatSession that prefills 8 tokens at a time, so a short prompt takes
    several chunks; it stops on its third poll until released, mid-prefill."""

    started = threading.Event()
    release = threading.Event()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, prefill_step_size=8, **kwargs)

    def respond(self, *, cancel=None, **options):
        polls = [0]

        def gated() -> bool:
            stop = cancel()
            polls[0] += 1
            if polls[0] == 3:
                type(self).started.set()
                type(self).release.wait(30)
            return stop

        yield from super().respond(cancel=gated, **options)


def test_prefill_progress_is_posted_before_the_first_token(tiny):
    from tui.settings import Settings
    from tui.streaming import PrefillProgress, TurnProgress
    from tui.turns import TurnRequest, run_turn

    _, model, tokenizer = tiny
    session = ChatSession(model, tokenizer, prefill_step_size=8)
    posted = []
    text = "the quick brown fox jumps over the lazy dog. " * 3
    run_turn(TurnRequest("send", 1, Settings(temperature=0.0, max_tokens=3), text), session,
             threading.Event(), post=posted.append, clock=time.monotonic, interval=0)
    kinds = [type(m) for m in posted]
    first_token = kinds.index(TurnProgress)
    progress = [m for m in posted[:first_token] if isinstance(m, PrefillProgress)]
    prompt = len(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True))
    assert len(progress) >= prompt // 8 - 1 and all(m.total == prompt - 1 for m in progress)
    done = [m.done for m in progress]
    assert done[0] == 0 and done == sorted(done) and done[-1] >= prompt - 1 - 8
    assert PrefillProgress not in kinds[first_token:]  # decoding posts none


async def test_the_status_line_shows_prefill_progress(tiny, tmp_path):
    SmallChunks.started.clear()
    SmallChunks.release.clear()
    app = make_app(tiny, tmp_path, session_factory=SmallChunks)
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        await wait_for(pilot, lambda: chat.session is not None)
        chat.prompt.set_text("the quick brown fox jumps over the lazy dog. " * 3)
        stats = chat.query_one("#stats")
        await pilot.press("enter")
        try:
            await wait_for(pilot, SmallChunks.started.is_set, what="the prefill")
            await wait_for(pilot, lambda: "prefill 16/" in str(stats.render()),
                           what="the progress")
            assert "tok/s" in str(stats.render())
            assert "reading the prompt: 16/" in str(replies(app)[-1].note.render())
        finally:
            SmallChunks.release.set()
        await wait_for(pilot, lambda: not chat.busy)
        assert "TTFT" in str(stats.render())


async def test_stopping_during_prefill_says_so_and_keeps_the_history(tiny, tmp_path):
    SmallChunks.started.clear()
    SmallChunks.release.clear()
    app = make_app(tiny, tmp_path, session_factory=SmallChunks)
    async with app.run_test(size=SIZE) as pilot:
        chat = app.chat
        await wait_for(pilot, lambda: chat.session is not None)
        before = list(chat.record.messages)
        chat.prompt.set_text("the quick brown fox jumps over the lazy dog. " * 3)
        await pilot.press("enter")
        try:
            await wait_for(pilot, SmallChunks.started.is_set, what="the prefill")
            await pilot.press("escape")
        finally:
            SmallChunks.release.set()
        await wait_for(pilot, lambda: not chat.busy, what="the stop")
        notices = [str(n.render()) for n in chat.query(NoticeMessage)]
        assert any("stopped before the reply began" in n for n in notices), notices
        assert not any("None" in n for n in notices), notices
        assert chat.record.messages == before
        assert chat.prompt.text.startswith("the quick brown fox")  # the draft comes back


async def test_a_bad_value_in_settings_json_is_named_and_the_rest_kept(tiny, tmp_path):
    folder, model, tokenizer = tiny
    (tmp_path / "settings.json").write_text(json.dumps(
        {"system_prompt": "You are a pirate.", "top_p": 5, "max_tokens": 9}))
    app = ChatApp(folder, data_dir=tmp_path, preloaded=(model, tokenizer))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: any("top_p" in n for n in notes(app)), what="the warning")
        assert app.settings.system_prompt == "You are a pirate." and app.settings.top_p is None
        assert app.settings.max_tokens == 9
        assert app.chat.record.messages[0]["content"] == "You are a pirate."


def test_settings_presets_follow_the_models_family():
    from tui.settings import preset

    assert preset(True, "qwen3_5")["temperature"] == 1.0
    assert preset(False, "qwen3_5_moe")["presence_penalty"] == 1.5
    assert preset(True, "qwen3")["temperature"] == 0.6 and preset(True, "qwen3")["presence_penalty"] is None
    assert preset(True, None) == preset(True, "qwen2")  # no card preset: Qwen3's
