"""The chat's first moments and a few rough edges, driven with Pilot on a tiny random model.

Start-up problems (broken settings, an unreadable conversation) all reach the user; the welcome
an empty chat shows; Ctrl+R in the middle of an answer; the command palette's entries; and what
Ctrl+S says an empty system prompt means for the model's chat template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from textual.widgets import Static

from llmchat.chat.store import ConversationStore
from llmchat.engine.chat_template import ChatTemplate, default_system_prompt
from llmchat.settings import load_settings, settings_path
from llmchat.tui.app import LLMChatApp
from llmchat.tui.screens import HelpScreen, ProblemsScreen, SystemPromptScreen
from llmchat.tui.screens.problems import PROBLEMS_COMMAND
from llmchat.tui.widgets.messages import AssistantMessage, ChatView
from llmchat.tui.widgets.welcome import Welcome, kind_line
from tests.test_tui_actions import _answered, _app, _loaded, _notes, _paused_mid_answer, _PausingApp, _send, _until

SIZE = (150, 45)  # the screen of the report: four settings toasts pushed the fifth off it

# SmolLM2's template: a missing system turn is filled with the model's own default.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Gemma's way: the system text goes in front of the first user turn.
GEMMA_LIKE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' }}"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ message['content'] + '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
)
# Llama 3's way: a fixed preamble in the system turn, the user's system text after it.
LLAMA_LIKE = (
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}{{ '<|eot_id|>' }}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("tui-startup") / "llama")


def _with_template(folder: Path, target: Path, template: str | None) -> Path:
    """A copy of the tiny model whose tokenizer_config carries `template` (None: no template, a base model)."""
    shutil.copytree(folder, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if template is None:
        config.pop("chat_template", None)
    else:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return target


# --- start-up problems ---------------------------------------------------------------------------


BROKEN_SETTINGS = 'theme = 5\npanels = "yes"\n[sampling]\ntemperature = -1\n[keys]\nnonexistent = "f12"\n'


@pytest.mark.parametrize("size", [SIZE, (80, 24)])
async def test_every_start_up_problem_reaches_the_user(folder: Path, tmp_path: Path, size: tuple[int, int]) -> None:
    """Four broken settings and an unreadable conversation file: one toast, wholly on screen, names
    each source, and Ctrl+P "Start-up problems" lists all five in full."""
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BROKEN_SETTINGS, encoding="utf-8")
    settings, problems = load_settings()
    assert len(problems) == 4
    store = ConversationStore(tmp_path / "conversations")
    store.directory.mkdir(parents=True)
    (store.directory / "broken.json").write_text("{not json", encoding="utf-8")

    app = _app(folder, tmp_path, settings=settings, settings_problems=problems)
    async with app.run_test(size=size, notifications=True) as pilot:
        await _until(pilot, lambda: app.screen.query("Toast"), "the start-up toast")
        await pilot.pause()
        toasts = list(app.screen.query("Toast"))
        assert len(toasts) == 1
        toast = toasts[0]
        assert app.screen.region.contains_region(toast.region), (toast.region, app.screen.region)
        shown = str(toast.render())
        assert "5 problems at start-up" in shown and PROBLEMS_COMMAND in shown
        assert "settings.toml: theme = 5" in shown and "broken.json: not valid JSON" in shown, shown
        bullets = [line for line in shown.splitlines() if line.startswith("•")]
        assert len(bullets) == 4 and all(len(line) <= toast.content_region.width for line in bullets), shown

        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        commands[f"{PROBLEMS_COMMAND} (5)"].callback()
        await pilot.pause()
        assert isinstance(app.screen, ProblemsScreen)
        listed = str(app.screen.query_one("#problems", Static).render())
        assert all(problem in listed for problem in problems), listed
        assert "broken.json: not valid JSON" in listed and "left untouched" in listed
        await pilot.press("escape")
        await pilot.press("f1")  # the keys screen says where they are too
        assert isinstance(app.screen, HelpScreen)
        assert f"5 problems at start-up: Ctrl+P → “{PROBLEMS_COMMAND}”" in str(
            app.screen.query_one("#notes", Static).render()
        )
    assert path.read_text(encoding="utf-8") == BROKEN_SETTINGS  # reported, never rewritten


async def test_a_single_problem_is_shown_in_full_and_none_shows_nothing(folder: Path, tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "conversations")
    store.directory.mkdir(parents=True)
    (store.directory / "broken.json").write_text("{not json", encoding="utf-8")
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: app.startup_checked, "the conversations to be checked")
        await pilot.pause()  # the toast is a message the app handles next
        assert [n.title for n in app._notifications] == ["Conversations"]
        assert "broken.json: not valid JSON" in _notes(app)[0] and "Ctrl+O" in _notes(app)[0]
        assert f"{PROBLEMS_COMMAND} (1)" in [c.title for c in app.get_system_commands(app.screen)]

    (store.directory / "broken.json").unlink()
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: app.startup_checked, "the conversations to be checked")
        await pilot.pause()  # the toast is a message the app handles next
        assert _notes(app) == []
        assert not any(c.title.startswith(PROBLEMS_COMMAND) for c in app.get_system_commands(app.screen))


# --- Ctrl+R mid-answer ---------------------------------------------------------------------------


def _drawn_and_finished(app: LLMChatApp, message_id: str) -> bool:
    """Whether the newest answer on screen is `message_id` and has finished (not the stopped one)."""
    answers = app.query(AssistantMessage)
    return bool(answers) and answers.last().message_id == message_id and answers.last().finished is not None


async def test_regenerate_mid_answer_stops_it_and_answers_again(folder: Path, tmp_path: Path) -> None:
    """Ctrl+R while an answer streams says so, stops it (kept as a stopped branch) and regenerates."""
    app = _app(folder, tmp_path, _PausingApp)
    assert isinstance(app, _PausingApp)
    async with app.run_test(size=SIZE) as pilot:
        await _paused_mid_answer(pilot, app)
        first = app.conversation.current
        await pilot.press("ctrl+r")
        assert any("Stopping this answer to regenerate" in note for note in _notes(app)), _notes(app)
        await pilot.press("ctrl+r")  # a second press while it stops does not queue another
        app.release.set()
        await _until(pilot, lambda: _drawn_and_finished(app, app.conversation.current), "the regenerated answer")
        answer = app.query(AssistantMessage).last()
        assert answer.message_id == app.conversation.current != first
        assert answer.finished is not None and answer.finished.reason != "cancelled"
        old = app.conversation.get(first)
        assert old.stats is not None and old.stats["finish_reason"] == "cancelled" and old.content
        siblings = app.conversation.branch_siblings(app.conversation.current)
        assert [m.id for m in siblings] == [first, app.conversation.current]  # the stopped one is a branch
        assert len(app.conversation.messages) == 3


async def test_escape_after_regenerate_mid_answer_only_stops(folder: Path, tmp_path: Path) -> None:
    app = _app(folder, tmp_path, _PausingApp)
    assert isinstance(app, _PausingApp)
    async with app.run_test(size=SIZE) as pilot:
        await _paused_mid_answer(pilot, app)
        await pilot.press("ctrl+r", "escape")
        app.release.set()
        answer = await _answered(pilot, app)
        await pilot.pause()
        assert answer.finished is not None and answer.finished.reason == "cancelled"
        assert not app.generating and len(app.query(AssistantMessage)) == 1
        assert len(app.conversation.messages) == 2


# --- the welcome ---------------------------------------------------------------------------------


def _welcome(app: LLMChatApp) -> str | None:
    found = app.query_one(ChatView).query(Welcome)
    return str(found.first().render()) if found else None


async def test_an_empty_chat_welcomes_with_the_model_and_the_keys(folder: Path, tmp_path: Path) -> None:
    """After the model loads: its name, kind (as `llmchat info` has it) and context, and the keys as
    bound now; the first message clears it away and it is never saved; Ctrl+N brings it back."""
    from llmchat.settings import Settings

    app = _app(folder, tmp_path, settings=Settings(keys={"token_view": "f12"}))
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        await pilot.pause()
        text = _welcome(app)
        assert app.model is not None and text is not None
        assert app.model.package.name in text
        assert kind_line(app.model.traits.kind, app.model.traits.labels) in text
        assert f"{app.model.context_length:,}-token context" in text
        for key in ("Enter", "F12", "F1", "Ctrl+P"):  # F12: the rebound token view
            assert any(line.startswith(key) for line in text.splitlines()), (key, text)
        await _send(pilot, app, "hello there")
        assert _welcome(app) is None
        saved = json.loads(next((tmp_path / "conversations").glob("*.json")).read_text(encoding="utf-8"))
        assert "F12" not in json.dumps(saved) and "token context" not in json.dumps(saved)
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert _welcome(app) is not None


async def test_a_base_model_is_welcomed_as_one_and_no_model_not_at_all(folder: Path, tmp_path: Path) -> None:
    app = LLMChatApp(None, store=ConversationStore(tmp_path / "c"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert _welcome(app) is None  # nothing loaded: nothing to introduce
    base = _with_template(folder, tmp_path / "base", None)
    app = _app(base, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        await pilot.pause()
        assert app.model is not None and app.model.traits.kind == "base"
        text = _welcome(app)
        assert text is not None and "a base model (no chat template)" in text


# --- the command palette -------------------------------------------------------------------------


async def test_the_palette_lists_keys_once_and_only_our_themes(tmp_path: Path) -> None:
    from textual.theme import BUILTIN_THEMES

    from llmchat.tui.themes import ThemeChoices, theme_cycle

    app = LLMChatApp(None, store=ConversationStore(tmp_path / "c"))
    async with app.run_test(size=SIZE) as pilot:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert [t for t in titles if t.startswith("Keys")] == ["Keys (f1)"]
        assert "Theme" not in titles  # Textual's picker, with its built-in themes
        command = next(c for c in app.get_system_commands(app.screen) if c.title == "Theme: choose one")
        command.callback()
        await pilot.pause()
        provider = ThemeChoices(app.screen)
        names = [hit.text for hit in [h async for h in provider.discover()]]
        assert names == theme_cycle(app) and names and not set(names) & set(BUILTIN_THEMES)
        hits = {h.text: h async for h in provider.search("light")}
        assert "llmchat-light" in hits and set(hits) <= set(names)
        await hits["llmchat-light"].command()
        await pilot.pause()
        assert app.theme == "llmchat-light" and load_settings()[0].theme == "llmchat-light"


# --- Ctrl+S: what an empty system prompt means -----------------------------------------------------


def test_default_system_prompt_of_a_template() -> None:
    assert default_system_prompt(ChatTemplate(SMOL_TEMPLATE)) == SMOL_DEFAULT
    from tests.tiny_models import CHATML_TEMPLATE

    assert default_system_prompt(ChatTemplate(CHATML_TEMPLATE)) is None
    assert default_system_prompt(ChatTemplate(GEMMA_LIKE, special_tokens={"bos_token": "<bos>"})) is None
    assert default_system_prompt(ChatTemplate(LLAMA_LIKE)) is None  # a preamble, the user's text after it
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    assert default_system_prompt(ChatTemplate(refusing)) is None


@pytest.mark.parametrize(("template", "says"), [
    (SMOL_TEMPLATE, f"Empty: the model's template uses its own default: “{SMOL_DEFAULT}”"),
    (None, "Empty: no system prompt."),  # the tiny model's own ChatML template adds none
])  # fmt: skip
async def test_ctrl_s_says_what_an_empty_system_prompt_means(
    folder: Path, tmp_path: Path, template: str | None, says: str
) -> None:
    model = _with_template(folder, tmp_path / "model", template) if template else folder
    app = _app(model, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SystemPromptScreen)
        assert str(app.screen.query_one("#empty-means", Static).render()) == says
        await pilot.press("escape")
