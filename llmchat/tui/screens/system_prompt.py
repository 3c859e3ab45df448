"""Edit the conversation's system prompt."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import Static, TextArea

from llmchat.tui.screens.confirm import Dialog
from llmchat.tui.widgets.format import printable

HINT = "Ctrl+S saves · Esc cancels"
NO_DEFAULT = "Empty: no system prompt."
DEFAULT_SHOWN = 300  # characters of a template's default quoted (Mistral's runs to pages)


def empty_means(template_default: str | None) -> str:
    """What an empty system prompt does: nothing, or the model's template writes its own default."""
    if not template_default:
        return NO_DEFAULT
    text = " ".join(printable(template_default).split())
    if len(text) > DEFAULT_SHOWN:
        text = text[: DEFAULT_SHOWN - 1].rstrip() + "…"
    return f"Empty: the model's template uses its own default: “{text}”"


class SystemPromptScreen(Dialog[str | None]):
    """A text area with the current system prompt; Ctrl+S dismisses with the text, Esc with None.

    `template_default` is the system prompt the model's chat template writes when there is none
    (the app finds it; None when the template adds none), so the dialog can say what empty means.
    """

    DEFAULT_CSS = """
    SystemPromptScreen #system {
        height: 12;
        margin: 1 0 0 0;
    }
    SystemPromptScreen #empty-means {
        color: $text-muted;
        height: auto;
        margin: 1 0 0 0;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, current: str = "", *, title: str = "System prompt", template_default: str | None = None) -> None:
        super().__init__()
        self.current = current
        self.title_text = title
        self.template_default = template_default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = self.title_text
            yield TextArea(self.current, id="system", soft_wrap=True, tab_behavior="focus")
            yield Static(empty_means(self.template_default), id="empty-means", markup=False)
            yield Static(HINT, classes="hint", markup=False)

    def on_mount(self) -> None:
        area = self.query_one(TextArea)
        area.focus()
        area.move_cursor(area.document.end)

    def action_save(self) -> None:
        self.dismiss(self.query_one(TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)
