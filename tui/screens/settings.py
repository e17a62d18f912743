"""F2: the settings dialog. It returns new Settings (or None); the app saves and applies them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static, TextArea

from ..settings import SAMPLING_FIELDS, Settings, SettingsError, preset

LABELS = {"temperature": "Temperature", "top_p": "Top p", "top_k": "Top k", "min_p": "Min p",
          "repetition_penalty": "Repetition pen.", "presence_penalty": "Presence pen."}
INTEGER_FIELDS = {"top_k", "max_tokens", "max_context", "num_draft_tokens"}
KV_CHOICES = [("full precision", 0), ("8-bit", 8), ("4-bit", 4)]  # 0 stands for None
DRAFT_CHOICES = [("off", ""), ("MTP head", "mtp"), ("draft model", "model")]


def _shown(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


class SettingsScreen(ModalScreen["Settings | None"]):
    """System prompt, sampling (with Qwen's presets), reply length, long context, KV cache."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]
    # Below 70 columns each row of two fields takes two lines (see app.tcss).
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (70, "-wide")]

    def __init__(self, settings: Settings, *, family: str = "") -> None:
        super().__init__()
        self.settings = settings
        self.family = family

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(id="settings-dialog") as dialog:
            dialog.border_title = "Settings"
            dialog.border_subtitle = "Ctrl+S saves · Esc cancels"
            with VerticalScroll(id="settings-body"):
                yield Label("System prompt (this chat and new ones)", classes="section first")
                yield TextArea(s.system_prompt, id="system_prompt", soft_wrap=True,
                               compact=True, tab_behavior="focus")
                yield Label("Sampling: empty = automatic (the card's preset of each "
                            "reply's mode)", classes="section")
                names = list(SAMPLING_FIELDS)
                for left, right in zip(names[::2], names[1::2]):
                    with Horizontal(classes="row"):
                        for name in (left, right):
                            yield Label(LABELS[name], classes="field")
                            yield self._input(name, getattr(s, name))
                with Horizontal(classes="row buttons"):
                    yield Button("Thinking preset", id="preset-thinking", compact=True)
                    yield Button("Non-thinking preset", id="preset-non-thinking", compact=True)
                    yield Button("Auto", id="preset-auto", compact=True)
                with Horizontal(classes="row"):
                    yield Label("Max tokens", classes="field")
                    yield self._input("max_tokens", s.max_tokens, placeholder="2048")
                    yield Label("KV cache", classes="field")
                    yield Select(KV_CHOICES, value=s.kv_bits or 0, allow_blank=False,
                                 id="kv_bits", compact=True)
                yield Static("KV cache bits apply to chats started afterwards.",
                             classes="hint")
                yield Label("Speculative decoding: same output, faster when drafts are "
                            "accepted", classes="section")
                kind = "mtp" if s.speculative else "model" if s.draft_model else ""
                with Horizontal(classes="row"):
                    yield Label("Drafts from", classes="field")
                    yield Select(DRAFT_CHOICES, value=kind, allow_blank=False,
                                 id="speculation", compact=True)
                    yield Label("Per step", classes="field")
                    yield self._input("num_draft_tokens", s.num_draft_tokens)
                with Horizontal(classes="row"):
                    yield Label("Draft model", classes="field")
                    yield Input(s.draft_model or "", id="draft_model", compact=True,
                                classes="value", placeholder="folder or hub id")
                yield Static("The MTP head needs a Qwen3.5/3.6 or Qwen3-Next checkpoint; a "
                             "draft model, the same tokenizer (Qwen3-0.6B for Qwen3-8B). Both apply to "
                             "chats started afterwards.",
                             classes="hint")
                yield Label("Long context: changing it reloads the model", classes="section")
                with Horizontal(classes="row"):
                    yield Label("Extend with", classes="field")
                    yield Checkbox("YaRN", s.rope_scaling is not None, id="yarn", compact=True)
                    yield Label("Factor", classes="field")
                    yield self._input("rope_factor", s.rope_factor)
                with Horizontal(classes="row"):
                    yield Label("Max context", classes="field")
                    yield self._input("max_context", s.max_context, placeholder="model's")
                yield Static("YaRN is best turned on only for long inputs: it stretches "
                             "positions and can cost a little quality on short ones.",
                             classes="hint")
            yield Static("", id="settings-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Save", id="save", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def _input(self, name: str, value: Any, placeholder: str = "auto") -> Input:
        kind = "integer" if name in INTEGER_FIELDS else "number"
        # An empty field means "auto" (or the model's), so empty is valid, not red.
        return Input(_shown(value), id=name, type=kind, placeholder=placeholder, compact=True,
                     classes="value", valid_empty=True)

    def on_mount(self) -> None:
        self.query_one("#settings-error").display = False
        prompt = self.query_one("#system_prompt", TextArea)
        prompt.move_cursor(prompt.document.end)  # typing adds to the prompt, as in an editor
        prompt.focus()

    def _family(self) -> str | None:
        model = getattr(self.app, "model", None)
        return model.config.family if model is not None else None

    @on(Button.Pressed, "#preset-thinking")
    def _thinking_preset(self) -> None:
        self._fill(preset(thinking=True, family=self._family()))

    @on(Button.Pressed, "#preset-non-thinking")
    def _non_thinking_preset(self) -> None:
        self._fill(preset(thinking=False, family=self._family()))

    @on(Button.Pressed, "#preset-auto")
    def _auto(self) -> None:
        self._fill({name: None for name in SAMPLING_FIELDS})

    def _fill(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if name in SAMPLING_FIELDS:
                self.query_one(f"#{name}", Input).value = _shown(value)

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        try:
            settings = self.read()
        except SettingsError as e:
            error = self.query_one("#settings-error", Static)
            error.update(f"⚠ {e}")
            error.display = True
            return
        self.dismiss(settings)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)

    def read(self) -> Settings:
        """The settings the form holds; raises SettingsError for a bad value."""
        values: dict[str, Any] = {
            "system_prompt": self.query_one("#system_prompt", TextArea).text.strip()}
        for name in (*SAMPLING_FIELDS, "max_tokens", "rope_factor", "max_context",
                     "num_draft_tokens"):
            raw = self.query_one(f"#{name}", Input).value.strip()
            label = LABELS.get(name, name.replace("_", " "))
            if not raw:
                if name in ("max_tokens", "rope_factor"):
                    raise SettingsError(f"{label} needs a value")
                values[name] = None
                continue
            try:
                values[name] = int(raw) if name in INTEGER_FIELDS else float(raw)
            except ValueError:
                raise SettingsError(f"{label}: {raw!r} is not a number") from None
        # The switch says YaRN; a scaling given on the command line (linear, dynamic) stays.
        values["rope_scaling"] = ((self.settings.rope_scaling or "yarn")
                                  if self.query_one("#yarn", Checkbox).value else None)
        values["kv_bits"] = self.query_one("#kv_bits", Select).value or None
        kind = self.query_one("#speculation", Select).value
        draft = self.query_one("#draft_model", Input).value.strip() or None
        if kind == "model" and not draft:
            raise SettingsError("draft model: give a folder or hub id, or choose off")
        values["speculative"] = "mtp" if kind == "mtp" else None
        values["draft_model"] = draft if kind == "model" else None
        return replace(self.settings, **values).validate()
