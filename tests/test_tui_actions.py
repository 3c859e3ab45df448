"""The chat's actions driven with Textual's Pilot: regenerate, branches, edit, token inspection,
a resumed chat, settings, the conversations / system prompt / help screens, and Ctrl+C.

Everything runs on a tiny random llama through the real engine (no mocks); answers are capped at
a few tokens so each test stays quick and the token view fits on one line.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len
from textual.geometry import Region
from textual.pilot import Pilot
from textual.widget import Widget
from textual.widgets import DataTable, Static, TextArea

from llmchat.chat.conversation import Conversation, token_record
from llmchat.chat.store import ConversationStore
from llmchat.engine import SamplingParams
from llmchat.engine.events import TokenEvent, TopToken
from llmchat.settings import Settings, load_settings, settings_path
from llmchat.tui.app import LLMChatApp
from llmchat.tui.screens import ConversationsScreen, HelpScreen, SystemPromptScreen, TextPromptScreen
from llmchat.tui.widgets.format import printable
from llmchat.tui.widgets.messages import AssistantMessage, ChatView, UserMessage
from llmchat.tui.widgets.panels import TopKPanel
from llmchat.tui.widgets.prompt import PromptInput
from llmchat.tui.widgets.tokens import TokenView

GREEDY = SamplingParams(temperature=0)
SIZE = (140, 40)
CONTEXT = 512
MAX_NEW = 12  # tokens per answer: enough to inspect, short enough to keep the token view on one line
CHIPS_LINE = 3  # the token view's legend takes two lines and a blank one


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("tui-actions") / "llama")


# --- helpers -----------------------------------------------------------------------------------


def _store(tmp_path: Path) -> ConversationStore:
    return ConversationStore(tmp_path / "conversations")


def _app(folder: Path | None, tmp_path: Path, app_class: type[LLMChatApp] = LLMChatApp, **options: Any) -> LLMChatApp:
    """The app on the tiny model, greedy, short answers, saving into tmp_path/conversations."""
    options = {"sampling": GREEDY, "max_new_tokens": MAX_NEW, **options}
    return app_class(folder, store=_store(tmp_path), device="cpu", dtype="float32", context_length=CONTEXT, **options)


async def _until(pilot: Pilot[None], condition: Callable[[], object], what: str, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _loaded(pilot: Pilot[None], app: LLMChatApp) -> None:
    await _until(pilot, lambda: app.model is not None, "the model to load")


async def _answered(pilot: Pilot[None], app: LLMChatApp) -> AssistantMessage:
    """The newest answer, once it has finished (its stats line is drawn)."""
    await _until(pilot, lambda: not app.generating and app.query(AssistantMessage), "the answer")
    await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "the stats line")
    return app.query(AssistantMessage).last()


async def _send(pilot: Pilot[None], app: LLMChatApp, text: str) -> AssistantMessage:
    await _loaded(pilot, app)
    app.query_one(PromptInput).text = text
    await pilot.press("enter")
    return await _answered(pilot, app)


async def _regenerate(pilot: Pilot[None], app: LLMChatApp) -> AssistantMessage:
    """Ctrl+R, and the new answer once it has finished."""
    before = app.conversation.current
    await pilot.press("ctrl+r")
    await _until(pilot, lambda: app.conversation.current != before, "the new answer")
    return await _answered(pilot, app)


async def _type(pilot: Pilot[None], text: str) -> None:
    """Type `text` key by key (letters and spaces) into the focused widget."""
    await pilot.press(*("space" if ch == " " else ch for ch in text))


def _notes(app: LLMChatApp) -> list[str]:
    """The notifications still on screen, as "title: message"."""
    return [f"{n.title}: {n.message}" for n in app._notifications]


def _drawn(widget: Widget) -> list[str]:
    """The widget's lines as drawn (border and padding included)."""
    width, height = widget.outer_size
    return [strip.text for strip in widget.render_lines(Region(0, 0, width, height))]


def _shown(app: LLMChatApp) -> tuple[list[str], list[str | None]]:
    """The user texts and the answer ids the chat view draws now."""
    chat = app.query_one(ChatView)
    return [m.text for m in chat.query(UserMessage)], [a.message_id for a in chat.query(AssistantMessage)]


