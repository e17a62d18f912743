"""The message box: a multi-line TextArea that sends on Enter and keeps a history."""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    """Enter sends; Shift+Enter or Ctrl+J starts a new line (terminals without the kitty
    keyboard protocol send Shift+Enter as plain Enter, hence the second key). Up on the
    first line and Down on the last walk through the messages sent before."""

    # Keys handled in _on_key rather than as bindings, listed for the help screen.
    KEYS = [("enter", "send the message"),
            ("shift+enter, ctrl+j", "new line in the message"),
            ("up / down", "earlier / later sent messages (on the first / last line)")]

    class Submitted(Message):
        """The user pressed Enter."""

        def __init__(self, prompt: "PromptInput", text: str) -> None:
            super().__init__()
            self.prompt, self.text = prompt, text

        @property
        def control(self) -> "PromptInput":
            return self.prompt

    def __init__(self, *, id: str | None = None, placeholder: str = "") -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         placeholder=placeholder, compact=True)
        self.sent: list[str] = []
        self._browsing: int | None = None  # index into sent while walking it
        self._draft = ""  # what was typed before walking the history

    def remember(self, text: str) -> None:
        """Add a sent message to the history (not twice in a row)."""
        if text.strip() and (not self.sent or self.sent[-1] != text):
            self.sent.append(text)
        self._browsing = None

    def set_text(self, text: str) -> None:
        """Replace the contents and put the cursor at the end."""
        self.load_text(text)
        self.move_cursor(self.document.end)

    async def _on_key(self, event: events.Key) -> None:
        key = event.key
        if key == "enter":
            self._consume(event)
            self.post_message(self.Submitted(self, self.text))
            return
        if key in ("shift+enter", "ctrl+j"):
            self._consume(event)
            if not self.read_only:
                start, end = self.selection
                self.replace("\n", start, end)
            return
        row = self.cursor_location[0]
        if key == "up" and row == 0 and self.selection.is_empty and self._step(-1):
            self._consume(event)
            return
        if key == "down" and row == self.document.line_count - 1 and self.selection.is_empty \
                and self._step(+1):
            self._consume(event)
            return
        await super()._on_key(event)

    @staticmethod
    def _consume(event: events.Key) -> None:
        event.stop()
        event.prevent_default()

    def _step(self, direction: int) -> bool:
        """Move through the history; False when there is nowhere to go."""
        if not self.sent:
            return False
        if self._browsing is None:
            if direction > 0:
                return False
            self._draft, self._browsing = self.text, len(self.sent)
        target = self._browsing + direction
        if target < 0:
            return False
        if target >= len(self.sent):
            self._browsing = None
            self.set_text(self._draft)
            return True
        self._browsing = target
        self.set_text(self.sent[target])
        return True
