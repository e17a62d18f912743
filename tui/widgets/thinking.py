"""The reasoning of a reply, streamed into a block that folds once the answer starts."""

from __future__ import annotations

from textual.widgets import Collapsible, Markdown
from textual.widgets.markdown import MarkdownStream

from ..streaming import ThinkingInfo
from ..text import clean, duration


def thinking_title(info: ThinkingInfo | None, *, finished: bool = False) -> str:
    """"Thinking… 12 tokens" while it runs, "Thought for 3.2 s · 57 tokens" after."""
    if info is None:
        return "Thoughts"
    tokens = f"{info.tokens:,} token{'s' if info.tokens != 1 else ''}"
    if info.done or finished:
        return f"Thought for {duration(info.seconds)} · {tokens}"
    return f"Thinking… {duration(info.seconds)} · {tokens}"


class ThinkingBlock(Collapsible):
    """A Collapsible around a Markdown of the reasoning; hidden while it has no text."""

    def __init__(self, text: str = "", *, title: str = "Thinking…", collapsed: bool = False,
                 id: str | None = None) -> None:
        self.body = Markdown(clean(text), classes="reasoning")
        super().__init__(self.body, title=title, collapsed=collapsed, id=id)
        self.text = text
        self._stream: MarkdownStream | None = None
        self.display = bool(text.strip())

    async def write(self, delta: str) -> None:
        """Append streamed reasoning."""
        if not delta:
            return
        self.text += delta
        self.display = True
        if self._stream is None:
            self._stream = Markdown.get_stream(self.body)
        await self._stream.write(clean(delta))

    def fold(self, title: str) -> None:
        """The answer has started: fold the reasoning away and say how long it took."""
        self.collapsed = True
        self.title = title

    async def finish(self, text: str, title: str) -> None:
        """The reply ended: render the final reasoning once (keeps fences intact)."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.text = text
        self.title = title
        self.display = bool(text.strip())
        await self.body.update(clean(text))