def _top_ids(event: TokenEvent | None) -> list[int]:
    assert event is not None
    return [t.token_id for t in event.top]


# --- regenerate, branches, edit ----------------------------------------------------------------


async def test_regenerate_adds_a_sibling_answer_from_the_cached_prompt(folder: Path, tmp_path: Path) -> None:
    """Ctrl+R answers the same prompt again beside the first answer: a 2/2 branch, prefilled from the
    cache (only the last prompt token goes through the model), and greedy gives the same text."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        first = await _send(pilot, app, "hello there")
        first_id = first.message_id
        second = await _regenerate(pilot, app)

        conversation = app.conversation
        assert second.message_id == conversation.current and second.message_id is not None
        assert first_id is not None
        assert conversation.get(second.message_id).parent == conversation.get(first_id).parent
        assert conversation.get(conversation.get(first_id).parent or "").role == "user"
        assert conversation.sibling_position(second.message_id) == (1, 2)
        # One answer on screen, the new one, marked as branch 2 of 2.
        answers = list(app.query(AssistantMessage))
        assert answers == [second]
        assert str(second.border_title).endswith("‹2/2›")
        # The prompt came from the KV cache.
        done = second.finished
        assert done is not None
        assert done.reused_tokens > 0 and done.prefilled_tokens <= 2
        assert done.reused_tokens + done.prefilled_tokens == done.prompt_tokens
        # Same prompt, same greedy policy: the same answer, saved as such.
        assert second.content_text == conversation.get(first_id).content
        assert conversation.get(second.message_id).content == second.content_text
        saved = json.loads(_store(tmp_path).path_for(conversation.id).read_text(encoding="utf-8"))
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "assistant"]


async def test_branch_keys_switch_between_answers_and_wrap_around(folder: Path, tmp_path: Path) -> None:
    """Alt+Left / Alt+Right show the previous / next regenerated answer, wrapping at both ends."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _send(pilot, app, "hello there")
        await _regenerate(pilot, app)
        await _regenerate(pilot, app)  # three answers to the same prompt
        user = app.conversation.path()[0]
        a1, a2, a3 = (m.id for m in app.conversation.children(user.id))
        assert app.conversation.current == a3

        async def press(key: str, expected: str, position: str) -> None:
            await pilot.press(key)
            await _until(pilot, lambda: _shown(app)[1] == [expected], f"{key} to show {expected}")
            assert app.conversation.current == expected
            assert str(app.query_one(AssistantMessage).border_title).endswith(position)

        await press("alt+right", a1, "‹1/3›")  # past the last: wraps to the first
        await press("alt+left", a3, "‹3/3›")  # before the first: wraps to the last
        await press("alt+left", a2, "‹2/3›")
        await press("alt+right", a3, "‹3/3›")
        # The choice is saved with the conversation.
        saved = json.loads(_store(tmp_path).path_for(app.conversation.id).read_text(encoding="utf-8"))
        assert saved["current"] == a3


