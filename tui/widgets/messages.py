"""Messages in the conversation: the user's, the model's (reasoning + answer), notices."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from ..streaming import ANSWER, THINKING, ThinkingInfo
from ..text import clean, code_blocks
from .thinking import ThinkingBlock, thinking_title

DROPPED_TIP = "Trimmed from the model's context to make room: the model no longer sees it."


class MessageView(Vertical, can_focus=True):
    """A message; focus it (Tab) to copy it or its last code block."""

    BINDINGS = [Binding("c", "copy", "Copy", tooltip="copy the message"),
                Binding("b", "copy_code", "Copy code", tooltip="copy its last code block")]
    role = ""

    def __init__(self, text: str = "", *, dropped: bool = False) -> None:
        super().__init__(classes=f"message {self.role}")
        self._text = text
        self.set_dropped(dropped)

    @property
    def text(self) -> str:
        """The message as sent or received (Markdown for the model's)."""
        return self._text

    def set_dropped(self, dropped: bool) -> None:
        """Mark a message the context no longer holds."""
        self.set_class(dropped, "dropped")
        self.tooltip = DROPPED_TIP if dropped else None

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.text)
        self.notify("Copied the message.")

    def action_copy_code(self) -> None:
        blocks = code_blocks(self.text)
        if not blocks:
            self.notify("This message has no code block.", severity="warning")
            return
        self.app.copy_to_clipboard(blocks[-1])
        self.notify("Copied the code block.")


class UserMessage(MessageView):
    """What the user sent."""

    BINDINGS = [Binding("e", "edit", "Edit", tooltip="edit your message and resend it")]
    role = "user"

    class EditRequested(Message):
        """The user wants to change this message and resend it."""

        def __init__(self, message: "UserMessage") -> None:
            super().__init__()
            self.message = message

    def __init__(self, text: str, *, dropped: bool = False) -> None:
        super().__init__(text, dropped=dropped)

    def compose(self) -> ComposeResult:
        yield Label("You", classes="role")
        yield Static(clean(self._text), markup=False, classes="body")

    def action_edit(self) -> None:
        self.post_message(self.EditRequested(self))


class OtherMessage(MessageView):
    """A message of another role (a tool result, say), shown as plain text."""

    role = "other"

    def __init__(self, role: str, text: str, *, dropped: bool = False) -> None:
        self._role_name = role
        super().__init__(text, dropped=dropped)

    def compose(self) -> ComposeResult:
        yield Label(self._role_name.capitalize(), classes="role", markup=False)
        yield Static(clean(self._text), markup=False, classes="body")


class AssistantMessage(MessageView):
    """A reply: a thinking block (hidden when empty), the answer as Markdown, and a note
    (waiting, stopped, errors)."""

    role = "assistant"

    def __init__(self, answer: str = "", reasoning: str = "", *,
                 thinking: ThinkingInfo | None = None, note: str = "", note_kind: str = "",
                 dropped: bool = False) -> None:
        self.answer, self.reasoning = answer, reasoning
        self.thinking_block = ThinkingBlock(
            reasoning, title=thinking_title(thinking, finished=True), collapsed=True)
        self.body = Markdown(clean(answer), classes="answer")
        self.note = Label(note, classes=f"note {note_kind}".strip(), markup=False)
        self.note.display = bool(note)
        self._stream: MarkdownStream | None = None
        self._folded = bool(reasoning)  # a saved reply's reasoning starts folded
        self._waiting = False
        super().__init__(dropped=dropped)

    @property
    def text(self) -> str:
        return self.answer

    def compose(self) -> ComposeResult:
        yield Label("Qwen", classes="role")
        yield self.thinking_block
        yield self.body
        yield self.note

    def set_note(self, text: str, *, kind: str = "") -> None:
        self.note.update(text)
        self.note.display = bool(text)
        for name in ("error", "warning"):
            self.note.set_class(kind == name, name)

    @property
    def waiting(self) -> bool:
        """Streaming has begun but no text has arrived yet."""
        return self._waiting

    def start(self) -> None:
        """Streaming begins: the reasoning block opens expanded as text arrives."""
        self.thinking_block.collapsed = False
        self._folded = False
        self._waiting = True
        self.set_note("waiting for the first token…")

    async def add(self, pieces: list[tuple[str, str]], thinking: ThinkingInfo | None) -> None:
        """Stream a batch of (phase, text) pieces into the blocks."""
        for phase, text in pieces:
            if not text:
                continue
            if self._waiting:  # (a "stopping…" note stays)
                self._waiting = False
                self.set_note("")
            if phase == THINKING:
                self.reasoning += text
                await self.thinking_block.write(text)
            elif phase == ANSWER:
                self._fold(thinking)
                self.answer += text
                if self._stream is None:
                    self._stream = Markdown.get_stream(self.body)
                await self._stream.write(clean(text))
        if self.thinking_block.display and not self._folded:
            self.thinking_block.title = thinking_title(thinking)

    def _fold(self, thinking: ThinkingInfo | None) -> None:
        """Fold the reasoning once, when the answer starts; the user may reopen it."""
        if not self._folded and self.thinking_block.display:
            self._folded = True
            self.thinking_block.fold(thinking_title(thinking, finished=True))

    async def finish(self, answer: str, reasoning: str, thinking: ThinkingInfo | None,
                     note: str = "", kind: str = "") -> None:
        """The reply is over: render the final text once, so code fences come out whole."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if answer.strip():
            self._fold(thinking)
        self.answer, self.reasoning = answer, reasoning
        await self.thinking_block.finish(reasoning, thinking_title(thinking, finished=True))
        await self.body.update(clean(answer))
        self.set_note(note, kind=kind)


class NoticeMessage(Static):
    """A line from the app in the conversation (trimmed context, errors)."""

    def __init__(self, text: str, *, kind: str = "") -> None:
        super().__init__(text, markup=False, classes=f"notice {kind}".strip())
