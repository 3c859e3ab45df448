"""Completion (raw) mode: a base model, which has no chat template, in the chat and headless.

In completion mode the transcript (user text and the model's continuations, as plain text) is the
prompt and the answer continues it. Runs on tiny random llamas through the real engine: one with
the ChatML template, one without any (a base model, as `llmchat info` calls it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmchat.chat.conversation import Conversation
from llmchat.cli import main
from llmchat.engine.model_type import detect
from llmchat.engine.package import open_package, open_tokenizer
from llmchat.engine.prompt import ChatTokens, completion_text
from llmchat.tui.screens.inspector import InspectorScreen
from llmchat.tui.widgets.messages import AssistantMessage
from llmchat.tui.widgets.prompt import PromptInput
from llmchat.tui.widgets.status import StatusBar
from tests.test_tui_actions import SIZE, _answered, _app, _drawn, _loaded, _send, _store, _until
from tests.tiny_models import build_tiny_model


def build_base_model(folder: Path) -> Path:
    """A tiny llama without a chat template: what a base (pretrained-only) model ships."""
    build_tiny_model("llama", folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("completion") / "base")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("completion") / "chat")


def test_the_base_fixture_is_what_info_calls_base(base: Path, chat_model: Path) -> None:
    package = open_package(base)
    assert detect(package.templates, package.tokenizer).kind == "base"
    chat = open_package(chat_model)
    assert detect(chat.templates, chat.tokenizer).kind == "chat"


def test_completion_text_is_the_transcript_as_written() -> None:
    messages = [
        {"role": "system", "content": "A list of capitals."},
        {"role": "user", "content": "France:"},
        {"role": "assistant", "content": " Paris"},
        {"role": "user", "content": "\nGermany:"},
    ]
    assert completion_text(messages) == "A list of capitals.\nFrance: Paris\nGermany:"
    assert completion_text(messages[1:]) == "France: Paris\nGermany:"


def _status_line(app) -> str:  # noqa: ANN001 - the app under test
    return app.query_one(StatusBar).line()


# --- the chat -----------------------------------------------------------------------------------


async def test_a_base_model_chats_in_completion_mode_and_reuses_the_cache(base: Path, tmp_path: Path) -> None:
    """A model without a template: the chat switches to completion mode by itself (status bar),
    the prompt is the user's text with the tokenizer's BOS, the answer continues it and is saved
    with its content; the next turn appends to the same ids, so the KV cache is reused."""
    tokenizer = open_tokenizer(base)
    app = _app(base, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        assert app.conversation.mode == "completion"
        assert "│ completion │" in _status_line(app)

        first = await _send(pilot, app, "The quick brown fox")
        assert first.finished is not None and first.finished.reason != "cancelled" and first.tokens
        first_prompt = app.session.prompt_ids(first.message_id or "")
        assert first_prompt == tokenizer.encode("The quick brown fox", add_special_tokens=True)
        assert first_prompt[0] == tokenizer.bos_token_id
        answer_ids = [t.token_id for t in first.tokens]

        second = await _send(pilot, app, " jumps over")
        done = second.finished
        assert done is not None
        prompt = app.session.prompt_ids(second.message_id or "")
        assert prompt == first_prompt + answer_ids + tokenizer.encode(" jumps over")
        assert done.reused_tokens >= len(first_prompt) + len(answer_ids) - 1  # only the new text prefilled
        assert done.prefilled_tokens == len(prompt) - done.reused_tokens

    saved = _store(tmp_path).load(app.conversation.id)
    assert saved.mode == "completion"
    answers = [m for m in saved.path() if m.role == "assistant"]
    assert [m.content for m in answers] == [first.content_text, second.content_text]
    assert answers[0].content and answers[0].content == tokenizer.decode(answer_ids)
    assert answers[0].stats is not None and answers[0].tokens


async def test_the_prompt_view_shows_the_raw_transcript(base: Path, tmp_path: Path) -> None:
    """Alt+V in completion mode: the plain transcript with the draft, BOS first, no template, and
    the cached part counted as the engine will reuse it."""
    app = _app(base, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "Once upon a time")
        app.query_one(PromptInput).text = " there was"
        await pilot.press("alt+v")
        await _until(pilot, lambda: isinstance(app.screen, InspectorScreen), "the inspector")
        screen = app.screen
        assert isinstance(screen, InspectorScreen)
        await _until(pilot, lambda: screen.prompt is not None, "the prompt view")
        view = screen.prompt
        assert view is not None and view.completion
        assert view.text == "Once upon a time" + answer.content_text + " there was"
        assert list(view.token_ids) == app.session.prompt_ids(answer.message_id or "") + [
            t.token_id for t in answer.tokens
        ] + open_tokenizer(base).encode(" there was")
        assert view.reused == app.model.generator.reusable(list(view.token_ids))  # type: ignore[union-attr]
        assert "The transcript as plain text" in "\n".join(_drawn(screen.query_one("#prompt-heading")))


async def test_the_mode_switches_with_its_key_and_is_saved(chat_model: Path, tmp_path: Path) -> None:
    """A chat model starts in chat mode; Alt+M switches the conversation to completion (the next
    request is the plain transcript) and back (the template again); the mode is saved."""
    tokenizer = open_tokenizer(chat_model)
    app = _app(chat_model, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        assert app.conversation.mode == "chat" and "completion" not in _status_line(app)
        await pilot.press("alt+m")
        assert app.conversation.mode == "completion" and "│ completion │" in _status_line(app)
        answer = await _send(pilot, app, "the fox")
        assert app.session.prompt_ids(answer.message_id or "") == tokenizer.encode("the fox", add_special_tokens=True)
        assert _store(tmp_path).load(app.conversation.id).mode == "completion"

        await pilot.press("alt+m")
        assert app.conversation.mode == "chat" and "completion" not in _status_line(app)
        second = await _send(pilot, app, "and then?")
        model = app.model
        assert model is not None
        rendered = model.template.render(
            app.conversation.chat_messages(before=second.message_id), add_generation_prompt=True
        )
        assert tokenizer.decode(app.session.prompt_ids(second.message_id or "")) == tokenizer.decode(
            tokenizer.encode(rendered)
        )
        assert _store(tmp_path).load(app.conversation.id).mode == "chat"


async def test_a_base_model_cannot_leave_completion_mode(base: Path, tmp_path: Path) -> None:
    app = _app(base, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        await pilot.press("alt+m")
        await pilot.pause()
        assert app.conversation.mode == "completion"
        answer = await _send(pilot, app, "hello")
        assert answer.tokens and answer.content_text


async def test_raw_flag_and_saved_modes(chat_model: Path, base: Path, tmp_path: Path) -> None:
    """`llmchat --raw` (completion=True) starts a chat model in completion mode, new chats too; a
    resumed conversation keeps its saved mode, except that a base model can only complete."""
    app = _app(chat_model, tmp_path, completion=True)
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        assert app.conversation.mode == "completion"
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.conversation.mode == "completion"

    saved = Conversation(mode="completion")
    saved.add_user("Roses are red")
    app = _app(chat_model, tmp_path / "resume", conversation=saved)
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        assert app.conversation.mode == "completion"  # the chat model, but the saved choice stays

    saved = Conversation()
    saved.add_user("Roses are red")
    assert saved.mode == "chat"
    app = _app(base, tmp_path / "resume-base", conversation=saved)
    async with app.run_test(size=SIZE) as pilot:
        await _loaded(pilot, app)
        assert app.conversation.mode == "completion"
        await pilot.press("ctrl+r")  # answer the saved prompt: plain text, not a template error
        answer = await _answered(pilot, app)
        assert answer.tokens and app.query(AssistantMessage).last().content_text


def test_a_conversation_file_keeps_its_mode() -> None:
    conversation = Conversation(mode="completion")
    assert Conversation.from_dict(conversation.to_dict()).mode == "completion"
    old = conversation.to_dict()
    del old["mode"]  # written before modes existed
    assert Conversation.from_dict(old).mode == "chat"
    from llmchat.chat.conversation import ConversationFormatError

    with pytest.raises(ConversationFormatError, match="mode"):
        Conversation.from_dict({**old, "mode": "poem"})


def test_chat_tokens_do_not_mix_modes(base: Path) -> None:
    """Known ids are reused only in the mode they were made in: a completion prompt gets the BOS,
    a rendered chat carries its own."""
    tokenizer = open_tokenizer(base)
    tokens = ChatTokens(tokenizer)
    assert tokens.encode("hello there", "chat") == tokenizer.encode("hello there")
    completion_ids = tokens.encode("hello there you", "completion")
    assert completion_ids == tokenizer.encode("hello there you", add_special_tokens=True)
    assert completion_ids[0] == tokenizer.bos_token_id
    assert tokens.peek("hello there you too", "completion") == completion_ids + tokenizer.encode(" too")
    assert tokens.peek("hello there you too", "chat") == tokenizer.encode("hello there you too")


# --- headless -----------------------------------------------------------------------------------


def _events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_run_picks_raw_mode_for_a_base_model_and_says_so(capsys: pytest.CaptureFixture[str], base: Path) -> None:
    code = main(["run", str(base), "--prompt", "The quick brown", "--max-new-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "is a base model (no chat template)" in err and "raw" in err
    done = next(e for e in _events(out) if e["event"] == "PrefillDone")
    assert done["prompt_tokens"] == len(open_tokenizer(base).encode("The quick brown", add_special_tokens=True))

    code = main(["run", str(base), "--prompt", "x", "--chat"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmchat: error: ") and "--chat" in err


def test_inspect_picks_raw_mode_for_a_base_model(capsys: pytest.CaptureFixture[str], base: Path) -> None:
    code = main(["inspect", str(base), "--prompt", "The quick brown", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and "base model" in err
    assert "(raw: no chat template)" in out.splitlines()[0]
    code = main(["inspect", str(base), "--prompt", "The quick brown", "--max-new-tokens", "2", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and _events(out)[-1]["prompt_mode"] == "completion"


def test_a_chat_model_keeps_its_template_unless_raw(capsys: pytest.CaptureFixture[str], chat_model: Path) -> None:
    code = main(["inspect", str(chat_model), "--prompt", "hi", "--max-new-tokens", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and "base model" not in err and _events(out)[-1]["prompt_mode"] == "chat"
    code = main(["inspect", str(chat_model), "--prompt", "hi", "--max-new-tokens", "2", "--json", "--raw"])
    out, err = capsys.readouterr()
    assert code == 0 and "base model" not in err and _events(out)[-1]["prompt_mode"] == "completion"