async def test_edit_resends_the_prompt_as_a_sibling_and_escape_cancels(folder: Path, tmp_path: Path) -> None:
    """Ctrl+E puts the last prompt back; Enter sends the edited text as a new user branch (the old
    branch stays in the tree); Esc while editing clears the input and the next Enter is a normal turn."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _send(pilot, app, "hello there")
        old_user, old_answer = app.conversation.path()
        prompt = app.query_one(PromptInput)

        await pilot.press("ctrl+e")
        assert prompt.text == "hello there" and prompt.has_focus
        prompt.text = ""
        await _type(pilot, "hello again")
        await pilot.press("enter")
        answer = await _answered(pilot, app)

        new_user, new_answer = app.conversation.path()
        assert new_user.content == "hello again" and new_user.id != old_user.id
        assert new_user.parent == old_user.parent
        assert app.conversation.sibling_position(new_user.id) == (1, 2)
        assert new_answer.parent == new_user.id and answer.message_id == new_answer.id
        assert new_answer.content == answer.content_text and answer.tokens
        assert {old_user.id, old_answer.id} <= {m.id for m in app.conversation.messages}
        assert _shown(app) == (["hello again"], [new_answer.id])
        assert str(app.query_one(UserMessage).border_title).endswith("‹2/2›")

        # Esc cancels an edit: the input is cleared and Enter adds an ordinary next turn.
        await pilot.press("ctrl+e")
        assert prompt.text == "hello again"
        await pilot.press("escape")
        assert prompt.text == ""
        await _type(pilot, "and then")
        await pilot.press("enter")
        await _answered(pilot, app)
        third_user = app.conversation.path()[2]
        assert third_user.content == "and then" and third_user.parent == new_answer.id
        assert app.conversation.sibling_position(third_user.id) == (0, 1)
        assert len(app.conversation.children(new_user.parent)) == 2  # no third sibling


# --- tokens ------------------------------------------------------------------------------------


def _token_view(answer: AssistantMessage) -> TokenView:
    views = list(answer.query(TokenView))
    assert len(views) == 1, views
    return views[0]


async def test_top_k_panel_shows_the_last_token_when_the_end_comes_in_a_batch_of_its_own(
    folder: Path, tmp_path: Path
) -> None:
    """The end of an answer may reach the UI alone, after its last token's batch, while the live
    panel update that was due is dropped as stale: the panel must still end on the last token
    (a CI run on a fast machine showed "no token yet" beside a finished answer)."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        # Every event its own batch (so the end comes alone); live panel updates at most once a minute.
        app.frames.fastest, app.frames.panel_fastest, app.frames.panel_slowest = 0.0, 60.0, 60.0
        answer = await _send(pilot, app, "hello there")
        panel = app.query_one(TopKPanel)
        assert len(answer.tokens) >= 3
        await _until(pilot, lambda: panel.event is answer.tokens[-1], "the panel to show the last token")
        assert panel.border_subtitle == f"token {len(answer.tokens)}"


async def test_token_keys_and_clicks_put_any_token_in_the_top_k_panel(folder: Path, tmp_path: Path) -> None:
    """F8/F9 walk the token cursor through the last answer (its token view replaces the text),
    clicking a chip selects that token, Esc goes back to the text, and the stats line's
    `tokens ▸` link opens the view on the last token."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "hello there")
        tokens = answer.tokens
        n = len(tokens)
        assert n >= 3 and answer.finished is not None and answer.finished.generated_tokens == n
        panel = app.query_one(TopKPanel)
        assert not answer.query(TokenView)

        async def selected(index: int, how: str) -> None:
            await _until(pilot, lambda: panel.event is tokens[index], f"{how} to select token {index}")
            event = panel.event
            assert event is not None
            assert event.token_id == tokens[index].token_id and _top_ids(event) == _top_ids(tokens[index])
            assert panel.border_subtitle == f"token {index + 1}/{n}"
            assert _token_view(answer).selected == index

        await pilot.press("f8")
        await selected(n - 1, "F8")
        assert not answer.query_one(".content").display  # the heatmap stands in for the text
        await pilot.press("f8")
        await selected(n - 2, "F8 again")
        await pilot.press("f9")
        await selected(n - 1, "F9")
        await pilot.press("f9")  # stays on the last token
        await selected(n - 1, "F9 at the end")

        # A click on a chip selects its token: chip 0 starts the chips' first line.
        await pilot.click(TokenView, offset=(0, CHIPS_LINE))
        await selected(0, "a click on the first chip")
        third = sum(cell_len(printable(t.text) or "∅") for t in tokens[:2])  # an empty piece shows as ∅
        assert "\n" not in tokens[0].text + tokens[1].text
        await pilot.click(TokenView, offset=(third, CHIPS_LINE))
        await selected(2, "a click on the third chip")

        # Esc closes the view; the `tokens ▸` link on the stats line opens it again on the last token.
        await pilot.press("escape")
        await _until(pilot, lambda: not answer.query(TokenView), "the token view to close")
        assert answer.query_one(".content").display
        stats = answer.query_one(".stats", Static)
        line = _drawn(stats)[0]
        assert "tokens ▸" in line, line
        await pilot.click(stats, offset=(cell_len(line[: line.index("tokens ▸")]) + 2, 0))
        await selected(n - 1, "the tokens link")


async def test_a_new_chat_has_no_token_to_inspect(folder: Path, tmp_path: Path) -> None:
    """After Ctrl+N the token keys do not reach back into the previous chat's (removed) answer."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _send(pilot, app, "hello there")
        await pilot.press("f8")
        panel = app.query_one(TopKPanel)
        await _until(pilot, lambda: app.query(TokenView), "the token view")
        await pilot.press("ctrl+n")
        await _until(pilot, lambda: not app.query(AssistantMessage), "the empty chat")
        assert panel.event is None
        await pilot.press("f8")
        await pilot.press("f9")
        await _until(pilot, lambda: any("No answer with tokens" in note for note in _notes(app)), "the hint")
        assert panel.event is None and not app.query(TokenView)


