"""A streaming answer survives the process: the journal beside the conversation, replayed on load.

The real thing first: the chat in a subprocess, streaming, killed with SIGKILL; the file then holds
the partial answer, marked interrupted, and the chat opens it that way. Then the journal's rules
one by one: torn lines, frames the file already holds, a journal that does not belong, one still
being written by a running llmchat, and the next save folding it in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llmchat.chat.conversation import INTERRUPTED, Conversation, token_record
from llmchat.chat.journal import AnswerJournal, held_elsewhere, journal_path
from llmchat.chat.store import ConversationStore
from llmchat.chat.transcript import to_text
from llmchat.engine import Finished, SamplingParams
from llmchat.engine.events import TokenEvent, TopToken
from llmchat.tui.app import LLMChatApp
from llmchat.tui.widgets.messages import AssistantMessage
from llmchat.tui.widgets.prompt import PromptInput

SIZE = (120, 36)
CONTEXT = 512
PAUSE_AT = 20  # the worker stops before this token (the tiny model's answer is 25 tokens long)

# The chat with a tiny model, driven by Pilot in its own process: it sends a message; its worker
# takes 50 ms a token (the pace of a real model, so frames reach the screen while it streams) and
# blocks before token PAUSE_AT, saying so in a file, so the answer is mid-stream when the test
# kills the process with SIGKILL: nothing of llmchat's runs after that.
DRIVER = textwrap.dedent(
    """
    import asyncio, sys, threading, time
    from pathlib import Path
    from llmchat.chat.store import ConversationStore
    from llmchat.engine import SamplingParams
    from llmchat.tui.app import LLMChatApp
    from llmchat.tui.widgets.prompt import PromptInput

    folder, conversations, marker = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    pause_at, context = int(sys.argv[4]), int(sys.argv[5])

    class PausingApp(LLMChatApp):
        reads = 0

        @property
        def sampling(self):
            if threading.current_thread() is not threading.main_thread():
                PausingApp.reads += 1
                time.sleep(0.05)
                if PausingApp.reads == pause_at:  # the first read is the request's policy, then one per token
                    marker.write_text("paused")
                    threading.Event().wait()
            return self._sampling

        @sampling.setter
        def sampling(self, value):
            self._sampling = value

    async def main():
        app = PausingApp(folder, store=ConversationStore(conversations), device="cpu", dtype="float32",
                         context_length=context, sampling=SamplingParams(temperature=0), max_new_tokens=200)
        async with app.run_test(size=(120, 36)) as pilot:
            while app.model is None:
                await pilot.pause(0.05)
            app.query_one(PromptInput).text = "hello there"
            await pilot.press("enter")
            while True:
                await pilot.pause(0.05)

    asyncio.run(main())
    """
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("journal") / "llama")


def _journal_lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _wait(condition, what: str, seconds: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _engine_answer(folder: Path) -> str:
    import llmchat

    model = llmchat.load(folder, device="cpu", dtype="float32", context_length=CONTEXT)
    ids = model.tokenizer.encode(
        model.template.render([{"role": "user", "content": "hello there"}], add_generation_prompt=True)
    )
    *_, done = model.generate(ids, sampling=SamplingParams(temperature=0), max_new_tokens=200)
    assert isinstance(done, Finished)
    return done.text


async def test_kill_9_mid_answer_keeps_the_partial_answer_marked_interrupted(folder: Path, tmp_path: Path) -> None:
    conversations, marker = tmp_path / "conversations", tmp_path / "paused"
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(folder), str(conversations), str(marker), str(PAUSE_AT), str(CONTEXT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        _wait(lambda: marker.exists() or process.poll() is not None, "the answer to stream")
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        journals = list(conversations.glob(".*.journal"))
        assert len(journals) == 1, journals
        # What the screen showed is in the journal: the frames before the pause, one line each.
        _wait(lambda: sum(len(e.get("tokens", [])) for e in _journal_lines(journals[0])[1:]) > 0, "a frame")
        time.sleep(0.5)  # a frame in flight lands
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL

    store = ConversationStore(conversations)
    [summary] = store.list().conversations
    raw = json.loads(store.path_for(summary.id).read_text(encoding="utf-8"))
    assert raw["messages"][1]["content"] == ""  # the last full save was before the answer began
    entries = _journal_lines(journals[0])[1:]
    streamed = "".join(str(e.get("content", "")) for e in entries)
    streamed_tokens = sum(len(e.get("tokens", [])) for e in entries)  # type: ignore[arg-type]

    conversation = store.load(summary.id)
    answer = conversation.path()[-1]
    assert answer.role == "assistant"
    assert answer.content == streamed and streamed  # everything the screen had shown
    assert _engine_answer(folder).startswith(answer.content)  # the model's own answer, cut short
    assert answer.tokens is not None and len(answer.tokens) == streamed_tokens < PAUSE_AT
    assert answer.stats == {"tokens": streamed_tokens, "finish_reason": INTERRUPTED}
    assert "interrupted" in to_text(conversation)
    # The next request carries the partial answer (never an empty turn).
    assert conversation.chat_messages()[-1] == {"role": "assistant", "content": answer.content}

    # The chat shows it, marked; the next save folds the journal in and deletes it.
    app = LLMChatApp(None, store=store, conversation=conversation)
    async with app.run_test(size=SIZE):
        view = app.query_one(AssistantMessage)
        assert view.content_text == answer.content
        assert view.has_class("stopped")
        assert "interrupted" in str(view.query_one(".stats").render())
        app.conversation.add_user("and then?")
        app._save()
    assert not journals[0].exists()
    saved = json.loads(store.path_for(summary.id).read_text(encoding="utf-8"))
    assert saved["messages"][1]["content"] == answer.content
    assert saved["messages"][1]["stats"]["finish_reason"] == INTERRUPTED


# --- the journal's rules -----------------------------------------------------------------------


def _event(index: int, text: str) -> TokenEvent:
    top = (TopToken(10 + index, text, 2.5, 0.75, 0.8), TopToken(99, "x", 1.0, 0.25, 0.2))
    return TokenEvent(
        token_id=10 + index, text=text, index=index, logit=2.5, prob=0.75, policy_prob=0.8, rank=0, top=top,
        seconds=0.01, cache_tokens=0, cache_bytes=0, entropy=0.8, policy_entropy=0.7,
    )  # fmt: skip


def _streaming(tmp_path: Path) -> tuple[ConversationStore, Conversation, AnswerJournal]:
    store = ConversationStore(tmp_path)
    conversation = Conversation(model={"name": "tiny"})
    conversation.add_user("count")
    answer = conversation.add_assistant()
    store.save(conversation)
    journal = store.start_journal(conversation, answer.id)
    assert journal is not None
    return store, conversation, journal


def test_no_journal_beside_a_file_the_store_did_not_just_save(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    conversation = Conversation()
    conversation.add_user("hi")
    answer = conversation.add_assistant()
    assert store.start_journal(conversation, answer.id) is None  # never saved
    path = store.save(conversation)
    path.write_text("{}", encoding="utf-8")  # another program's file now: the save over it was refused
    assert store.start_journal(conversation, answer.id) is None
    assert list(tmp_path.glob(".*.journal")) == []


def _frame(conversation: Conversation, journal: AnswerJournal, texts: list[str], start: int) -> None:
    records = [token_record(_event(start + i, t)) for i, t in enumerate(texts)]
    content = "".join(texts)
    conversation.append(journal.message_id, content=content)
    message = conversation.get(journal.message_id)
    message.tokens = (message.tokens or []) + records
    journal.add(content, "", records)


def _leftover(journal: AnswerJournal) -> None:
    """What a killed process leaves: the file as written, and no lock (the kernel drops it)."""
    assert journal._handle is not None
    journal._handle.close()
    journal._handle = None


def test_a_leftover_journal_is_replayed_and_a_torn_last_line_dropped(tmp_path: Path) -> None:
    store, conversation, journal = _streaming(tmp_path)
    _frame(conversation, journal, ["one", " two"], 0)
    _frame(conversation, journal, [" three"], 2)
    _leftover(journal)
    with journal.path.open("a", encoding="utf-8") as handle:
        handle.write('{"at": [14, 0, 3], "content": " fo')  # killed mid-write
    loaded = store.load(conversation.id)
    answer = loaded.path()[-1]
    assert answer.content == "one two three"
    assert [r["text"] for r in answer.tokens or []] == ["one", " two", " three"]
    assert answer.stats == {"tokens": 3, "finish_reason": INTERRUPTED}
    assert store.path_for(conversation.id).read_text(encoding="utf-8").count("one two") == 0  # reading wrote nothing
    # `chats export --format json` gives the file as the next save writes it.
    exported = json.loads(store.raw_text(conversation.id))
    assert exported["messages"][1]["content"] == "one two three"


def test_frames_the_file_already_holds_are_not_added_twice(tmp_path: Path) -> None:
    store, conversation, journal = _streaming(tmp_path)
    _frame(conversation, journal, ["a", "b"], 0)
    # A save mid-answer (the system prompt was changed while it streamed) rewrites the file; the
    # process dies before the journal starts over: the file and the journal both hold "ab".
    store.save(conversation)
    _leftover(journal)
    answer = store.load(conversation.id).path()[-1]
    assert answer.content == "ab" and len(answer.tokens or []) == 2
    # A frame that does not follow on from the file (a gap) is not applied, nor anything after it.
    lines = journal.path.read_text(encoding="utf-8").splitlines()
    lines.append(json.dumps({"at": [9, 0, 9], "content": "zzz"}))
    journal.path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert store.load(conversation.id).path()[-1].content == "ab"


def test_rebase_after_a_save_mid_answer_keeps_only_what_follows(tmp_path: Path) -> None:
    store, conversation, journal = _streaming(tmp_path)
    _frame(conversation, journal, ["a", "b"], 0)
    store.save(conversation)
    assert journal.path.exists()  # being written: the save leaves it alone
    journal.rebase(conversation.get(journal.message_id))
    _frame(conversation, journal, ["c"], 2)
    assert [e.get("content") for e in _journal_lines(journal.path)[1:]] == ["c"]
    _leftover(journal)
    answer = store.load(conversation.id).path()[-1]
    assert answer.content == "abc" and len(answer.tokens or []) == 3


def test_a_journal_being_written_is_shown_but_not_marked_or_deleted(tmp_path: Path) -> None:
    store, conversation, journal = _streaming(tmp_path)
    _frame(conversation, journal, ["live"], 0)
    assert held_elsewhere(journal.path)
    answer = store.load(conversation.id).path()[-1]  # e.g. `llmchat chats show` in another terminal
    assert answer.content == "live" and answer.stats is None  # still streaming: not interrupted
    other = ConversationStore(tmp_path)
    other.save(other.load(conversation.id))
    assert journal.path.exists()
    journal.discard()
    assert not journal.path.exists()
    assert not held_elsewhere(journal.path)


def test_a_journal_that_does_not_belong_is_left_aside(tmp_path: Path) -> None:
    store, conversation, journal = _streaming(tmp_path)
    _frame(conversation, journal, ["x"], 0)
    _leftover(journal)
    finished = store.load(conversation.id)
    message = finished.path()[-1]
    message.stats = {"tokens": 1, "finish_reason": "eos"}  # it finished and was saved; the unlink was lost
    message.content = "the final text"
    store.save(finished)
    journal.path.write_text(  # as if left behind again
        json.dumps({"journal": "llmchat.answer-journal", "version": 1, "conversation": conversation.id,
                    "message": message.id}) + "\n" + json.dumps({"at": [0, 0, 0], "content": "x"}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    assert store.load(conversation.id).path()[-1].content == "the final text"
    for header in (
        {"journal": "llmchat.answer-journal", "version": 1, "conversation": "someone-else", "message": message.id},
        {"journal": "llmchat.answer-journal", "version": 1, "conversation": conversation.id, "message": "m99"},
        {"journal": "llmchat.answer-journal", "version": 7, "conversation": conversation.id, "message": message.id},
        ["not", "a", "header"],
    ):
        journal.path.write_text(json.dumps(header) + "\n", encoding="utf-8")
        assert store.load(conversation.id).path()[-1].content == "the final text"
    assert [s.id for s in store.list().conversations] == [conversation.id]  # never unreadable for it


def test_an_answer_killed_before_its_first_token_is_marked_and_reused(tmp_path: Path) -> None:
    store, conversation, journal = _streaming(tmp_path)
    _leftover(journal)  # only the header was written
    loaded = store.load(conversation.id)
    empty = loaded.path()[-1]
    assert empty.content == "" and empty.stats == {"tokens": 0, "finish_reason": INTERRUPTED}
    assert loaded.chat_messages() == [{"role": "user", "content": "count"}]  # no empty assistant turn
    again = loaded.regenerate()
    assert again is empty and again.stats is None  # no empty branch ‹1/2› left behind
    assert loaded.sibling_position(again.id) == (0, 1)


def test_the_next_save_deletes_a_leftover_journal_and_delete_removes_it(tmp_path: Path) -> None:
    store, conversation, journal = _streaming(tmp_path)
    _frame(conversation, journal, ["kept"], 0)
    _leftover(journal)
    loaded = store.load(conversation.id)
    store.save(loaded)
    assert not journal_path(store.path_for(conversation.id)).exists()
    assert store.load(conversation.id).path()[-1].content == "kept"
    journal2 = store.start_journal(loaded, loaded.path()[-1].id)
    assert journal2 is not None
    _leftover(journal2)
    store.delete(conversation.id)
    assert list(tmp_path.iterdir()) == []


def test_quitting_mid_answer_saves_it_interrupted(tmp_path: Path) -> None:
    """The app closed while the answer streamed (Ctrl+Q, a closed terminal): a full save, no journal left."""
    store, conversation, journal = _streaming(tmp_path)
    journal.discard()
    app = LLMChatApp(None, store=store, conversation=conversation)
    records = [token_record(_event(i, t)) for i, t in enumerate(["so", " far"])]
    app.generating, app._answer_id, app._records = True, conversation.path()[-1].id, records
    conversation.append(app._answer_id, content="so far")
    app._save_interrupted()
    saved = store.load(conversation.id).path()[-1]
    assert saved.content == "so far" and saved.stats == {"tokens": 2, "finish_reason": INTERRUPTED}
    assert saved.tokens == records
    assert not app.generating and app.stop_flag.is_set()


def test_replayed_records_are_the_records_the_app_makes(tmp_path: Path) -> None:
    store, conversation, journal = _streaming(tmp_path)
    _frame(conversation, journal, ["a", "b"], 0)
    _leftover(journal)
    replayed = store.load(conversation.id).path()[-1].tokens
    assert replayed == conversation.path()[-1].tokens  # lists, not the schema's tuples
    assert all(isinstance(entry, list) for record in replayed or [] for entry in record["top"])


async def test_regenerating_an_empty_interrupted_answer_answers_into_it(folder: Path, tmp_path: Path) -> None:
    """Ctrl+R on an answer killed before its first token: the answer is written there, no empty ‹1/2›."""
    store = ConversationStore(tmp_path)
    conversation = Conversation(model={"name": "tiny"})
    conversation.add_user("hello there")
    empty = conversation.add_assistant("", stats={"tokens": 0, "finish_reason": INTERRUPTED})
    store.save(conversation)
    app = LLMChatApp(folder, store=store, conversation=store.load(conversation.id), device="cpu",
                     dtype="float32", context_length=CONTEXT, sampling=SamplingParams(temperature=0))  # fmt: skip
    async with app.run_test(size=SIZE) as pilot:
        while app.model is None:
            await pilot.pause(0.05)
        assert app.query_one(AssistantMessage).has_class("stopped")
        await pilot.press("ctrl+r")
        while app.generating or app.query_one(AssistantMessage).finished is None:
            await pilot.pause(0.05)
    saved = store.load(conversation.id)
    assert [m.id for m in saved.messages] == [conversation.messages[0].id, empty.id]
    answer = saved.get(empty.id)
    assert answer.content == _engine_answer(folder) and answer.stats is not None
    assert answer.stats["finish_reason"] != INTERRUPTED
    assert not journal_path(store.path_for(conversation.id)).exists()


class _SteppingApp(LLMChatApp):
    """Its worker takes 50 ms a token, changes the system prompt at token SAVE_AT (a full save in
    the middle of the answer) and waits before token STOP_AT until the test lets it go."""

    SAVE_AT, STOP_AT = 6, 14

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.paused, self.release, self._reads = threading.Event(), threading.Event(), 0
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def sampling(self) -> SamplingParams | None:
        if threading.current_thread() is not threading.main_thread():
            self._reads += 1
            time.sleep(0.05)
            if self._reads == self.SAVE_AT:
                self.call_from_thread(self._set_system_prompt, "Be brief.")
            if self._reads == self.STOP_AT:
                self.paused.set()
                self.release.wait(60)
        return self._sampling

    @sampling.setter
    def sampling(self, value: SamplingParams | None) -> None:
        self._sampling = value


async def test_a_save_mid_answer_starts_the_journal_over(folder: Path, tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    app = _SteppingApp(folder, store=store, device="cpu", dtype="float32", context_length=CONTEXT,
                       sampling=SamplingParams(temperature=0))  # fmt: skip
    async with app.run_test(size=SIZE) as pilot:
        while app.model is None:
            await pilot.pause(0.05)
        app.query_one(PromptInput).text = "hello there"
        await pilot.press("enter")
        while not app.paused.is_set():
            await pilot.pause(0.05)
        await pilot.pause(0.5)  # the frames before the pause land
        answer_id = app.conversation.path()[-1].id
        saved = json.loads(store.path_for(app.conversation.id).read_text(encoding="utf-8"))
        in_file = next(m for m in saved["messages"] if m["id"] == answer_id)
        assert in_file["content"] and saved["system"] == "Be brief."  # the save mid-answer
        assert len(in_file["tokens"]) > 0 and "stats" not in in_file
        entries = _journal_lines(journal_path(store.path_for(app.conversation.id)))[1:]
        assert entries and entries[0]["at"][0] == len(in_file["content"])  # only what followed the save
        assert entries[0]["at"][2] == len(in_file["tokens"])
        # Read as another llmchat would (`chats show` meanwhile): the file and the journal add up.
        live = ConversationStore(tmp_path).load(app.conversation.id).get(answer_id)
        shown = app.conversation.get(answer_id)
        assert (live.content, live.tokens) == (shown.content, shown.tokens)
        assert live.stats is None  # still streaming, not interrupted
        app.release.set()
        while app.generating:
            await pilot.pause(0.05)
    final = store.load(app.conversation.id).get(answer_id)
    assert final.content == _engine_answer(folder) and final.stats is not None
    assert not journal_path(store.path_for(app.conversation.id)).exists()
