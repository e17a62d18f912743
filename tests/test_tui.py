"""The chat UI, headless with Textual's Pilot, on a tiny random Qwen3 checkpoint.

Turns go through the real library (ChatSession, the decode loop, the chat
template); only the thinking-fold test feeds responses to the widgets directly,
since random weights never close a <think> block on cue.
"""

from __future__ import annotations

import json
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
    assert isinstance(done, TurnDone) and kv[-1] == done.kv_bytes == kv_cache_bytes(session.cache)


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
        assert any("oldest turn" in n and "no longer go to the model" in n for n in notices)
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
        assert "needs more than the 64-token context" in str(chat.query(NoticeMessage)[-1].render())


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
        await pilot.press("ctrl+l")  # clear: the chat empties and its file goes
        await wait_for(pilot, lambda: not chat.conversation.messages)
        assert chat.record.messages == [] and chat.session.messages == []
        assert not store.path(record.id).exists()


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
