"""The modal screens (conversations, help, models, system prompt) driven with Textual's Pilot.

Each screen is pushed by a bare App that records what the screen was dismissed with. The
conversation screens work on a real ConversationStore in tmp_path, with real conversations and
two files the store cannot read (corrupt, and written by a newer llmchat).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest
from textual import events
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Input, Static, TextArea

from llmchat.chat.conversation import Conversation
from llmchat.chat.store import ConversationStore
from llmchat.models import ModelEntry
from llmchat.tui.screens import (
    ConfirmScreen,
    ConversationsScreen,
    HelpScreen,
    ModelsScreen,
    SystemPromptScreen,
    TextPromptScreen,
    binding_rows,
)
from llmchat.tui.screens.conversations import ConversationTable, column_widths

SIZE = (110, 30)


DialogT = TypeVar("DialogT", bound="Screen[Any]")


class Host(App[None], Generic[DialogT]):
    """Pushes one screen on mount and records what it is dismissed with."""

    def __init__(self, dialog: DialogT) -> None:
        super().__init__()
        self.dialog = dialog
        self.results: list[Any] = []
        self.messages: list[Message] = []

    def on_mount(self) -> None:
        self.push_screen(self.dialog, self.results.append)

    def on_conversations_screen_renamed(self, message: ConversationsScreen.Renamed) -> None:
        self.messages.append(message)

    def on_conversations_screen_deleted(self, message: ConversationsScreen.Deleted) -> None:
        self.messages.append(message)


def _conversation(conversation_id: str, title: str, turns: int, updated: str, topic: str = "") -> Conversation:
    conversation = Conversation(id=conversation_id, model={"name": "tiny-llama", "path": "/models/tiny"})
    for turn in range(turns):
        conversation.add_user(f"{title} question {turn} {topic}")
        answer = conversation.add_assistant()
        conversation.append(answer.id, f"answer {turn}")
    conversation.title = title
    # add_user/append stamp the current time; store.save writes the fields as they are.
    conversation.created = "2025-01-10T08:00:00.000+00:00"
    conversation.updated = updated
    return conversation


# Newest first: bravo, alpha, charlie.
CONVERSATIONS = [
    ("alpha", "Rust lifetimes explained", 2, "2025-03-02T10:15:00.000+00:00", ""),
    ("bravo", "Pasta recipe", 1, "2025-03-05T18:40:00.000+00:00", ""),
    ("charlie", "Travel plans", 3, "2025-02-20T07:05:00.000+00:00", "the tram 28 in Lisbon"),
]
NEWEST_FIRST = ["bravo", "alpha", "charlie"]
CORRUPT = "{not json"
NEWER = json.dumps({"format": "llmchat.conversation", "version": 99, "id": "future", "title": "From the future"})


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC, so the Updated column (local time) is the same on every machine."""
    if not hasattr(time, "tzset"):
        pytest.skip("needs time.tzset (POSIX) to fix the local time zone")
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def store(tmp_path: Path) -> ConversationStore:
    store = ConversationStore(tmp_path / "conversations")
    for conversation_id, title, turns, updated, topic in CONVERSATIONS:
        store.save(_conversation(conversation_id, title, turns, updated, topic))
    (store.directory / "broken.json").write_text(CORRUPT, encoding="utf-8")
    (store.directory / "future.json").write_text(NEWER, encoding="utf-8")
    return store


def _on_top(app: App[Any], screen: Screen[Any]) -> bool:
    """Whether `screen` is the active screen (a function, so mypy does not narrow `screen` by it)."""
    return app.screen is screen


