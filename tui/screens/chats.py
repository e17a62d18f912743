"""Ctrl+O / F3: the saved chats, newest first, to reopen or delete."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from ..store import ChatStore, ChatSummary
from ..text import clean


def describe(summary: ChatSummary) -> Content:
    """Title, then date and turns dimmed; the title is user text, so never markup."""
    when = summary.updated.replace("T", " ")[:16]
    turns = f"{summary.turns} turn{'s' if summary.turns != 1 else ''}"
    return Content.assemble(clean(summary.title), "\n", (f"{when} · {turns}", "dim"))


class ChatsScreen(ModalScreen["str | None"]):
    """Returns the id of the chat to open, or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close"),
                Binding("delete,d", "delete", "Delete")]

    def __init__(self, store: ChatStore, *, current: str | None = None) -> None:
        super().__init__()
        self.store, self.current = store, current
        self.titles: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        with Vertical(id="chats-dialog") as dialog:
            dialog.border_title = "Chats"
            dialog.border_subtitle = "Enter opens · d deletes · Esc closes"
            yield OptionList(id="chat-list")
            yield Static(f"Saved in {self.store.chats_dir}", id="chats-path", markup=False)

    def on_mount(self) -> None:
        self.refresh_list()
        self.query_one(OptionList).focus()

    def refresh_list(self) -> None:
        options = self.query_one(OptionList)
        options.clear_options()
        summaries = self.store.summaries()
        self.titles = {s.id: s.title for s in summaries}
        if not summaries:
            options.add_option(Option("No saved chats yet.", disabled=True))
        for summary in summaries:
            options.add_option(Option(describe(summary), id=summary.id))
        if summaries:
            options.highlighted = 0  # Enter opens the newest at once

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.dismiss(event.option.id)

    def action_delete(self) -> None:
        options = self.query_one(OptionList)
        option = options.highlighted_option
        if option is None or not option.id:
            return
        if option.id == self.current:
            self.notify("That chat is open; start a new one (Ctrl+N) to delete it.",
                        severity="warning")
            return
        self.store.delete(option.id)
        self.notify(f"Deleted “{self.titles.get(option.id, option.id)}”.", markup=False)
        self.refresh_list()
