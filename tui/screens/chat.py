"""The chat screen: the conversation, its status lines and the message box.

It owns the current chat (a `ChatRecord`, what is saved) and its `ChatSession`
(the library's conversation with its KV cache). Turns run in a thread worker;
the worker touches only the session, and the UI reads the session's history
only from the `TurnDone` it posts, so the two threads never share a list.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, LoadingIndicator, TextArea

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.text.thinking import thinking_enabled

from ..attention import last_reply_prompt, save_attention_map
from ..context import WARN_AT, history_length, kv_cache_bytes, limit_label, reasoning_not_resent
from ..stats import TurnStats
from ..store import ChatRecord
from ..streaming import PrefillProgress, ThinkingInfo, TurnDone, TurnProgress, TurnTrimmed
from ..text import code_blocks
from ..turns import TurnRequest, run_turn
from ..widgets.conversation import Conversation
from ..widgets.messages import (
    AssistantMessage,
    MessageView,
    NoticeMessage,
    OtherMessage,
    UserMessage,
)
from ..widgets.prompt import PromptInput
from ..widgets.status import ContextMeter, ContextState, StatsBar
from .chats import ChatsScreen
from .confirm import ConfirmScreen
from .help import HelpScreen
from .settings import SettingsScreen

if TYPE_CHECKING:
    from ..app import ChatApp

FINISH_NOTES = {
    "cancelled": ("⏹ stopped", "warning"),
    "length": ("cut off at the max tokens limit (Settings, F2)", "warning"),
    "context": ("stopped: the context is full", "warning"),
}


class ContextMeasured(Message):
    """The worker measured a history the cache does not hold yet (a reopened chat)."""

    def __init__(self, token: int, used: int, saved: int) -> None:
        super().__init__()
        self.token, self.used, self.saved = token, used, saved


def thinking_info(meta: dict[str, Any]) -> ThinkingInfo | None:
    """A saved reply's thinking time and tokens, from its metadata."""
    data = meta.get("thinking")
    if not isinstance(data, dict):
        return None
    return ThinkingInfo(int(data.get("tokens", 0)), float(data.get("seconds", 0.0)), True)