async def test_a_resumed_chat_shows_saved_tokens_and_tool_calls_without_a_model(tmp_path: Path) -> None:
    """A saved answer's token records come back in the top-k panel (no model loaded), and its tool
    call is drawn in its own JSON block."""
    events = [
        TokenEvent(
            token_id=100 + i,
            text=text,
            index=i,
            logit=3.0,
            prob=0.6,
            policy_prob=0.7,
            rank=0,
            top=(
                TopToken(100 + i, text, 3.0, 0.6, 0.7),
                TopToken(200 + i, f"alt{i}", 2.0, 0.3, 0.3),
                TopToken(300 + i, f"other{i}", 1.0, 0.1, 0.0),
            ),
            seconds=0.01,
            cache_tokens=10 + i,
            cache_bytes=1000,
        )
        for i, text in enumerate(["Let", " me", " check"])
    ]
    records = [token_record(e) for e in events]
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    conversation = Conversation(model={"name": "tiny"})
    conversation.add_user("weather in Paris?")
    conversation.add_assistant("Let me check", tool_calls=calls, tokens=records, stats={"tokens": 3})

    app = LLMChatApp(None, store=_store(tmp_path), conversation=conversation)
    async with app.run_test(size=SIZE) as pilot:
        answer = app.query_one(AssistantMessage)
        assert app.model is None
        assert [t.token_id for t in answer.tokens] == [r["id"] for r in records]

        await pilot.press("f8")
        panel = app.query_one(TopKPanel)
        await _until(pilot, lambda: panel.event is not None, "the saved token in the top-k panel")
        assert panel.event is not None and panel.event.token_id == records[-1]["id"]
        assert _top_ids(panel.event) == [entry[0] for entry in records[-1]["top"]]
        assert [t.text for t in panel.event.top] == [entry[1] for entry in records[-1]["top"]]
        await pilot.press("f8")
        before = records[1]["id"]
        await _until(pilot, lambda: panel.event is not None and panel.event.token_id == before, "the token before")
        assert _top_ids(panel.event) == [entry[0] for entry in records[1]["top"]]
        assert _token_view(answer).selected == 1

        block = answer.query_one(".tool-calls", Static)
        text = "\n".join(_drawn(block))
        assert "get_weather" in text and "Paris" in text
        assert block.border_title == "tool call"
        assert "get_weather" not in answer.content_text


# --- settings ----------------------------------------------------------------------------------


async def test_a_rebound_key_replaces_the_default(folder: Path, tmp_path: Path) -> None:
    """keys.temperature_up = "f12": F12 raises the temperature, F3 no longer does."""
    app = _app(
        folder, tmp_path, sampling=SamplingParams(temperature=0.5), settings=Settings(keys={"temperature_up": "f12"})
    )
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        assert app.sampling is not None and app.sampling.temperature == pytest.approx(0.5)
        await pilot.press("f3")
        assert app.sampling.temperature == pytest.approx(0.5)
        await pilot.press("f12")
        assert app.sampling.temperature == pytest.approx(0.6)
        await pilot.press("f2")  # the other keys keep their defaults
        assert app.sampling.temperature == pytest.approx(0.5)


async def test_the_theme_key_cycles_and_saves_the_theme(folder: Path, tmp_path: Path) -> None:
    """F10 switches to another theme and writes the choice to settings.toml."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        start = app.theme
        await pilot.press("f10")
        first = app.theme
        assert first != start
        assert load_settings()[0].theme == first
        await pilot.press("f10")
        assert app.theme not in (start, first)
        assert load_settings() == (Settings(theme=app.theme), [])
        assert any(f"Theme: {app.theme}" in note for note in _notes(app))


async def test_a_broken_settings_file_is_reported_and_left_alone(folder: Path, tmp_path: Path) -> None:
    """A settings.toml that does not parse: the app starts on the defaults, says which file is
    broken, still chats, and refuses to save a theme over the user's file."""
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not = [valid", encoding="utf-8")
    settings, problems = load_settings()
    assert settings == Settings() and len(problems) == 1 and "settings.toml" in problems[0]

    app = _app(folder, tmp_path, settings=settings, settings_problems=problems)
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: any("settings.toml" in note for note in _notes(app)), "the settings warning")
        answer = await _send(pilot, app, "hello there")
        assert answer.tokens and answer.content_text
        await pilot.press("f10")
        await _until(pilot, lambda: any("Settings not saved" in note for note in _notes(app)), "the refusal")
    assert path.read_text(encoding="utf-8") == "not = [valid"


