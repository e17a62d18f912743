"""The scrolling conversation."""

from __future__ import annotations

from textual.containers import VerticalScroll

from .messages import AssistantMessage, MessageView


class Conversation(VerticalScroll, can_focus=False):
    """Messages, oldest first. Anchored to the bottom, so streaming text stays in view;
    Textual releases the anchor when the user scrolls up and restores it at the bottom."""

    def on_mount(self) -> None:
        self.anchor()

    @property
    def messages(self) -> list[MessageView]:
        """The message widgets, one per transcript message, in order."""
        return list(self.query_children(MessageView))

    def last_reply(self) -> AssistantMessage | None:
        replies = [m for m in self.messages if isinstance(m, AssistantMessage)]
        return replies[-1] if replies else None

    def follow(self) -> None:
        """Scroll to the end and stick there again (after the user sends)."""
        self.anchor()
