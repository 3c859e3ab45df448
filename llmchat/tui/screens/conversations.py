"""The saved conversations: search, open, rename, delete; unreadable files listed and left alone.

The screen works on the store directly (rename and delete happen here, each after a small modal)
and dismisses with the id of the conversation to open, or None. It posts `Renamed` and `Deleted`
messages, which bubble to the App, so the app can follow a rename of the conversation it has open
(its in-memory title would otherwise be saved over the new one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, Static

from llmchat.chat.conversation import parse_iso
from llmchat.chat.store import ConversationStore, StoreError, Summary, Unreadable
from llmchat.tui.screens.confirm import ConfirmScreen, Dialog, TextPromptScreen
from llmchat.tui.widgets.format import printable

CURRENT_MARK = "● "
EMPTY_STORE = "No saved conversations yet."
HINT = "Enter open · Ctrl+R/F2 rename · Del/Ctrl+D delete · type to search · Esc close"


def local_time(iso: str) -> str:
    """A stored ISO timestamp as local "YYYY-MM-DD HH:MM" (the text itself if it does not parse)."""
    try:
        return parse_iso(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def unreadable_text(files: list[Unreadable]) -> Text:
    """The unreadable files, one per line with the reason, under a line that says they are kept."""
    if not files:
        return Text()
    count = len(files)
    head = (
        "1 file could not be read — it is left untouched:"
        if count == 1
        else f"{count} files could not be read — they are left untouched:"
    )
    lines = [head, *(f"  {printable(u.path.name)}: {printable(u.reason)}" for u in files)]
    return Text("\n".join(lines))


class ConversationsScreen(Dialog[str | None]):
    """Lists a store's conversations, newest first; dismisses with the id to open, or None."""

    DEFAULT_CSS = """
    ConversationsScreen #search {
        margin: 1 0 0 0;
    }
    ConversationsScreen #table {
        height: auto;
        max-height: 60vh;
        margin: 1 0 0 0;
    }
    ConversationsScreen #empty {
        color: $text-muted;
        height: auto;
        margin: 1 0 0 1;
    }
    ConversationsScreen #unreadable-box {
        height: auto;
        max-height: 8;
        margin: 1 0 0 0;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        # Priority, so they also act on the highlighted row while the search box has the focus.
        Binding("ctrl+r,f2", "rename", "Rename", priority=True),
        Binding("ctrl+d", "delete", "Delete", priority=True),
        Binding("delete", "delete", "Delete", show=False),  # in the search box Delete edits the text
        Binding("down", "focus_table", "To the list", show=False),
    ]

    @dataclass
    class Renamed(Message):
        """A conversation got a new title (already saved)."""

        conversation_id: str
        title: str

    @dataclass
    class Deleted(Message):
        """A conversation file was deleted."""

        conversation_id: str

    def __init__(self, store: ConversationStore, current_id: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.current_id = current_id
        self.summaries: list[Summary] = []  # the rows shown, in order
        self.unreadable: list[Unreadable] = []
        self._total = 0  # readable conversations in the store, whatever the search

    # --- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = "Conversations"
            yield Input(placeholder="Search titles and messages…", id="search", select_on_focus=False)
            yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
            yield Static(id="empty", markup=False)
            with VerticalScroll(id="unreadable-box"):
                yield Static(id="unreadable", classes="error-text", markup=False)
            yield Static(HINT, classes="hint", markup=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("Title", key="title")
        table.add_column("Model", key="model")
        table.add_column("Updated", key="updated")
        table.add_column("Turns", key="turns")
        self.reload(keep=self.current_id)
        if self.summaries:
            table.focus()
        else:
            self.query_one("#search", Input).focus()

    # --- contents ------------------------------------------------------------------------------

    def reload(self, keep: str | None = None, row: int | None = None) -> None:
        """Read the folder again (after a rename or delete); the cursor stays on `keep` if shown,
        else on row number `row` (or the last row)."""
        try:
            listing = self.store.list()
        except OSError as err:
            self.notify(f"cannot read {self.store.directory}: {err.strerror or err}", severity="error", markup=False)
            return
        self._total = len(listing.conversations)
        self.unreadable = listing.unreadable
        self.query_one("#unreadable", Static).update(unreadable_text(listing.unreadable))
        self.query_one("#unreadable-box").display = bool(listing.unreadable)
        text = self.query_one("#search", Input).value.strip()
        self._show(self.store.search(text) if text else listing.conversations, keep, row)

    def _refilter(self) -> None:
        text = self.query_one("#search", Input).value.strip()
        try:
            rows = self.store.search(text) if text else self.store.list().conversations
        except OSError as err:
            self.notify(f"cannot read {self.store.directory}: {err.strerror or err}", severity="error", markup=False)
            return
        self._show(rows, keep=self.selected_id)

    def _show(self, summaries: list[Summary], keep: str | None = None, row: int | None = None) -> None:
        self.summaries = summaries
        table = self.query_one(DataTable)
        table.clear()
        for summary in summaries:
            mark = CURRENT_MARK if summary.id == self.current_id else "  "
            table.add_row(
                Text(mark + printable(summary.title), style="bold" if summary.id == self.current_id else ""),
                Text(printable(summary.model)),
                Text(local_time(summary.updated)),
                Text(str(summary.turns), justify="right"),
                key=summary.id,
            )
        ids = [s.id for s in summaries]
        if keep in ids:
            table.move_cursor(row=ids.index(keep))
        elif row is not None and summaries:
            table.move_cursor(row=min(row, len(summaries) - 1))
        empty = self.query_one("#empty", Static)
        if self._total == 0:
            empty.update(EMPTY_STORE)
        elif not summaries:
            empty.update(f"No conversation matches “{self.query_one('#search', Input).value.strip()}”.")
        table.display = bool(summaries)
        empty.display = not summaries

    @property
    def selected(self) -> Summary | None:
        """The highlighted conversation, if the list shows any."""
        table = self.query_one(DataTable)
        if not self.summaries or not 0 <= table.cursor_row < len(self.summaries):
            return None
        return self.summaries[table.cursor_row]

    @property
    def selected_id(self) -> str | None:
        selected = self.selected
        return selected.id if selected is not None else None

    # --- events --------------------------------------------------------------------------------

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._refilter()

    @on(Input.Submitted, "#search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_open()

    @on(DataTable.RowSelected, "#table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def on_key(self, event: events.Key) -> None:
        """Typing in the list goes to the search box."""
        table = self.query_one(DataTable)
        if self.focused is table and event.is_printable and event.character:
            event.stop()
            event.prevent_default()
            search = self.query_one("#search", Input)
            search.focus()
            search.insert_text_at_cursor(event.character)

    # --- actions -------------------------------------------------------------------------------

    def action_open(self) -> None:
        selected = self.selected
        if selected is not None:
            self.dismiss(selected.id)

    def action_close(self) -> None:
        self.dismiss(None)

    def action_focus_table(self) -> None:
        table = self.query_one(DataTable)
        if self.summaries and self.focused is not table:
            table.focus()

    def action_rename(self) -> None:
        selected = self.selected
        if selected is None:
            self.notify("No conversation is selected.", severity="warning")
            return

        def rename(title: str | None) -> None:
            if title is None:
                return
            try:
                conversation = self.store.rename(selected.id, title)
            except StoreError as err:
                self.notify(str(err), severity="error", markup=False)
                return
            self.post_message(self.Renamed(conversation.id, conversation.title))
            self.reload(keep=selected.id)

        prompt = TextPromptScreen("Rename conversation", selected.title, placeholder="New title")
        self.app.push_screen(prompt, rename)

    def action_delete(self) -> None:
        selected = self.selected
        if selected is None:
            self.notify("No conversation is selected.", severity="warning")
            return
        if selected.id == self.current_id:
            self.notify(
                "This conversation is open — start a new chat before deleting it.",
                title="Not deleted",
                severity="warning",
            )
            return
        try:
            conversation = self.store.deletable(selected.id)
        except StoreError as err:
            self.notify(str(err), severity="error", markup=False)
            self.reload()
            return
        row = self.query_one(DataTable).cursor_row

        def delete(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.store.delete(conversation.id)
            except StoreError as err:
                self.notify(str(err), severity="error", markup=False)
                return
            self.post_message(self.Deleted(conversation.id))
            self.reload(row=row)

        question = f"Delete “{printable(conversation.title)}”? This cannot be undone."
        self.app.push_screen(ConfirmScreen(question, title="Delete conversation"), delete)
