"""The saved conversations: search, open, rename, delete; unreadable files listed and left alone.

The screen works on the store directly (rename and delete happen here, each after a small modal)
and dismisses with the id of the conversation to open, or None. It posts `Renamed` and `Deleted`
messages, which bubble to the App, so the app can follow a rename of the conversation it has open
(its in-memory title would otherwise be saved over the new one).

Search runs on an in-memory index of the messages (the store's, read in a thread when the screen opens),
so each key filters at once; titles match from the first key, messages as soon as the index is in.
(Conversation files reach a megabyte each, mostly per-token top-k: on 40 such files, 30 MB, reading
the folder again took 4.6 s per key on the UI thread; filtering the index takes 0.7 ms.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, Static
from textual.worker import Worker, WorkerState

from llmchat.chat.conversation import parse_iso
from llmchat.chat.store import ConversationStore, StoreError, Summary, Unreadable
from llmchat.tui.screens.confirm import ConfirmScreen, Dialog, TextPromptScreen
from llmchat.tui.widgets.format import printable

CURRENT_MARK = "● "
EMPTY_STORE = "No saved conversations yet."
HINT = "Enter open · Ctrl+R/F2 rename · Del/Ctrl+D delete · type to search · Esc close"
MIN_TITLE = 12  # columns the title keeps before the model column gives up its own


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


def matches(summaries: Iterable[Summary], text: str, index: dict[str, str] | None) -> list[Summary]:
    """The summaries whose title, or (with an index) any message, contains `text`, ignoring case:
    the same rule as `ConversationStore.search`, on text already in memory."""
    needle = text.strip().casefold()
    if not needle:
        return list(summaries)
    return [s for s in summaries if needle in s.title.casefold() or needle in (index or {}).get(s.id, "")]


def column_widths(available: int, models: list[str], turns: list[int], padding: int = 1) -> dict[str, int]:
    """Content widths of the four columns for a table `available` cells wide.

    Updated and Turns always get their full width and the model its longest name; the title takes
    what is left. On a narrow table the model column shrinks (its names then end in "…") before the
    title drops below MIN_TITLE; below that the table scrolls sideways rather than clip a date.
    """
    widths = {
        "updated": cell_len("2026-12-31 23:59"),
        "turns": max([cell_len("Turns"), *(len(str(n)) for n in turns)]),
        "model": max([cell_len("Model"), *(cell_len(m) for m in models)]),
    }
    gaps = 2 * padding * 4
    title = available - gaps - sum(widths.values())
    if title < MIN_TITLE:
        widths["model"] = max(cell_len("Model"), widths["model"] - (MIN_TITLE - title))
        title = max(MIN_TITLE, available - gaps - sum(widths.values()))
    return {"title": title, **widths}


class ConversationTable(DataTable[Text]):
    """The list: columns sized to the table's width, and typing (or a paste) goes to the search box.

    The keys are handled here, on the widget they were delivered to, not where they bubble: a
    terminal hands over a word typed fast in one read, every key of it is forwarded to the table
    before the focus moves to the search box, and a check of "is the table focused" further up
    dropped all but the first letter.
    """

    DEFAULT_CSS = """
    ConversationTable {
        width: 100%;
    }
    """

    def __init__(self, search: Input, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.search = search
        self.summaries: list[Summary] = []
        self.current_id: str | None = None
        self._laid_out_for = -1  # the content width the columns were sized for

    def show(self, summaries: list[Summary], current_id: str | None, cursor: int | None) -> None:
        """Replace the rows; the cursor goes to row `cursor` (kept in range) when given."""
        self.summaries, self.current_id = summaries, current_id
        self._rebuild(cursor)

    def _rebuild(self, cursor: int | None) -> None:
        width = self.scrollable_content_region.width
        self._laid_out_for = width
        self.clear(columns=True)
        models, turns = [printable(s.model) for s in self.summaries], [s.turns for s in self.summaries]
        # Not laid out yet (width 0): size to the content until the first resize.
        sizes = column_widths(width, models, turns, self.cell_padding) if width > 0 else {}
        self.add_column("Title", key="title", width=sizes.get("title"))
        self.add_column("Model", key="model", width=sizes.get("model"))
        self.add_column("Updated", key="updated", width=sizes.get("updated"))
        self.add_column(Text("Turns", justify="right"), key="turns", width=sizes.get("turns"))
        for summary in self.summaries:
            current = summary.id == self.current_id
            mark = CURRENT_MARK if current else "  "
            self.add_row(
                Text(mark + printable(summary.title), style="bold" if current else "", overflow="ellipsis"),
                Text(printable(summary.model), overflow="ellipsis"),
                Text(local_time(summary.updated)),
                Text(str(summary.turns), justify="right"),
                key=summary.id,
            )
        if cursor is not None and self.summaries:
            self.move_cursor(row=min(max(cursor, 0), len(self.summaries) - 1))
        self.call_after_refresh(self._fit)  # once laid out: a vertical scrollbar may have taken room

    def _fit(self) -> None:
        """Size the columns again if the room for them changed (a resize, a scrollbar came or went)."""
        if self.is_attached and self.scrollable_content_region.width != self._laid_out_for:
            self._rebuild(self.cursor_row)

    def on_resize(self) -> None:
        self._fit()

    def _type(self, text: str) -> None:
        self.screen.set_focus(self.search)  # at once, so the next key goes straight to the box
        self.search.insert_text_at_cursor(text)

    def on_key(self, event: events.Key) -> None:
        if event.is_printable and event.character:
            event.stop()
            event.prevent_default()
            self._type(event.character)

    def on_paste(self, event: events.Paste) -> None:
        event.stop()
        lines = event.text.splitlines()
        if lines:  # one line, as the search box itself takes a paste
            self._type(lines[0])


class ConversationsScreen(Dialog[str | None]):
    """Lists a store's conversations, newest first; dismisses with the id to open, or None."""

    DEFAULT_CSS = """
    ConversationsScreen > Vertical.dialog {
        width: 96%;
        max-width: 110;  /* as wide as the other dialogs on a wide screen, nearly all of a narrow one */
    }
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
        self.index: dict[str, str] | None = None  # id → its messages, casefolded; None until read
        self._listed: list[Summary] = []  # every readable conversation, newest first

    # --- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        search = Input(placeholder="Search titles and messages…", id="search", select_on_focus=False)
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = "Conversations"
            yield search
            yield ConversationTable(search, id="table")
            yield Static(id="empty", markup=False)
            with VerticalScroll(id="unreadable-box"):
                yield Static(id="unreadable", classes="error-text", markup=False)
            yield Static(HINT, classes="hint", markup=False)

    def on_mount(self) -> None:
        self.reload(keep=self.current_id)
        self._read_index()
        if self.summaries:
            self.query_one(ConversationTable).focus()
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
        self._listed = listing.conversations
        self.unreadable = listing.unreadable
        self.query_one("#unreadable", Static).update(unreadable_text(listing.unreadable))
        self.query_one("#unreadable-box").display = bool(listing.unreadable)
        self._show(keep, row)

    @work(thread=True, exclusive=True, group="conversations-index")
    def _read_index(self) -> dict[str, str]:
        """Every readable conversation's title and messages, casefolded (a thread: a file the store
        has not read yet, or that changed since, is read now)."""
        try:
            return self.store.search_texts()
        except OSError:
            return {}  # the folder went away: the listing says so

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group == "conversations-index" and event.state is WorkerState.SUCCESS:
            self.index = event.worker.result
            if self.query_one("#search", Input).value.strip():
                self._show(keep=self.selected_id)

    def _show(self, keep: str | None = None, row: int | None = None) -> None:
        text = self.query_one("#search", Input).value.strip()
        self.summaries = matches(self._listed, text, self.index)
        ids = [s.id for s in self.summaries]
        cursor = ids.index(keep) if keep in ids else row
        table = self.query_one(ConversationTable)
        table.show(self.summaries, self.current_id, cursor)
        empty = self.query_one("#empty", Static)
        if not self._listed:
            empty.update(EMPTY_STORE)
        elif not self.summaries:
            empty.update(f"No conversation matches “{text}”.")
        table.display = bool(self.summaries)
        empty.display = not self.summaries

    @property
    def selected(self) -> Summary | None:
        """The highlighted conversation, if the list shows any."""
        table = self.query_one(ConversationTable)
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
        self._show(keep=self.selected_id)

    @on(Input.Submitted, "#search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_open()

    @on(DataTable.RowSelected, "#table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

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
