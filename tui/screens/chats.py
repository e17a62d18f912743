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
from .confirm import ConfirmScreen


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
        self._skipped: list[tuple[str, str]] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="chats-dialog") as dialog:
            dialog.border_title = "Chats"
            dialog.border_subtitle = "Enter opens · d deletes (asks first) · Esc closes"
            yield OptionList(id="chat-list")
            yield Static(f"Saved in {self.store.chats_dir}", id="chats-path", markup=False)

    def on_mount(self) -> None:
        self.refresh_list()
        self.query_one(OptionList).focus()

    def refresh_list(self) -> None:
        options = self.query_one(OptionList)
        options.clear_options()
        summaries, skipped = self.store.scan()
        if skipped and skipped != self._skipped:  # said once, not after every delete
            names = ", ".join(f"{name} ({why})" for name, why in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            self.notify(f"Skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} "
                        f"that {'are' if len(skipped) != 1 else 'is'} not a saved chat, in "
                        f"{self.store.chats_dir}: {names}{more}.", severity="warning",
                        timeout=15, markup=False)
        self._skipped = skipped
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
        chat_id = option.id
        title = self.titles.get(chat_id, chat_id)
        export = self.store.path(chat_id).with_suffix(".md")
        detail = (f"Its Markdown export stays: {export}" if export.exists()
                  else "This cannot be undone.")

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            self.store.delete(chat_id)
            self.notify(f"Deleted “{title}”.", markup=False)
            self.refresh_list()

        self.app.push_screen(ConfirmScreen(f"Delete the chat “{title}”?", detail=detail),
                             answered)
