"""Choose a model: the registered ones (`llmchat models list`, models on a server among them), or any
path typed in."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Input, Static

from llmchat.models import ModelEntry, remote_model
from llmchat.session import ServerSpec
from llmchat.tui.screens.confirm import Dialog
from llmchat.tui.widgets.format import human_bytes

CURRENT_MARK = "● "
NO_MODELS = "No models registered — `llmchat models add PATH` adds one."
HINT = "Enter load · Tab to the path box · Esc close   (● loaded, * default)"


def _same_path(a: Path | str, b: Path | str | None) -> bool:
    if b is None:
        return False
    if isinstance(a, str) or isinstance(b, str):  # a server's URL
        return a == b
    try:
        return a.expanduser().resolve() == b.expanduser().resolve()
    except OSError:
        return a == b


class ModelsScreen(Dialog[Path | ServerSpec | None]):
    """The registered models in a table; dismisses with the chosen model's path (a server's model:
    its ServerSpec), or None."""

    DEFAULT_CSS = """
    ModelsScreen #table {
        height: auto;
        max-height: 50vh;
        margin: 1 0 0 0;
    }
    ModelsScreen #empty {
        color: $text-muted;
        height: auto;
        margin: 1 0 0 1;
    }
    ModelsScreen #problems {
        margin: 1 0 0 0;
    }
    ModelsScreen #path {
        margin: 1 0 0 0;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
    ]

    def __init__(self, entries: Sequence[ModelEntry], current: Path | str | None = None) -> None:
        super().__init__()
        self.entries = list(entries)
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = "Models"
            yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
            yield Static(NO_MODELS, id="empty", markup=False)
            yield Static(id="problems", classes="error-text", markup=False)
            yield Input(placeholder="…or a path to a model folder / .gguf", id="path")
            yield Static(HINT, classes="hint", markup=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label in ("Name", "Format", "Arch", "Quant", "Size", "Path"):
            table.add_column(label, key=label.lower())
        current_row = 0
        for index, entry in enumerate(self.entries):
            is_current = _same_path(entry.path, self.current)
            current_row = index if is_current else current_row
            name = (CURRENT_MARK if is_current else "  ") + entry.name + (" *" if entry.default else "")
            table.add_row(
                Text(name, style="bold" if is_current else ("strike" if entry.problem else "")),
                Text(entry.format),
                Text(entry.architecture or "?"),
                Text(entry.quantization or "?"),
                Text(human_bytes(entry.size_bytes) if entry.size_bytes is not None else "?", justify="right"),
                Text(str(entry.path)),
                key=entry.name,
            )
        problems = [f"{e.name}: {e.problem}" for e in self.entries if e.problem]
        self.query_one("#problems", Static).update("\n".join(problems))
        self.query_one("#problems").display = bool(problems)
        self.query_one("#empty").display = not self.entries
        table.display = bool(self.entries)
        if self.entries:
            table.move_cursor(row=current_row)
            table.focus()
        else:
            self.query_one("#path", Input).focus()

    @on(DataTable.RowSelected, "#table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        entry = self.entries[event.cursor_row]
        if entry.problem:
            self.notify(
                f"{entry.name}: {entry.problem}", title="Cannot load this model", severity="error", markup=False
            )
            return
        if isinstance(entry.path, str):  # a model on a server: its URL, model name and key's variable
            server = remote_model(entry.name)
            if server is None:  # listed, then unregistered meanwhile: what the row says
                self.dismiss(ServerSpec(url=entry.path, model=entry.architecture))
            else:
                self.dismiss(ServerSpec(url=server.url, model=server.model, api_key_env=server.api_key_env))
            return
        self.dismiss(entry.path)

    @on(Input.Submitted, "#path")
    def _path_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if not text:
            return
        path = Path(text).expanduser()
        if not path.exists():
            self.notify(f"no such file or folder: {path}", severity="error", markup=False)
            return
        self.dismiss(path)

    def action_close(self) -> None:
        self.dismiss(None)
