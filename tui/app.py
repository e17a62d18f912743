"""The chat App and `run_chat`, the entry point `qwen-mlx chat` calls.

The App holds what outlives a chat: the model and tokenizer, the settings and
the store. The model loads in a thread worker, so the window opens at once.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from textual import work
from textual.app import App
from textual.binding import Binding

from qwen_mlx.generate.generation import ChatSession
from qwen_mlx.generate.worker import WORKER
from qwen_mlx.checkpoint.loader import load

from .paths import resolve_data_dir
from .screens.chat import ChatScreen
from .settings import Settings
from .store import ChatRecord, ChatStore
from .widgets.messages import MessageView, UserMessage
from .widgets.prompt import PromptInput


class ChatApp(App[None]):
    """Chat with a local Qwen model.

    Args:
        model_path: the model folder (what `qwen_mlx.load` reads).
        rope_scaling, rope_factor, max_context: loader options from the command line;
            when given they override the saved settings for this run.
        data_dir: where settings and chats live (see `tui.paths`).
        preloaded: an already loaded (model, tokenizer), skipping the load (tests).
        clock: the clock for thinking timers (tests and snapshots freeze it).
        flush_interval: the shortest time between two UI updates of a streaming reply.
        chat_id: a saved chat to open at start instead of a new one.
        session_factory: makes the ChatSession (ChatSession itself; tests may wrap it).
        model_name: what the header calls the model (the hub id it came from); by
            default the folder's name.
    """

    CSS_PATH = "app.tcss"
    TITLE = "qwen-mlx"
    # The help screen lists every key; the palette would add a second, partial list.
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True, tooltip="quit")]

    def __init__(self, model_path: str | Path, *, rope_scaling: str | None = None,
                 rope_factor: float = 4.0, max_context: int | None = None,
                 data_dir: str | Path | None = None, preloaded: tuple[Any, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic, flush_interval: float = 0.05,
                 chat_id: str | None = None,
                 session_factory: Callable[..., ChatSession] = ChatSession,
                 model_name: str | None = None) -> None:
        super().__init__()
        self.model_path = Path(model_path)
        self.model_name = model_name or self.model_path.name
        self.model_error: str | None = None  # why the last load failed
        self.store = ChatStore(resolve_data_dir(data_dir))
        settings, self._settings_warning = self.store.load_settings()
        overrides: dict[str, Any] = {}
        if rope_scaling is not None:
            overrides.update(rope_scaling=rope_scaling, rope_factor=rope_factor)
        if max_context is not None:
            overrides["max_context"] = max_context
        self.settings: Settings = replace(settings, **overrides)
        self.model: Any = None
        self.tokenizer: Any = None
        self.draft: tuple[Any, Any] | None = None  # the loaded draft model, when one is set
        self._draft_source: str | None = None
        self._preloaded = preloaded
        self.clock, self.flush_interval = clock, flush_interval
        self.session_factory = session_factory
        self._chat_id = chat_id
        # Loads and turns run on the library's one MLX thread, never on Textual's workers:
        # MLX keeps every evaluating thread's streams (and OS threads) for good.
        self.mlx = WORKER

    def get_default_screen(self) -> ChatScreen:
        return ChatScreen()

    @property
    def chat(self) -> ChatScreen:
        """The main screen (the bottom of the screen stack)."""
        return self.screen_stack[0]  # type: ignore[return-value]

    def on_mount(self) -> None:
        if self._settings_warning:
            self.notify(self._settings_warning, severity="warning", markup=False)
        if self._preloaded is not None:
            self._model_loaded(*self._preloaded)
            if self.settings.draft_model:
                self.load_draft()
        else:
            self.load_model()

    def first_record(self) -> ChatRecord:
        """The chat shown at start: the one asked for, else a new one."""
        if self._chat_id:
            try:
                return self.store.load(self._chat_id)
            except (OSError, ValueError, KeyError) as e:
                self.notify(f"Could not open chat {self._chat_id}: {e}", severity="error",
                            markup=False)
        return self.store.new_chat(system=self.settings.system_prompt)

    # ------------------------------------------------------------------ model

    @work(thread=True, exclusive=True, group="model", exit_on_error=False)
    def load_model(self) -> None:
        """Load (or reload) the model with the current long-context settings."""
        options = self.settings.model_options()
        try:
            model, tokenizer = self.mlx.run(load, self.model_path, **options)
            if tokenizer is None:
                raise ValueError(f"{self.model_path} has no tokenizer.json: copy it (and "
                                 "tokenizer_config.json) from the original checkpoint")
        except Exception as e:  # shown in the window: the user can fix the settings
            self.call_from_thread(self._model_failed, str(e))
            return
        self.call_from_thread(self._model_loaded, model, tokenizer)
        self._load_draft(model, tokenizer)

    def _load_draft(self, model: Any, tokenizer: Any) -> None:
        """Load the settings' draft model (on the calling worker thread); a draft that
        cannot serve is reported and left out, the chat goes on without it."""
        from qwen_mlx.generate.speculative import check_draft_vocabulary, load_draft

        source = self.settings.draft_model
        if source == self._draft_source:
            return
        self.draft, self._draft_source = None, source
        if not source:
            return
        try:
            draft = self.mlx.run(load_draft, source)
            check_draft_vocabulary(tokenizer, draft[1])
        except Exception as e:
            self.call_from_thread(self.notify, f"The draft model is not used: {e}",
                                  severity="error", timeout=30, markup=False)
            return
        self.draft = draft
        self.call_from_thread(self.notify, f"Draft model {source} loaded: new chats use it.",
                              markup=False)

    @work(thread=True, exclusive=True, group="draft", exit_on_error=False)
    def load_draft(self) -> None:
        if self.model is not None:
            self._load_draft(self.model, self.tokenizer)

    def session_options(self) -> dict[str, Any]:
        """Speculative-decoding keywords for a new ChatSession, as far as they can serve:
        the MTP head only where the checkpoint has one, a draft model once loaded."""
        spec = self.settings.speculation()
        if spec.get("speculative") == "mtp" and getattr(self.model, "mtp", None) is None:
            return {}
        if "draft_model" in spec:
            if self.draft is None:
                return {}
            spec["draft_model"] = self.draft
        return spec

    def _model_loaded(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer, self.model_error = model, tokenizer, None
        self.chat.model_ready()
        self._warn_without_mtp()

    def _warn_without_mtp(self) -> None:
        if (self.settings.speculative == "mtp" and self.model is not None
                and getattr(self.model, "mtp", None) is None):
            self.notify("This checkpoint has no MTP head (mtp.* weights): speculative "
                        "decoding stays off. Convert it again without --no-mtp, or use a "
                        "draft model.", severity="warning", markup=False)

    def _model_failed(self, error: str) -> None:
        self.model_error = error
        self.chat.model_failed(error)
        self.notify(f"The model could not be loaded: {error}", severity="error",
                    timeout=30, markup=False)

    def reload_model(self) -> None:
        label = ("with YaRN" if self.settings.rope_scaling else "without YaRN")
        self.model = self.tokenizer = self.model_error = None
        self.chat.model_loading(f"Reloading the model {label}…")
        self.load_model()

    # --------------------------------------------------------------- settings

    def apply_settings(self, settings: Settings | None) -> None:
        """Save new settings and apply them: the system prompt to this chat, and a
        reload when the long-context options changed."""
        if settings is None or settings == self.settings:
            return
        old, self.settings = self.settings, settings
        try:
            self.store.save_settings(settings)
        except OSError as e:
            self.notify(f"Could not save the settings: {e}", severity="error", markup=False)
        if settings.system_prompt != old.system_prompt:
            self.chat.set_system_prompt(settings.system_prompt)
        if settings.model_options() != old.model_options():
            self.reload_model()
        elif settings.draft_model != old.draft_model:
            self.load_draft()
        if settings.speculative != old.speculative:
            self._warn_without_mtp()
        self.notify("Settings saved.")

    # ---------------------------------------------------------------- helpers

    def remember_sent(self, text: str) -> None:
        """Keep a sent message for Up/Down in later runs and other chats."""
        try:
            self.store.add_history(text)
        except OSError as e:
            self.notify(f"Could not save the message history: {e}", severity="warning",
                        markup=False)

    def help_sections(self) -> list[tuple[str, list]]:
        """The help screen's content, from the bindings in force."""
        return [("Chat", list(ChatScreen.BINDINGS) + list(self.BINDINGS)),
                ("Message box", PromptInput.KEYS),
                ("A focused message (Tab to reach it)",
                 list(MessageView.BINDINGS) + list(UserMessage.BINDINGS)),
                ("Dialogs", [("escape", "close or cancel"), ("ctrl+s", "save the settings"),
                             ("d", "delete the highlighted chat (chat list; asks first)"),
                             ("y / n", "answer a question (delete? clear?)")])]

    async def action_quit(self) -> None:
        # A reply still streaming would keep its thread (and the process) alive.
        self.chat.stop_generation()
        self.exit()


def run_chat(model_path: Path, *, rope_scaling: str | None = None, rope_factor: float = 4.0,
             max_context: int | None = None, data_dir: Path | None = None,
             model_name: str | None = None) -> None:
    """Open the chat UI on `model_path` and return when the user quits."""
    ChatApp(model_path, rope_scaling=rope_scaling, rope_factor=rope_factor,
            max_context=max_context, data_dir=data_dir, model_name=model_name).run()