class ChatScreen(Screen):
    """The main screen."""

    # Descriptions are the Footer's (short, to fit 80 columns); tooltips the help screen's.
    BINDINGS = [
        Binding("escape", "stop", "Stop", tooltip="stop the reply now"),
        # Ctrl+C copies in the message box; while a reply streams it stops it instead.
        Binding("ctrl+c", "stop", "Stop", show=False, priority=True,
                tooltip="stop the reply now"),
        Binding("escape", "cancel_edit", "Cancel edit", tooltip="cancel editing a message"),
        Binding("ctrl+r", "regenerate", "Retry", tooltip="regenerate the last reply"),
        Binding("ctrl+g", "edit_last", "Edit",
                tooltip="edit your last message and resend it (e on a focused message: "
                        "that one)"),
        Binding("ctrl+t", "toggle_thinking", "Think",
                tooltip="thinking on/off for this chat (/think and /no_think work too)"),
        Binding("ctrl+n", "new_chat", "New", tooltip="start a new chat (this one stays saved)"),
        Binding("ctrl+o,f3", "open_chats", "Chats", tooltip="open a saved chat"),
        Binding("f2", "settings", "Settings",
                tooltip="system prompt, sampling, max tokens, long context, KV cache"),
        Binding("f1,question_mark", "help", "Help", tooltip="this list"),
        Binding("ctrl+l", "clear_chat", "Clear chat", show=False,
                tooltip="clear this chat, after asking (the system prompt stays)"),
        Binding("ctrl+s", "export", "Export", show=False,
                tooltip="export this chat to Markdown, next to the saved chats"),
        Binding("ctrl+b", "copy_code", "Copy code", show=False,
                tooltip="copy the last code block of the replies"),
        Binding("f4", "attention_map", "Attention", show=False,
                tooltip="save the attention map of the last reply's prompt (PNG) and show "
                        "its path"),
    ]
    # Actions that change the conversation wait until the reply is over (each says so).
    IDLE_ONLY = {"regenerate", "edit_last", "toggle_thinking", "new_chat", "open_chats",
                 "settings", "clear_chat"}

    app: "ChatApp"

    def __init__(self) -> None:
        super().__init__()
        self.record: ChatRecord | None = None
        self.session: Any = None  # ChatSession, once the model is loaded
        self.busy = False
        self.turn = 0
        self.cancel_event: threading.Event | None = None
        self.reply: AssistantMessage | None = None
        self.editing: int | None = None  # transcript index of the message being edited
        self.context: ContextState | None = None
        self._measure_token = 0
        self._warned = False
        self._mounted = False
        self._sent_text = ""  # the text of the turn in flight, given back if it cannot be sent
        self._draft = ""  # the message box's text when an edit began, given back after it
        self._streaming = False  # the turn in flight has produced a token

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="loading"):
            yield LoadingIndicator()
            yield Label("Loading the model…", id="loading-label")
        yield Conversation(id="conversation")
        yield StatsBar("no reply yet", id="stats")
        yield ContextMeter("context: loading the model", id="context")
        yield Label("", id="edit-banner")
        yield PromptInput(id="prompt", placeholder="Message Qwen (Enter sends, "
                          "Shift+Enter or Ctrl+J: new line, F1: keys)")
        yield Footer()

    @property
    def conversation(self) -> Conversation:
        return self.query_one(Conversation)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    async def on_mount(self) -> None:
        self.query_one("#edit-banner").display = False
        self.query_one("#loading").display = self.app.model is None
        self.prompt.focus()
        self.prompt.sent = self.app.store.load_history()
        self._mounted = True
        await self.show_record(self.app.first_record())

    def on_unmount(self) -> None:
        self.stop_generation()

    # ------------------------------------------------------------- model state

    def model_loading(self, text: str = "Loading the model…") -> None:
        """The model is (re)loading: no session until it is ready."""
        self.session = None
        if not self._mounted:
            return
        self.query_one("#loading").display = True
        self.query_one("#loading-label", Label).update(text)
        self.query_one("#loading LoadingIndicator").display = True
        self.query_one(ContextMeter).show(None, message="context: loading the model")

    def model_ready(self) -> None:
        if not self._mounted:
            return  # on_mount shows the first chat with the model
        self.query_one("#loading").display = False
        if self.record is not None:
            self.session = self._new_session(self.record)
            self._update_title()
            self._measure()

    def model_failed(self, error: str) -> None:
        if not self._mounted:
            self.call_after_refresh(self.model_failed, error)
            return
        self.query_one("#loading LoadingIndicator").display = False
        self.query_one("#loading-label", Label).update(f"⚠ {error}")
        self.query_one(ContextMeter).show(None, message="context: no model loaded")

    def _new_session(self, record: ChatRecord) -> Any:
        """A ChatSession over the record's messages; its cache fills on the next turn."""
        app = self.app
        return app.session_factory(app.model, app.tokenizer, messages=record.messages,
                                   enable_thinking=record.enable_thinking,
                                   kv_bits=app.settings.kv_bits, **app.session_options())

    # --------------------------------------------------------------- the record

    async def show_record(self, record: ChatRecord) -> None:
        """Show a chat (new or reopened) and give it a fresh session."""
        self.record, self.editing, self._warned = record, None, False
        self._end_edit()
        await self._rebuild()
        self.session = self._new_session(record) if self.app.model is not None else None
        last = next((record.meta_at(i) for i in reversed(range(len(record.transcript)))
                     if record.transcript[i].get("role") == "assistant"), {})
        self.query_one(StatsBar).show(TurnStats.from_dict(last.get("stats")))
        self._update_title()
        self._measure()

    async def _rebuild(self) -> None:
        """Recreate the message widgets from the record."""
        record = self.record
        conversation = self.conversation
        await conversation.remove_children()
        widgets: list[MessageView] = []
        for i, message in enumerate(record.transcript):
            dropped = i < len(record.dropped)
            meta = record.meta_at(i)
            content = str(message.get("content", ""))
            if message.get("role") == "user":
                widgets.append(UserMessage(content, dropped=dropped))
            elif message.get("role") == "assistant":
                stats = TurnStats.from_dict(meta.get("stats"))
                note, kind = FINISH_NOTES.get(stats.finish_reason if stats else "", ("", ""))
                widgets.append(AssistantMessage(content, message.get("reasoning_content") or "",
                                                thinking=thinking_info(meta), note=note,
                                                note_kind=kind, dropped=dropped))
            else:  # a tool result or the like, from a file written elsewhere
                widgets.append(OtherMessage(str(message.get("role")), content, dropped=dropped))
        await conversation.mount_all(widgets)
        conversation.follow()

    def _update_title(self) -> None:
        model = self.app.model_name
        self.title = "qwen-mlx"
        self.sub_title = f"{model} · {self.record.title}" if self.record else model

    def _save(self) -> None:
        try:
            result = self.app.store.save(self.record)
        except OSError as e:
            self.notify(f"Could not save the chat: {e}", severity="error", markup=False)
            return
        if result is None:
            return
        if result.copy_id:
            self.notify("This chat was also changed in another window; that version is "
                        f"kept as a chat of its own ({result.copy_id}, Ctrl+O).",
                        severity="warning", timeout=10, markup=False)
        if result.merged:
            n = result.merged
            self.notify(f"{n} message{'s' if n != 1 else ''} from another window "
                        "joined this chat.", severity="warning", markup=False)
            self.call_later(self._show_merged)

    async def _show_merged(self) -> None:
        """The save merged in another instance's turns: the session takes the merged
        history (its cache is reused up to where the two differ) and the view follows."""
        if self.session is not None:
            self.session.messages = [dict(m) for m in self.record.messages]
        await self._rebuild()
        self._update_title()
        self._measure()

    # ----------------------------------------------------------- the context

    def _thinking_label(self) -> str:
        """The effective mode of the next reply, the draft's /think or /no_think included."""
        if self.record is None:
            return ""
        flag = self.record.enable_thinking
        draft = self.prompt.text
        messages = self.record.messages + ([{"role": "user", "content": draft}] if draft else [])
        # Only templates with the soft switch (Qwen3) heed /no_think; Qwen3.5's do not.
        switch = getattr(self.app.tokenizer, "has_soft_switch", None)
        on = thinking_enabled(messages, flag, soft_switch=switch() if switch else True)
        if flag is False:
            return "thinking off (Ctrl+T)"
        return "thinking on" if on else "thinking off (/no_think)"

    def _show_context(self, used: int | None = None, saved: int | None = None,
                      kv: int | None = None) -> None:
        model = self.app.model
        if model is None or self.record is None:
            return
        old = self.context
        self.context = ContextState(
            used=used if used is not None else (old.used if old else 0),
            limit=model.max_context,
            kv_bytes=kv if kv is not None else (old.kv_bytes if old else 0),
            label=limit_label(model), thinking=self._thinking_label(),
            reasoning_saved=saved if saved is not None else (old.reasoning_saved if old else 0),
            **self._limit_memory(model))
        self.query_one(ContextMeter).show(self.context)

    def _limit_memory(self, model) -> dict:
        """The KV cache's bytes at the context limit and the machine's memory (computed
        once per model and KV setting)."""
        from qwen_mlx.model.long_context import context_info

        key = (id(model), self.app.settings.kv_bits)
        if getattr(self, "_limit_key", None) != key:
            info = context_info(model, kv_bits=self.app.settings.kv_bits)
            self._limit_key = key
            self._limit_values = {"kv_at_limit": info.cache_bytes_at_limit,
                                  "memory": info.memory_bytes}
        return self._limit_values

    def _measure(self) -> None:
        """Measure the history in a worker (a long chat takes a while to tokenize)."""
        if self.app.model is None or self.record is None:
            return
        self._measure_token += 1
        kv = kv_cache_bytes(self.session) if self.session is not None else 0
        self._show_context(kv=kv)
        self._measure_worker(list(self.record.messages), self.record.enable_thinking,
                             self._measure_token)

    @work(thread=True, exclusive=True, group="measure", exit_on_error=False)
    def _measure_worker(self, messages: list[dict], enable_thinking: bool | None,
                        token: int) -> None:
        tokenizer = self.app.tokenizer
        used = history_length(tokenizer, messages, enable_thinking=enable_thinking)
        saved = reasoning_not_resent(tokenizer, messages, enable_thinking=enable_thinking)
        self.post_message(ContextMeasured(token, used, saved))

    def on_context_measured(self, message: ContextMeasured) -> None:
        if message.token == self._measure_token and not self.busy:
            self._show_context(used=message.used, saved=message.saved)

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        if event.text_area is self.prompt and self.context is not None:
            self._show_context()

    # ----------------------------------------------------------------- turns

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if not text.strip():
            return
        if self.busy:
            self.notify("A reply is still streaming: Esc stops it.", severity="warning")
            return
        if self.session is None:
            self._say_no_model()
            return
        self.prompt.remember(text)
        self.app.remember_sent(text)
        self.prompt.set_text("")
        if self.editing is not None:
            index = self.editing
            self._end_edit()
            # What was typed before the edit comes back (the edit itself is in Up's history).
            self.prompt.set_text(self._draft)
            self._draft = ""
            await self._start("edit", text=text, index=index)
        else:
            await self._start("send", text=text)

    def _say_no_model(self) -> None:
        """Why there is no session: the model is loading, or it failed to load."""
        error = self.app.model_error
        if error:
            self.notify(f"No model is loaded: {error}. Change the long-context settings "
                        "(F2) or restart with another model.", severity="error",
                        markup=False)
        else:
            self.notify("The model is still loading.", severity="warning")

    def _wait_for_reply(self) -> bool:
        """While a reply streams, say that the action waits for it (True) rather than
        ignore the key."""
        if self.busy:
            self.notify("A reply is streaming: wait for it, or stop it with Esc.",
                        severity="warning")
        return self.busy

    async def _start(self, kind: str, *, text: str = "", index: int = -1) -> None:
        """Show the new turn's widgets and start the worker."""
        record = self.record
        conversation = self.conversation
        widgets = conversation.messages
        session_index = -1
        if kind == "edit":
            session_index = index - len(record.dropped) + (1 if record.system else 0)
            await self._remove_from(widgets[index])
        elif kind == "regenerate" and widgets and isinstance(widgets[-1], AssistantMessage):
            await self._remove_from(widgets[-1])
        reply = AssistantMessage()
        new = ([UserMessage(text)] if kind in ("send", "edit") else []) + [reply]
        await conversation.mount_all(new)
        conversation.follow()
        reply.start()
        self.turn += 1
        self._sent_text = text
        self.busy, self.reply, self.cancel_event = True, reply, threading.Event()
        self._streaming = False  # no token yet: the stats line follows the prefill
        self.query_one(StatsBar).show(None, prefix="▶ reading the prompt…")
        self.refresh_bindings()
        request = TurnRequest(kind, self.turn, self.app.settings, text, session_index)
        self._run_turn(request, self.session, self.cancel_event)

    async def _remove_from(self, widget: MessageView) -> None:
        """Remove `widget` and everything after it (later notices included)."""
        children = list(self.conversation.children)
        await self.conversation.remove_children(children[children.index(widget):])

    @work(thread=True, group="turn", exit_on_error=False)
    def _run_turn(self, request: TurnRequest, session: Any, cancel: threading.Event) -> None:
        """Waits for the turn on the app's MLX thread (see tui.turns and qwen_mlx.generate.worker);
        the turn reports through post_message only."""
        self.app.mlx.run(run_turn, request, session, cancel, post=self.post_message,
                         clock=self.app.clock, interval=self.app.flush_interval)

    async def on_turn_trimmed(self, message: TurnTrimmed) -> None:
        if message.turn != self.turn:
            return
        record = self.record
        first = len(record.dropped)
        record.dropped.extend(message.dropped)
        widgets = self.conversation.messages
        for widget in widgets[first:first + len(message.dropped)]:
            widget.set_dropped(True)
        turns = sum(1 for m in message.dropped if m.get("role") == "user")
        what = "the oldest turn" if turns == 1 else f"the {turns} oldest turns"
        verb = "goes" if turns == 1 else "go"
        notice = NoticeMessage(
            f"The context is full: {what} ({message.freed:,} tokens) no longer {verb} to the "
            "model; the system prompt stays.", kind="warning")
        # Before the new user message: the last two widgets are this turn's.
        anchor = widgets[-2] if len(widgets) >= 2 and isinstance(widgets[-2], UserMessage) \
            else widgets[-1]
        await self.conversation.mount(notice, before=anchor)

    def on_prefill_progress(self, message: PrefillProgress) -> None:
        if message.turn != self.turn or self.reply is None or self._streaming:
            return
        line = f"prefill {message.done:,}/{message.total:,} tokens"
        if message.done:
            line += f" · {message.tps:,.0f} tok/s"
        self.query_one(StatsBar).show(None, prefix=f"▶ {line}")
        if self.reply.waiting and not (self.cancel_event and self.cancel_event.is_set()):
            self.reply.set_note(f"reading the prompt: {message.done:,}/{message.total:,} "
                                "tokens…")

    async def on_turn_progress(self, message: TurnProgress) -> None:
        if message.turn != self.turn or self.reply is None:
            return
        self._streaming = True
        await self.reply.add(message.pieces, message.thinking)
        if message.stats is not None:
            self.query_one(StatsBar).show(message.stats, prefix="▶ ")
            self._show_context(used=message.stats.context_tokens, kv=message.kv_bytes)

    async def on_turn_done(self, message: TurnDone) -> None:
        if message.turn != self.turn:
            return
        record, reply = self.record, self.reply
        record.messages = message.messages
        transcript = record.transcript
        if message.replied:
            last = transcript[-1]
            meta: dict[str, Any] = {}
            if message.stats is not None:
                meta["stats"] = message.stats.to_dict()
            if message.thinking is not None:
                meta["thinking"] = {"tokens": message.thinking.tokens,
                                    "seconds": round(message.thinking.seconds, 2)}
            record.meta = (record.meta + [None] * len(transcript))[:len(transcript) - 1] + [meta]
            finish = message.stats.finish_reason if message.stats else None
            note, kind = FINISH_NOTES.get(finish or "", ("", ""))
            if message.error:
                note, kind = f"⚠ {message.error}", "error"
            await reply.finish(str(last.get("content", "")), last.get("reasoning_content") or "",
                               message.thinking, note, kind)
        else:
            # Nothing was added (the prompt did not fit, or rendering failed): show the
            # history as it stands and give the text back to the message box.
            record.meta = (record.meta + [None] * len(transcript))[:len(transcript)]
            await self._rebuild()
            # No error: the user stopped the turn before its first token.
            notice = (NoticeMessage(f"⚠ {message.error}", kind="error") if message.error
                      else NoticeMessage("stopped before the reply began"))
            await self.conversation.mount(notice)
            if not self.prompt.text:
                self.prompt.set_text(self._sent_text)
        self.busy, self.reply, self.cancel_event = False, None, None
        self.refresh_bindings()
        self._save()
        self._update_title()
        self.query_one(StatsBar).show(message.stats)
        self._show_context(used=message.context_tokens, saved=message.reasoning_saved,
                           kv=message.kv_bytes)
        if message.error:
            self.notify(message.error, severity="error", markup=False)
        self._maybe_warn()

    def _maybe_warn(self) -> None:
        state = self.context
        if state is None or state.fraction <= WARN_AT:
            self._warned = False
            return
        if not self._warned:
            self._warned = True
            self.notify(f"The context is {state.fraction:.0%} full. When a message no longer "
                        "fits, the oldest turns are dropped (the system prompt stays).",
                        severity="warning")

    def stop_generation(self) -> None:
        """Ask the worker to stop after the current token."""
        if self.cancel_event is not None:
            self.cancel_event.set()

    # ---------------------------------------------------------------- actions

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.busy  # hidden otherwise, and Ctrl+C falls through to copy
        if action == "cancel_edit":
            return self.editing is not None and not self.busy
        return True  # the IDLE_ONLY actions say themselves why they wait

    def action_stop(self) -> None:
        if self.busy and self.cancel_event is not None and not self.cancel_event.is_set():
            self.stop_generation()
            if self.reply is not None:
                self.reply.set_note("stopping…", kind="warning")

    async def action_regenerate(self) -> None:
        if self._wait_for_reply():
            return
        if self.session is None:
            self._say_no_model()
            return
        context = [m for m in self.record.messages if m.get("role") != "system"]
        if not any(m.get("role") == "user" for m in context):
            self.notify("There is no reply to regenerate yet.", severity="warning")
            return
        await self._start("regenerate")

    def action_edit_last(self) -> None:
        if self._wait_for_reply():
            return
        transcript = self.record.transcript
        users = [i for i, m in enumerate(transcript) if m.get("role") == "user"]
        if not users:
            self.notify("There is no message to edit yet.", severity="warning")
            return
        self.begin_edit(users[-1])

    def on_user_message_edit_requested(self, event: UserMessage.EditRequested) -> None:
        if self._wait_for_reply():
            return
        self.begin_edit(self.conversation.messages.index(event.message))

    def begin_edit(self, index: int) -> None:
        """Put message `index` in the box; Enter resends it and replaces what followed."""
        if index < len(self.record.dropped):
            self.notify("That message was trimmed from the context and cannot be resent.",
                        severity="warning")
            return
        if self.editing is None:
            self._draft = self.prompt.text
        self.editing = index
        banner = self.query_one("#edit-banner", Label)
        later = len(self.record.transcript) - index - 1
        banner.update(f"✎ Editing message {index + 1}: Enter resends it and replaces the "
                      f"{later} message{'s' if later != 1 else ''} after it · Esc cancels")
        banner.display = True
        self.prompt.set_text(str(self.record.transcript[index].get("content", "")))
        self.prompt.focus()
        self.refresh_bindings()

    def _end_edit(self) -> None:
        self.editing = None
        self.query_one("#edit-banner").display = False
        self.refresh_bindings()

    def action_cancel_edit(self) -> None:
        self._end_edit()
        self.prompt.set_text(self._draft)
        self._draft = ""

    def action_toggle_thinking(self) -> None:
        if self._wait_for_reply():
            return
        record = self.record
        record.enable_thinking = None if record.enable_thinking is False else False
        if self.session is not None:
            self.session.enable_thinking = record.enable_thinking
        self._save()
        self._show_context()
        self.notify(f"Thinking {'off' if record.enable_thinking is False else 'on'} "
                    "for this chat.")

    async def action_new_chat(self) -> None:
        if self._wait_for_reply():
            return
        settings = self.app.settings
        await self.show_record(self.app.store.new_chat(system=settings.system_prompt))
        self.prompt.focus()

    def action_clear_chat(self) -> None:
        """Ask, then start this chat over (the system prompt stays)."""
        if self._wait_for_reply():
            return
        record = self.record
        count = len(record.transcript)
        if not count:
            self.notify("This chat is empty already.")
            return
        export = self.app.store.path(record.id).with_suffix(".md")
        detail = "Its saved file is deleted"
        detail += (f"; its Markdown export stays: {export}" if export.exists()
                   else ". This cannot be undone.")

        async def answered(yes: bool | None) -> None:
            if yes:
                await self._clear_chat()

        self.app.push_screen(ConfirmScreen(
            f"Clear this chat's {count} message{'s' if count != 1 else ''}? The system "
            "prompt stays.", detail=detail, yes="Clear"), answered)

    async def _clear_chat(self) -> None:
        record = self.record
        record.messages = [m for m in record.messages[:1] if m.get("role") == "system"]
        record.dropped, record.meta = [], []
        if self.session is not None:
            self.session.clear()
        self._save()
        await self.show_record(record)
        self.notify("Chat cleared.")

    def action_open_chats(self) -> None:
        if self._wait_for_reply():
            return

        async def opened(chat_id: str | None) -> None:
            if not chat_id or (self.record and chat_id == self.record.id):
                return
            try:
                record = self.app.store.load(chat_id)
            except (OSError, ValueError, KeyError) as e:
                self.notify(f"Could not open the chat: {e}", severity="error", markup=False)
                return
            await self.show_record(record)

        self.app.push_screen(ChatsScreen(self.app.store, current=self.record.id), opened)

    def action_settings(self) -> None:
        if self._wait_for_reply():
            return
        model = self.app.model
        family = model.config.family if model is not None else ""
        self.app.push_screen(SettingsScreen(self.app.settings, family=family),
                             self.app.apply_settings)

    def set_system_prompt(self, system: str) -> None:
        """The settings changed the system prompt: this chat uses it from the next turn."""
        record = self.record
        body = [m for m in record.messages if m.get("role") != "system"]
        record.messages = ([{"role": "system", "content": system}] if system else []) + body
        if self.session is not None:
            self.session.messages = [dict(m) for m in record.messages]
        self._save()
        self._measure()

    def action_export(self) -> None:
        try:
            path = self.app.store.export_markdown(self.record)
        except OSError as e:
            self.notify(f"Could not export: {e}", severity="error", markup=False)
            return
        self.notify(f"Exported to {path}", title="Markdown", markup=False)

    def action_copy_code(self) -> None:
        for message in reversed(self.record.transcript):
            if message.get("role") == "assistant":
                blocks = code_blocks(str(message.get("content", "")))
                if blocks:
                    self.app.copy_to_clipboard(blocks[-1])
                    self.notify("Copied the last code block.")
                    return
        self.notify("No code block in the replies yet.", severity="warning")

    def action_attention_map(self) -> None:
        if self._wait_for_reply():
            return
        if self.session is None:
            self._say_no_model()
            return
        prompt = last_reply_prompt(self.record.messages)
        if prompt is None:
            self.notify("There is no reply yet: the map shows the prompt of the last reply.",
                        severity="warning")
            return
        path = self.app.store.path(self.record.id).with_suffix(".attention.png")
        self.notify("Drawing the attention map…")
        self._attention_worker(prompt, self.record.enable_thinking, path)

    @work(thread=True, exclusive=True, group="attention", exit_on_error=False)
    def _attention_worker(self, messages: list[dict], enable_thinking: bool | None,
                          path: Path) -> None:
        app = self.app
        try:
            saved = app.mlx.run(save_attention_map, app.model, app.tokenizer, messages,
                                enable_thinking, path)
        except QwenMLXError as e:
            app.call_from_thread(self.notify, str(e), severity="error", markup=False)
            return
        app.call_from_thread(self.notify, f"Saved to {saved}", title="Attention map",
                             markup=False)

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(self.app.help_sections()))