async def test_settings_problems_are_shown_as_written(folder: Path, tmp_path: Path) -> None:
    """Problem lines quote the file ("[keys] stop = ..."): the start-up toast and the problems
    screen show them verbatim, and a value that looks like a closing markup tag does not crash the app."""
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('[keys]\nstop = "[/x]"\n\n[sampling]\ntemperature = -1\n', encoding="utf-8")
    settings, problems = load_settings()
    assert len(problems) == 2

    app = _app(folder, tmp_path, settings=settings, settings_problems=problems)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await _until(pilot, lambda: len(app.screen.query("Toast")) == 1, "the start-up toast")
        await pilot.pause()
        shown = str(app.screen.query_one("Toast").render())
        assert '[keys] stop = "[/x]"' in shown and "[sampling] temperature = -1" in shown, shown
        app.action_startup_problems()
        await pilot.pause()
        listed = str(app.screen.query_one("#problems", Static).render())
        assert all(problem in listed for problem in problems), listed
        await pilot.press("escape")
        answer = await _send(pilot, app, "hello there")
        assert answer.tokens and app.is_running


# --- screens -----------------------------------------------------------------------------------


def _prebuilt(title: str) -> Conversation:
    """A saved chat of one turn with its own sampling settings, older than anything a test sends."""
    sampling = {"temperature": 0.3, "top_k": 5, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.0}
    conversation = Conversation(title=title, sampling=sampling)
    conversation.add_user("what about the pasta?")
    answer = conversation.add_assistant()
    conversation.append(answer.id, "boil it")
    conversation.title = title
    conversation.updated = "2024-01-01T00:00:00.000+00:00"  # older than the chat the test sends
    return conversation


async def test_the_conversations_screen_opens_a_saved_chat(folder: Path, tmp_path: Path) -> None:
    """Ctrl+O lists the saved chats; while it is open the chat's keys step aside (F3 leaves the
    temperature, Ctrl+R renames instead of regenerating); Enter on a row opens that chat. A corrupt
    file in the folder is reported at startup and never touched."""
    store = _store(tmp_path)
    pasta = _prebuilt("Pasta recipe")
    store.save(pasta)
    corrupt = store.directory / "broken-chat.json"
    corrupt.write_bytes(b'{"format": "llmchat.conversation", "version": 1, \xff')

    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: any("broken-chat.json" in note for note in _notes(app)), "the warning")
        assert any(n.severity == "warning" and "broken-chat.json" in n.message for n in app._notifications)
        await _send(pilot, app, "hello there")
        chat_id = app.conversation.id
        answers = len(app.conversation.messages)

        await pilot.press("ctrl+o")
        await _until(pilot, lambda: isinstance(app.screen, ConversationsScreen), "the conversations screen")
        screen = app.screen
        assert isinstance(screen, ConversationsScreen)
        await _until(pilot, lambda: len(screen.summaries) == 2, "the list")
        assert [s.id for s in screen.summaries] == [chat_id, pasta.id]
        assert [u.path.name for u in screen.unreadable] == ["broken-chat.json"]

        temperature = app.sampling.temperature if app.sampling else None
        await pilot.press("f3")
        assert app.sampling is not None and app.sampling.temperature == temperature
        await pilot.press("ctrl+r")  # the screen's rename, not the chat's regenerate
        await _until(pilot, lambda: isinstance(app.screen, TextPromptScreen), "the rename prompt")
        await pilot.press("escape")
        await _until(pilot, lambda: app.screen is screen, "the rename prompt to close")
        assert len(app.conversation.messages) == answers and not app.generating

        await pilot.press("down")
        assert screen.selected_id == pasta.id
        await pilot.press("enter")
        await _until(pilot, lambda: app.conversation.id == pasta.id, "the saved chat to open")
        assert not isinstance(app.screen, ConversationsScreen)
        await _until(pilot, lambda: _shown(app)[0] == ["what about the pasta?"], "its messages")
        assert [a.content_text for a in app.query(AssistantMessage)] == ["boil it"]
        assert app.sampling is not None and app.sampling.temperature == pytest.approx(0.3)
    assert corrupt.read_bytes() == b'{"format": "llmchat.conversation", "version": 1, \xff'


