"""F1 / ?: every key, read from the bindings themselves so the list cannot go stale."""

from __future__ import annotations

from typing import Iterable

from rich.console import Group
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


_NAMES = {"question_mark": "?", "escape": "Esc", "enter": "Enter", "pageup": "PgUp",
          "pagedown": "PgDn"}


def key_label(keys: str) -> str:
    """"ctrl+r,f3" -> "Ctrl+R, F3"; "up / down" -> "Up / Down"."""

    def part(p: str) -> str:
        if p in _NAMES:
            return _NAMES[p]
        return p.upper() if len(p) == 1 or (p[0] == "f" and p[1:].isdigit()) else p.capitalize()

    def combo(k: str) -> str:
        k = k.strip()
        return k if len(k) == 1 else "+".join(part(p) for p in k.split("+"))  # plain "c"

    def one(key: str) -> str:
        return " / ".join(combo(k) for k in key.split(" / "))

    return ", ".join(one(k) for k in keys.split(","))


def rows(sections: Iterable[tuple[str, Iterable[Binding | tuple[str, str]]]]) -> Group:
    """A table of (keys, what they do) per place the keys work, under its title (the
    title spans the width: in the keys column it would be cut); keys that do the same
    thing share a row."""
    tables = []
    for title, entries in sections:
        table = Table(show_header=False, box=None, padding=(0, 2, 0, 0), expand=True,
                      title=f"[b u]{title}[/]", title_justify="left", title_style="")
        table.add_column(style="bold", no_wrap=True, width=22)
        table.add_column(ratio=1)
        merged: dict[str, list[str]] = {}
        for entry in entries:
            if isinstance(entry, Binding):
                keys, text = entry.key, entry.tooltip or entry.description or entry.action
            else:
                keys, text = entry
            merged.setdefault(text, []).append(keys)
        for text, keys in merged.items():
            table.add_row(key_label(",".join(keys)), text)
        table.add_row("", "")
        tables.append(table)
    return Group(*tables)


class HelpScreen(ModalScreen[None]):
    """The list of keys; any of Esc, F1, ? or q closes it."""

    BINDINGS = [Binding("escape,f1,question_mark,q", "dismiss", "Close")]

    def __init__(self, sections: list[tuple[str, list]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-dialog") as box:
            box.border_title = "Keys"
            box.border_subtitle = "Esc closes"
            yield Static(rows(self.sections), id="help-table")
