"""Small shared modals: a yes/no question and a one-line text prompt, and the dialog frame they share.

`Dialog` is the base of every screen in this package: a centred bordered box over the dimmed app,
styled from the theme's variables only.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

ResultType = TypeVar("ResultType")


class Dialog(ModalScreen[ResultType]):
    """A modal with one centred `.dialog` box; subclasses fill it in `compose`."""

    DEFAULT_CSS = """
    Dialog {
        align: center middle;
    }
    Dialog > .dialog {
        width: 80%;
        max-width: 110;
        height: auto;
        max-height: 90%;
        border: round $primary;
        border-title-color: $text-accent;
        border-title-style: bold;
        background: $surface;
        padding: 0 1;
    }
    Dialog > .dialog.small {
        width: 60%;
        max-width: 72;
    }
    Dialog .hint {
        color: $text-muted;
        height: auto;
        margin: 1 0 0 0;
    }
    Dialog .error-text {
        color: $error;
        height: auto;
    }
    Dialog .message {
        height: auto;
        margin: 1 0;
    }
    """


class ConfirmScreen(Dialog[bool]):
    """A question answered with Yes or No; dismisses with True for yes. `y`/`n` answer, Esc is no.

    "No" has the focus at first, so an Enter pressed out of habit never confirms a deletion.
    """

    DEFAULT_CSS = """
    ConfirmScreen .buttons {
        height: auto;
        align-horizontal: right;
    }
    ConfirmScreen Button {
        margin: 0 0 0 2;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "Cancel", show=False),
    ]

    def __init__(self, question: str, *, title: str = "Confirm", yes: str = "Yes", no: str = "No") -> None:
        super().__init__()
        self.question = question
        self.title_text = title
        self.yes_label = yes
        self.no_label = no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small") as dialog:
            dialog.border_title = self.title_text
            yield Static(self.question, classes="message", markup=False)
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes_label} (y)", id="yes", variant="error")
                yield Button(f"{self.no_label} (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")


class TextPromptScreen(Dialog[str | None]):
    """One line of text (a new title...): Enter dismisses with the text as typed, Esc with None."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", show=False),
    ]

    def __init__(
        self,
        title: str,
        value: str = "",
        *,
        placeholder: str = "",
        hint: str = "Enter saves · Esc cancels",
    ) -> None:
        super().__init__()
        self.title_text = title
        self.value = value
        self.placeholder = placeholder
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small") as dialog:
            dialog.border_title = self.title_text
            yield Input(self.value, placeholder=self.placeholder, id="text")
            yield Static(self.hint, classes="hint", markup=False)

    def on_mount(self) -> None:
        self.query_one("#text", Input).focus()

    @on(Input.Submitted, "#text")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