async def test_the_system_prompt_goes_into_the_next_prompt_and_the_file(folder: Path, tmp_path: Path) -> None:
    """Ctrl+S edits the system prompt; it is saved with the chat and leads the next prompt, which
    therefore shares (almost) nothing with the cached one."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        first = await _send(pilot, app, "hello there")
        await pilot.press("ctrl+s")
        await _until(pilot, lambda: isinstance(app.screen, SystemPromptScreen), "the system prompt screen")
        assert app.screen.query_one(TextArea).has_focus
        await _type(pilot, "You are a pirate")
        await pilot.press("ctrl+s")
        await _until(pilot, lambda: not isinstance(app.screen, SystemPromptScreen), "the screen to close")

        assert app.conversation.system == "You are a pirate"
        saved = json.loads(_store(tmp_path).path_for(app.conversation.id).read_text(encoding="utf-8"))
        assert saved["system"] == "You are a pirate"
        assert app.model is not None
        rendered = app.model.template.render(app.conversation.chat_messages(), add_generation_prompt=True)
        assert "You are a pirate" in rendered

        second = await _send(pilot, app, "and again")
        assert first.finished is not None and second.finished is not None
        # Without the system prompt the whole first turn would come from the cache.
        assert second.finished.reused_tokens <= 2
        assert second.finished.prompt_tokens > first.finished.prompt_tokens + len(first.tokens)


async def test_help_lists_every_key_with_its_current_binding(folder: Path, tmp_path: Path) -> None:
    """F1 shows the keys (rebound ones as rebound); F1 closes it again."""
    app = _app(folder, tmp_path, settings=Settings(keys={"temperature_up": "f12"}))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        await _until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
        screen = app.screen
        assert isinstance(screen, HelpScreen)
        rows = {description: key for key, description in screen.rows}
        assert "f12" in rows["Temperature up"].lower() and "f3" not in rows["Temperature up"].lower()
        assert "f2" in rows["Temperature down"].lower()
        assert screen.rows == app.help_rows()
        table = screen.query_one(DataTable)
        assert table.row_count == len(screen.rows)
        await pilot.press("f1")
        await _until(pilot, lambda: not isinstance(app.screen, HelpScreen), "the help screen to close")


# --- Ctrl+C ------------------------------------------------------------------------------------


class _PausingApp(LLMChatApp):
    """Holds the worker at its `PAUSE_AT`-th read of the sampling policy (one read per token), so a
    key can be pressed mid-answer however fast the tiny model is."""

    PAUSE_AT = 4

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.paused, self.release = threading.Event(), threading.Event()
        self._worker_reads = 0
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def sampling(self) -> SamplingParams | None:
        if threading.current_thread() is not threading.main_thread():
            self._worker_reads += 1
            if self._worker_reads == self.PAUSE_AT:
                self.paused.set()
                self.release.wait(30)
        return self._sampling

    @sampling.setter
    def sampling(self, value: SamplingParams | None) -> None:
        self._sampling = value


async def _paused_mid_answer(pilot: Pilot[None], app: LLMChatApp) -> None:
    """Send a prompt and wait until the worker holds the answer at `_PausingApp.PAUSE_AT`."""
    await _loaded(pilot, app)
    app.query_one(PromptInput).text = "hello there"
    await pilot.press("enter")
    await _until(pilot, app.paused.is_set, "the worker to reach the pause")


async def test_ctrl_c_during_an_answer_neither_quits_nor_stops_it(folder: Path, tmp_path: Path) -> None:
    """Ctrl+C is the reflex for "quit" but here it does neither quit nor stop: the answer runs on."""
    app = _app(folder, tmp_path, _PausingApp)
    assert isinstance(app, _PausingApp)
    async with app.run_test(size=SIZE) as pilot:
        await _paused_mid_answer(pilot, app)
        assert app.generating
        await pilot.press("ctrl+c")
        app.release.set()
        answer = await _answered(pilot, app)
        assert app.is_running and app.return_code is None
        assert answer.finished is not None and answer.finished.reason != "cancelled"
        assert answer.finished.generated_tokens == len(answer.tokens) > _PausingApp.PAUSE_AT


# --- the chat view: heatmap marks, line breaks, panels, status bar, live numbers ----------------


def _saved_answer(words: list[tuple[str, float]], forced: set[int] = frozenset()) -> Conversation:  # type: ignore[assignment]
    """A conversation whose answer has `words` as tokens (text, probability), some picked at a branch."""
    events = [
        TokenEvent(token_id=100 + i, text=text, index=i, logit=3.0, prob=prob, policy_prob=prob, rank=0,
                   top=(TopToken(100 + i, text, 3.0, prob, prob),), seconds=0.01, cache_tokens=10 + i, cache_bytes=0)
        for i, (text, prob) in enumerate(words)
    ]  # fmt: skip
    conversation = Conversation(model={"name": "tiny"})
    conversation.add_user("Name a city.")
    records = [token_record(e, forced=i in forced) for i, e in enumerate(events)]
    conversation.add_assistant("".join(w for w, _ in words), tokens=records, stats={"tokens": len(words)})
    return conversation


async def test_only_tokens_picked_at_a_branch_are_underlined_in_the_heatmap(tmp_path: Path) -> None:
    """Chips are click targets; drawn as links they were all underlined and in the link colour.
    Only the picked token is underlined now, and every chip has its heat colours."""
    from llmchat.tui.widgets.tokens import heat

    words = [(" The", 0.95), (" city", 0.7), (" is", 0.4), (" Paris", 0.2), (".", 0.05)]
    app = LLMChatApp(None, store=_store(tmp_path), conversation=_saved_answer(words, forced={3}))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("alt+t")
        await _until(pilot, lambda: app.query(TokenView), "the heatmap")
        await pilot.pause()
        view = app.query_one(TokenView)
        lines = view.render_lines(Region(0, 0, view.size.width, view.size.height))
        chips = {seg.text: seg.style for seg in lines[CHIPS_LINE] if seg.text in {w for w, _ in words}}
        assert set(chips) == {w for w, _ in words}
        assert {text for text, style in chips.items() if style and style.underline} == {" Paris"}
        for text, prob in words:
            style = chips[text]
            assert style is not None and style.color is not None and style.bgcolor is not None
            background, foreground = heat(prob)
            colours = (style.bgcolor.triplet, style.color.triplet)  # the cursor's chip adds `reverse`
            assert tuple(c.hex for c in colours if c) == (background.lower(), foreground.lower()), text


async def test_panels_hide_and_come_back_with_the_new_width(tmp_path: Path) -> None:
    """The Resize event's width decides (the app's size can still be the old one while it is handled)."""
    app = LLMChatApp(None, store=_store(tmp_path))
    async with app.run_test(size=(160, 40)) as pilot:
        panels = app.query_one("#panels")
        assert panels.display
        for width, shown in ((80, False), (160, True), (99, False), (100, True), (85, False), (160, True)):
            await pilot.resize_terminal(width, 40)
            await pilot.pause()
            assert panels.display is shown, width
        await pilot.resize_terminal(80, 40)
        await pilot.pause()
        assert app.query_one(ChatView).size.width > 70  # the chat has the whole width


async def test_the_status_bar_keeps_activity_and_sampling_at_80_and_160_columns(tmp_path: Path) -> None:
    from llmchat.tui.widgets.status import StatusBar

    app = LLMChatApp(None, store=_store(tmp_path), sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=40))
    async with app.run_test(size=(160, 40)) as pilot:
        bar = app.query_one(StatusBar)
        bar.change(
            model="SmolLM2-135M-Instruct", device="cpu", precision="float32 · Q4_1 packed", context_tokens=412,
            context_capacity=2048, tokens_per_second=31.2, activity="generating…",
        )  # fmt: skip
        for width in (160, 80):
            await pilot.resize_terminal(width, 40)
            await pilot.pause()
            drawn = _drawn(bar)[0]
            assert cell_len(bar.line()) <= bar.content_region.width
            assert drawn.strip() == bar.line()  # nothing cut off at the edge
            assert "0.70" in drawn and "0.90" in drawn and "k 40" in drawn and "generating…" in drawn
            assert "31.2 tok/s" in drawn
        await pilot.press("f5", "f7")  # the keys show their effect at 80 columns too
        await pilot.pause()
        assert "0.95" in bar.line() and "k 50" in bar.line()
        assert "ctx" in _drawn(bar)[0]

        app.action_edit_last()  # nothing to edit: a note, no hint
        app.conversation.add_user("hello")
        app.action_edit_last()
        for width in (160, 80):
            await pilot.resize_terminal(width, 40)
            await pilot.pause()
            drawn = _drawn(bar)[0]
            assert "editing: Enter resends as a new branch, Esc cancels" in drawn, width
            assert "0.95" in drawn and "k 50" in drawn
        await pilot.press("escape")
        await pilot.pause()
        assert "editing" not in bar.line()


async def test_live_tok_s_and_numbers_of_the_last_chat_or_model_do_not_linger(folder: Path, tmp_path: Path) -> None:
    """While an answer streams the status bar shows its own tok/s (never the previous answer's); a
    new chat and another model start without the old KV "last turn" and tok/s."""
    from llmchat.tui.widgets.panels import KVCachePanel
    from llmchat.tui.widgets.status import StatusBar

    app = _app(folder, tmp_path, app_class=_GatedApp)
    async with app.run_test(size=SIZE) as pilot:
        bar, kv = app.query_one(StatusBar), app.query_one(KVCachePanel)
        first = await _send(pilot, app, "hello there")
        assert first.finished is not None
        assert bar.state.tokens_per_second == first.finished.decode_tokens_per_second

        app.gate.clear()  # the next answer stops after a few tokens until the gate opens
        app.query_one(PromptInput).text = "tell me more"  # 12 tokens on this model (no early EOS)
        await pilot.press("enter")
        await _until(pilot, lambda: app.paused.is_set(), "the answer to pause")
        answer = app.query(AssistantMessage).last()
        # Before its second token the answer has no rate yet: the bar shows none, not the last answer's.
        await _until(pilot, lambda: bar.state.activity == "generating…", "the live status")
        await _until(pilot, lambda: bar.state.tokens_per_second is not None, "the live rate")
        # The rate of this answer's tokens up to the frame that drew it (the first token's time is the prefill's).
        steps = answer.tokens[1:]
        rates = [n / sum(t.seconds for t in steps[:n]) for n in range(1, len(steps) + 1)]
        assert bar.state.tokens_per_second in rates
        app.gate.set()
        await _answered(pilot, app)

        cached = kv.state.tokens
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert bar.state.tokens_per_second is None and bar.state.context_tokens == 0
        assert (kv.state.tokens, kv.state.left_over, kv.state.reused, kv.state.prefilled) == (0, cached, 0, 0)
        assert "left from the last chat" in "\n".join(_drawn(kv))
        second = await _send(pilot, app, "hi")  # the first turn of the new chat: real numbers again
        assert second.finished is not None
        assert (kv.state.left_over, kv.state.reused) == (0, second.finished.reused_tokens)

        app._switch_model(folder)  # Ctrl+L: what the models screen does with a chosen model
        assert bar.state.tokens_per_second is None and kv.state.reused == kv.state.prefilled == 0
        await _loaded(pilot, app)
        await pilot.pause()
        assert bar.state.tokens_per_second is None
        assert (kv.state.tokens, kv.state.reused, kv.state.prefilled) == (0, 0, 0)


class _GatedApp(LLMChatApp):
    """While `gate` is closed the worker takes 40 ms a token (so batches reach the UI one by one, as
    with a real model) and stops at its 8th read of the sampling policy until the gate opens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.gate, self.paused = threading.Event(), threading.Event()
        self.gate.set()
        self._reads = 0
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def sampling(self) -> SamplingParams | None:
        if threading.current_thread() is not threading.main_thread() and not self.gate.is_set():
            self._reads += 1
            time.sleep(0.04)
            if self._reads == 8:
                self.paused.set()
                self.gate.wait(30)
        return self._sampling

    @sampling.setter
    def sampling(self, value: SamplingParams | None) -> None:
        self._sampling = value