def _rows(screen: Screen[Any]) -> list[list[str]]:
    table = screen.query_one(DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def _titles(screen: Screen[Any]) -> list[str]:
    return [row[0].strip("● ") for row in _rows(screen)]


def _record_notes(screen: Screen[Any], monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    notes: list[tuple[str, dict[str, Any]]] = []

    def notify(message: str, **options: Any) -> None:
        notes.append((message, options))

    monkeypatch.setattr(screen, "notify", notify)
    return notes


# --- conversations ------------------------------------------------------------------------------


async def test_lists_conversations_newest_first_and_unreadable_files_untouched(
    store: ConversationStore, utc: None
) -> None:
    before = {name: (store.directory / name).read_bytes() for name in ("broken.json", "future.json")}
    app = Host(ConversationsScreen(store, current_id="alpha"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.dialog
        assert isinstance(app.screen, ConversationsScreen)
        rows = _rows(screen)
        assert _titles(screen) == ["Pasta recipe", "Rust lifetimes explained", "Travel plans"]
        assert [row[1] for row in rows] == ["tiny-llama"] * 3
        assert [row[2] for row in rows] == ["2025-03-05 18:40", "2025-03-02 10:15", "2025-02-20 07:05"]
        assert [row[3] for row in rows] == ["1", "2", "3"]
        assert rows[1][0].startswith("●") and not rows[0][0].startswith("●")  # the open one is marked
        assert screen.query_one(DataTable).cursor_row == 1  # and highlighted
        unreadable = str(screen.query_one("#unreadable", Static).render())
        assert "2 files could not be read — they are left untouched" in unreadable
        assert "broken.json: not valid JSON" in unreadable
        assert "future.json: written by a newer llmchat (version 99)" in unreadable
        # Walking the whole list and trying to delete every row never reaches the unreadable files.
        for _ in range(4):
            await pilot.press("down", "delete")
            if isinstance(app.screen, ConfirmScreen):
                await pilot.press("n")
        await pilot.press("escape")
    assert app.results == [None]
    assert {name: (store.directory / name).read_bytes() for name in before} == before


async def test_search_filters_titles_and_messages(store: ConversationStore) -> None:
    app = Host(ConversationsScreen(store))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.dialog
        assert screen.query_one(DataTable).has_focus
        await pilot.press(*"lisbon")  # typed in the list: goes to the search box; matches a message
        search = screen.query_one("#search", Input)
        assert search.has_focus and search.value == "lisbon"
        assert _titles(screen) == ["Travel plans"]
        search.value = "RECIPE"  # titles too, ignoring case
        await pilot.pause()
        assert _titles(screen) == ["Pasta recipe"]
        search.value = "nothing like this"
        await pilot.pause()
        assert screen.query_one(DataTable).row_count == 0
        assert "No conversation matches" in str(screen.query_one("#empty", Static).render())
        search.value = ""
        await pilot.pause()
        assert _titles(screen) == ["Pasta recipe", "Rust lifetimes explained", "Travel plans"]
        await pilot.press("down")  # from the search box back to the list
        assert screen.query_one(DataTable).has_focus


async def _indexed(pilot: Any, screen: ConversationsScreen) -> None:
    """Until the screen has read its search index (a thread worker) and taken it in."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    assert screen.index is not None


async def test_a_word_typed_in_one_terminal_read_reaches_the_search_box_whole(store: ConversationStore) -> None:
    """A terminal delivers a word typed fast in one read: every key is forwarded to the list before
    the focus can move, and each reaches the search box in order (the list used to keep the first)."""
    app = Host(ConversationsScreen(store))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.dialog
        table, search = screen.query_one(ConversationTable), screen.query_one("#search", Input)
        assert table.has_focus
        await pilot.press("L")  # the first key moves the focus to the search box
        assert search.has_focus and search.value == "L"
        # The rest of the burst: the app forwarded these to the list, focused when they were
        # dispatched, and the list handles them after the focus has moved.
        for character in "isb":
            table._forward_event(events.Key(character, character))  # as App.on_event forwards a key
        await pilot.pause()
        assert search.has_focus and search.value == "Lisb"
        for character in "on":  # and a burst through the app, as the driver posts it
            app.post_message(events.Key(character, character))
        await pilot.pause()
        await _indexed(pilot, app.dialog)
        assert search.value == "Lisbon"
        assert _titles(screen) == ["Travel plans"]  # a message matches


async def test_a_paste_goes_into_the_search_box(store: ConversationStore) -> None:
    app = Host(ConversationsScreen(store))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.dialog
        search = screen.query_one("#search", Input)
        assert screen.query_one(ConversationTable).has_focus
        app.post_message(events.Paste("Pasta\nsecond line"))  # a bracketed paste over the list
        await pilot.pause()
        assert search.has_focus and search.value == "Pasta"  # one line, as the box takes a paste
        assert _titles(screen) == ["Pasta recipe"]
        app.post_message(events.Paste(" recipe"))  # and into the box itself
        await pilot.pause()
        assert search.value == "Pasta recipe"
        assert _titles(screen) == ["Pasta recipe"]


async def test_search_reads_the_folder_once_not_per_key(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is read once when the screen opens (listing and search index alike); each key
    filters the index in memory."""
    import llmchat.chat.store as store_module

    reads: list[str] = []
    listings: list[int] = []
    real_read, real_list = store_module.read_conversation, store.list
    monkeypatch.setattr(store_module, "read_conversation", lambda path: reads.append(path.stem) or real_read(path))
    monkeypatch.setattr(store, "list", lambda: listings.append(1) or real_list())
    monkeypatch.setattr(store, "search", lambda text: pytest.fail("searched the folder again"))
    app = Host(ConversationsScreen(store))
    async with app.run_test(size=SIZE) as pilot:
        await _indexed(pilot, app.dialog)
        screen = app.dialog
        for text, titles in (("tram", ["Travel plans"]), ("answer 1", ["Rust lifetimes explained", "Travel plans"])):
            screen.query_one("#search", Input).value = ""
            await pilot.press(*("space" if ch == " " else ch for ch in text))
            assert _titles(screen) == titles
    assert sorted(reads) == sorted(path.stem for path in store.directory.glob("*.json")) and listings == [1]


async def test_the_index_is_read_in_a_thread_and_titles_match_before_it(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the index is in, the titles alone match; then the messages too, without another key."""
    import threading

    release = threading.Event()
    real_texts = store.search_texts

    def slow_texts() -> dict[str, str]:
        assert threading.current_thread() is not threading.main_thread()  # never on the UI thread
        release.wait(10)
        return real_texts()

    monkeypatch.setattr(store, "search_texts", slow_texts)
    app = Host(ConversationsScreen(store))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.dialog
        await pilot.press(*"travel")
        assert _titles(screen) == ["Travel plans"]
        screen.query_one("#search", Input).value = "tram"
        await pilot.pause()
        assert _titles(screen) == []  # only a message says "tram"
        release.set()
        await _indexed(pilot, app.dialog)
        await pilot.pause()
        assert _titles(screen) == ["Travel plans"]


LONG_TITLE = "Why did Paris become the capital of France?"
LONG_MODEL = "SmolLM2-135M-Instruct-Q8_0"


@pytest.mark.parametrize("width", [80, 160])
async def test_columns_fit_the_width_and_only_the_title_gives_way(store: ConversationStore, width: int) -> None:
    """Every column is on screen without scrolling sideways; date, turns and model are whole, and
    the title takes the room that is left."""
    conversation = _conversation("delta", LONG_TITLE, 12, "2025-03-06T09:30:00.000+00:00")
    conversation.model = {"name": LONG_MODEL, "path": "/models/smol"}
    store.save(conversation)
    app = Host(ConversationsScreen(store))
    async with app.run_test(size=(width, 30)) as pilot:
        await pilot.pause()
        table = app.dialog.query_one(ConversationTable)
        inner = table.scrollable_content_region.width
        columns = list(table.columns.values())
        assert [str(c.label) for c in columns] == ["Title", "Model", "Updated", "Turns"]
        assert sum(c.get_render_width(table) for c in columns) == inner  # the title fills the slack
        assert table.max_scroll_x == 0  # nothing hides to the right
        title, model, updated, turns = (c.width for c in columns)
        rows = _rows(app.dialog)
        assert model >= len(LONG_MODEL) and updated >= max(len(r[2]) for r in rows) and turns >= len("Turns")
        assert [r[3] for r in rows] == ["12", "1", "2", "3"]
        drawn = [strip.text for strip in table.render_lines(table.region.reset_offset)]
        assert LONG_MODEL in drawn[1] and "12" in drawn[1] and rows[0][2] in drawn[1]
        if width == 160:
            assert LONG_TITLE in drawn[1]
        else:
            assert title < len(LONG_TITLE) + 2 and "…" in drawn[1]


async def test_a_long_list_makes_room_for_its_scrollbar(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "many")
    for number in range(40):
        store.save(_conversation(f"c{number:02d}", f"Conversation {number}", 1, "2025-03-01T10:00:00.000+00:00"))
    app = Host(ConversationsScreen(store))
    async with app.run_test(size=(80, 30)) as pilot:
        await pilot.pause()
        table = app.dialog.query_one(ConversationTable)
        assert table.show_vertical_scrollbar and not table.show_horizontal_scrollbar
        assert sum(c.get_render_width(table) for c in table.columns.values()) == table.scrollable_content_region.width


def test_column_widths_shrink_the_model_before_the_title() -> None:
    roomy = column_widths(120, ["tiny", LONG_MODEL], [3, 120])
    assert roomy["model"] == len(LONG_MODEL) and roomy["turns"] == len("Turns") and roomy["updated"] == 16
    assert sum(roomy.values()) + 8 == 120
    tight = column_widths(60, [LONG_MODEL + "-and-more"], [7])
    assert tight["title"] == 12 and tight["updated"] == 16 and tight["turns"] == 5
    assert sum(tight.values()) + 8 == 60 and tight["model"] < len(LONG_MODEL + "-and-more")
    assert column_widths(30, ["m"], [1])["updated"] == 16  # too narrow: the date stays whole anyway


async def test_enter_returns_the_selected_id(store: ConversationStore) -> None:
    app = Host(ConversationsScreen(store))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("down", "enter")
    assert app.results == ["alpha"]


async def test_enter_in_the_search_box_opens_the_highlighted_match(store: ConversationStore) -> None:
    app = Host(ConversationsScreen(store))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press(*"tram", "enter")
    assert app.results == ["charlie"]


async def test_rename_saves_the_new_title(store: ConversationStore, monkeypatch: pytest.MonkeyPatch) -> None:
    app = Host(ConversationsScreen(store))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.dialog
        await pilot.press("down", "ctrl+r")
        assert isinstance(app.screen, TextPromptScreen)
        field = app.screen.query_one(Input)
        assert field.value == "Rust lifetimes explained"
        field.value = "Borrow checker notes"
        await pilot.press("enter")
        assert _on_top(app, screen)
        assert store.load("alpha").title == "Borrow checker notes"
        assert "Borrow checker notes" in _titles(screen)
        assert screen.selected_id == "alpha"  # the cursor stays on the renamed row
        assert app.messages == [ConversationsScreen.Renamed("alpha", "Borrow checker notes")]  # reaches the app
        # F2 works too, and Esc cancels.
        await pilot.press("f2")
        assert isinstance(app.screen, TextPromptScreen)
        await pilot.press("escape")
        assert _on_top(app, screen)
        assert store.load("alpha").title == "Borrow checker notes"
        # A StoreError (an empty title) is reported and the screen stays usable.
        notes = _record_notes(screen, monkeypatch)
        await pilot.press("f2")
        app.screen.query_one(Input).value = "   "
        await pilot.press("enter")
        assert _on_top(app, screen)
        assert notes and notes[0][1].get("severity") == "error" and "empty" in notes[0][0]
        assert store.load("alpha").title == "Borrow checker notes"
        await pilot.press("enter")
    assert app.results == ["alpha"]


async def test_delete_asks_first(store: ConversationStore) -> None:
    app = Host(ConversationsScreen(store))
    path = store.path_for("alpha")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.dialog
        await pilot.press("down", "delete")
        assert isinstance(app.screen, ConfirmScreen)
        assert "Delete “Rust lifetimes explained”? This cannot be undone." in str(
            app.screen.query_one(".message", Static).render()
        )
        await pilot.press("n")
        assert _on_top(app, screen) and path.exists()
        await pilot.press("ctrl+d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        assert _on_top(app, screen)
        assert not path.exists()
        assert _titles(screen) == ["Pasta recipe", "Travel plans"]
        assert screen.selected_id == "charlie"  # the row that moved up into its place
        assert app.messages == [ConversationsScreen.Deleted("alpha")]
    assert app.results == []


async def test_deleting_the_open_conversation_is_refused(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Host(ConversationsScreen(store, current_id="bravo"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.dialog
        notes = _record_notes(screen, monkeypatch)
        assert screen.selected_id == "bravo"
        await pilot.press("delete")
        assert _on_top(app, screen)  # no question asked
        assert notes and "open" in notes[0][0]
    assert store.path_for("bravo").exists()


async def test_an_empty_store(tmp_path: Path) -> None:
    app = Host(ConversationsScreen(ConversationStore(tmp_path / "none")))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.dialog
        assert str(screen.query_one("#empty", Static).render()) == "No saved conversations yet."
        assert not screen.query_one(DataTable).display
        assert not screen.query_one("#unreadable-box").display
        await pilot.press("enter", "delete", "ctrl+r")  # nothing to act on: nothing happens
        assert _on_top(app, screen)
        await pilot.press("escape")
    assert app.results == [None]


# --- confirm and text prompt --------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "expected"), [(("y",), True), (("n",), False), (("escape",), False)])
async def test_confirm_keys(keys: tuple[str, ...], expected: bool) -> None:
    app = Host(ConfirmScreen("Sure?"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press(*keys)
    assert app.results == [expected]


async def test_confirm_enter_presses_no_first() -> None:
    app = Host(ConfirmScreen("Sure?"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("enter")
    assert app.results == [False]


# --- help ---------------------------------------------------------------------------------------


class _BoundApp(App[None]):
    BINDINGS = [
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r,f2", "rename", "Rename"),
        Binding("f9", "secret", "Secret", show=False),
        Binding("f10", "nothing"),
    ]

    def action_new_chat(self) -> None: ...
    def action_rename(self) -> None: ...
    def action_secret(self) -> None: ...


async def test_binding_rows_from_the_active_bindings() -> None:
    app = _BoundApp()
    async with app.run_test(size=SIZE):
        rows = binding_rows(app)
        assert ("^n", "New chat") in rows
        assert ("^r / f2", "Rename") in rows
        assert not any(description in ("Secret", "") for _, description in rows)
        assert ("f9", "Secret") in binding_rows(app, include_hidden=True)


@pytest.mark.parametrize("key", ["escape", "f1", "q"])
async def test_help_lists_the_rows_and_closes(key: str) -> None:
    app = Host(HelpScreen([("^n", "New chat"), ("F3", "Temperature up")]))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert _rows(app.dialog) == [["^n", "New chat"], ["F3", "Temperature up"]]
        await pilot.press(key)
    assert app.results == [None]


# --- models -------------------------------------------------------------------------------------


def _entries(tmp_path: Path) -> list[ModelEntry]:
    tiny, gguf = tmp_path / "tiny-llama", tmp_path / "small.gguf"
    tiny.mkdir()
    gguf.write_bytes(b"GGUF")
    return [
        ModelEntry("tiny-llama", tiny, True, "safetensors", 3 * 1024**2, "llama", "none", "chat"),
        ModelEntry("small", gguf, False, "gguf", 90 * 1024**2, "qwen2", "Q4_1", "chat"),
        ModelEntry("gone", tmp_path / "gone", False, "safetensors", None, problem="missing: the path no longer exists"),
    ]


async def test_models_returns_the_chosen_path(tmp_path: Path) -> None:
    entries = _entries(tmp_path)
    app = Host(ModelsScreen(entries, current=entries[0].path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        rows = _rows(app.dialog)
        assert [row[0] for row in rows] == ["● tiny-llama *", "  small", "  gone"]
        assert rows[1][1:5] == ["gguf", "qwen2", "Q4_1", "90.0 MiB"]
        assert rows[1][5] == str(entries[1].path)
        assert "gone: missing" in str(app.dialog.query_one("#problems", Static).render())
        await pilot.press("down", "down", "enter")  # a model with a problem is refused
        assert _on_top(app, app.dialog) and app.results == []
        await pilot.press("up", "enter")
    assert app.results == [entries[1].path]


async def test_models_path_box_and_escape(tmp_path: Path) -> None:
    app = Host(ModelsScreen([], current=None))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        screen = app.dialog
        assert "No models registered" in str(screen.query_one("#empty", Static).render())
        field = screen.query_one("#path", Input)
        assert field.has_focus
        field.value = str(tmp_path / "missing.gguf")
        await pilot.press("enter")
        assert _on_top(app, screen) and app.results == []  # refused: no such file
        field.value = str(tmp_path)
        await pilot.press("enter")
    assert app.results == [tmp_path]

    other = tmp_path / "other"
    other.mkdir()
    app = Host(ModelsScreen(_entries(other)))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("escape")
    assert app.results == [None]


# --- system prompt ------------------------------------------------------------------------------


async def test_system_prompt_saves_on_ctrl_s() -> None:
    app = Host(SystemPromptScreen("You are terse."))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        area = app.dialog.query_one(TextArea)
        assert area.has_focus and area.text == "You are terse."
        await pilot.press(*" Answer in French.")
        await pilot.press("ctrl+s")
    assert app.results == ["You are terse. Answer in French."]


async def test_system_prompt_escape_cancels() -> None:
    app = Host(SystemPromptScreen("You are terse."))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("x", "escape")
    assert app.results == [None]


# --- snapshots ----------------------------------------------------------------------------------


def test_conversations_snapshot(store: ConversationStore, utc: None, snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(Host(ConversationsScreen(store, current_id="alpha")), terminal_size=SIZE)


def test_help_snapshot(snap_compare: Callable[..., bool]) -> None:
    rows = [("^n", "New chat"), ("F2 / F3", "Temperature down / up"), ("^t", "Panels"), ("^q", "Quit")]
    assert snap_compare(Host(HelpScreen(rows)), terminal_size=SIZE)
