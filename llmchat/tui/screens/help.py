"""The keys, and what the side panels show."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from llmchat.tui.screens.confirm import Dialog

PANELS_HELP = (
    "The panels on the right follow the model as it works. KV cache: the tokens the model keeps "
    "between turns; a new message prefills only what is not cached yet. Memory: weights, KV cache "
    "and overhead, estimated and measured. Top-k: the candidates for the last token with their "
    "probabilities, the chosen one marked. The panels hide themselves when the terminal is narrow. "
    "The token cursor (F8/F9, Alt+T) shows an answer as a probability heatmap; Ctrl+B branches at the "
    "token under it; Alt+P/Alt+V/Alt+L open the inspector (policy of a step, the prompt as the model "
    "sees it, the prefill/decode timeline)."
)


def binding_rows(app: App[Any], *, include_hidden: bool = False) -> list[tuple[str, str]]:
    """(key, description) rows for the help screen from the bindings active now.

    Call it before pushing the help screen: while a modal is open, `active_bindings` are the modal's.
    System bindings and bindings without a description are skipped, and so are those hidden from
    the footer unless `include_hidden` (a focused text area hides dozens of editing keys). Keys
    sharing a description and action are joined on one row ("^r / F2").
    """
    rows: dict[tuple[str, str], list[str]] = {}
    for active in app.active_bindings.values():
        binding: Binding = active.binding
        if binding.system or not binding.description or not (binding.show or include_hidden):
            continue
        keys = rows.setdefault((binding.description, binding.action), [])
        display = app.get_key_display(binding)
        if display not in keys:
            keys.append(display)
    return [(" / ".join(keys), description) for (description, _action), keys in rows.items()]


class HelpScreen(Dialog[None]):
    """A two-column table of keys and a paragraph on the side panels; Esc, F1 or q closes it."""

    DEFAULT_CSS = """
    HelpScreen #keys {
        height: auto;
        max-height: 60vh;
        margin: 1 0 0 0;
    }
    HelpScreen #notes {
        height: auto;
        margin: 1 0 0 0;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,f1,q", "close", "Close"),
    ]

    def __init__(self, rows: Sequence[tuple[str, str]], *, title: str = "Keys", notes: str = PANELS_HELP) -> None:
        super().__init__()
        self.rows = list(rows)
        self.title_text = title
        self.notes = notes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = self.title_text
            yield DataTable(id="keys", cursor_type="none", zebra_stripes=True)
            if self.notes:
                yield Static(self.notes, id="notes", markup=False)
            yield Static("Esc, F1 or q closes", classes="hint", markup=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("Key", key="key")
        table.add_column("Action", key="action")
        for key, description in self.rows:
            table.add_row(Text(key, style="bold"), Text(description))
        table.focus()  # arrows scroll a long list

    def action_close(self) -> None:
        self.dismiss(None)
