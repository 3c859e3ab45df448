"""Edit the conversation's system prompt."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import Static, TextArea

from llmchat.tui.screens.confirm import Dialog

HINT = "Ctrl+S saves · Esc cancels · an empty prompt means none"


class SystemPromptScreen(Dialog[str | None]):
    """A text area with the current system prompt; Ctrl+S dismisses with the text, Esc with None."""

    DEFAULT_CSS = """
    SystemPromptScreen #system {
        height: 12;
        margin: 1 0 0 0;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, current: str = "", *, title: str = "System prompt") -> None:
        super().__init__()
        self.current = current
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = self.title_text
            yield TextArea(self.current, id="system", soft_wrap=True, tab_behavior="focus")
            yield Static(HINT, classes="hint", markup=False)

    def on_mount(self) -> None:
        area = self.query_one(TextArea)
        area.focus()
        area.move_cursor(area.document.end)

    def action_save(self) -> None:
        self.dismiss(self.query_one(TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)
