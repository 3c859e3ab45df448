"""The chat against a model on a server: Pilot drives the real app, whose remote session talks to
llama-cpp-python's OpenAI-compatible server on the demo model (a server no one here wrote), over
loopback; a proxy in front of it cuts the stream mid-answer. What a server cannot show is said, not
raised; what it did say reaches the panels, and nothing said is lost from the conversation file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from llmchat.chat.conversation import Conversation
from llmchat.chat.store import ConversationStore
from llmchat.engine import SamplingParams, TokenEvent, TopToken
from llmchat.engine.events import Finished
from llmchat.engine.prompt import CHAT
from llmchat.session import LocalSession, ServerSpec
from llmchat.session.remote import RemoteSession
from llmchat.tui.app import LLMChatApp, saved_server
from llmchat.tui.inspecting import partial_policy_view
from llmchat.tui.screens.inspector import InspectorScreen
from llmchat.tui.screens.models import ModelsScreen
from llmchat.tui.widgets.messages import AssistantMessage, ChatView
from llmchat.tui.widgets.panels import KVCachePanel, MemoryPanel, TopKPanel
from llmchat.tui.widgets.prompt import PromptInput
from llmchat.tui.widgets.status import StatusBar
from tests.remote_servers import FaultyProxy, free_port, llama_cpp_server, requires_llama_cpp

GREEDY = SamplingParams(temperature=0)
SIZE = (150, 45)
QUESTION = "What is the capital of France?"
MAX_NEW = 24


@pytest.fixture(scope="module")
def llama_server(demo_gguf: Path) -> Iterator[str]:
    with llama_cpp_server(demo_gguf) as url:
        yield url


def _app(tmp_path: Path, server: ServerSpec, **options: Any) -> LLMChatApp:
    store = ConversationStore(tmp_path / "conversations")
    options = {"sampling": GREEDY, "max_new_tokens": MAX_NEW} | options
    return LLMChatApp(None, store=store, server=server, **options)


async def _until(pilot: Any, condition: Callable[[], bool], what: str, seconds: float = 90.0) -> None:
    pause: Callable[[float], Awaitable[None]] = pilot.pause
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await pause(0.05)
    notes = [n.message for n in pilot.app._notifications]
    raise AssertionError(f"timed out waiting for {what} (the notifications: {notes})")


async def _send(pilot: Any, app: LLMChatApp, text: str) -> AssistantMessage:
    await _until(pilot, lambda: app.session is not None, "the server's session")
    app.query_one(PromptInput).text = text
    await pilot.press("enter")
    await _until(pilot, lambda: not app.generating and bool(app.query(AssistantMessage)), "the answer")
    answer = app.query(AssistantMessage).last()
    await _until(pilot, lambda: answer.finished is not None or answer.has_class("failed"), "the answer's end")
    return answer


def _streamed_answer(url: str, question: str) -> Finished:
    """The same request through a session of its own: what the server streams for it."""
    session = RemoteSession(ServerSpec(url), top_k=8)
    try:
        messages = [{"role": "user", "content": question}]
        *_, done = session.answer(messages, answer_id="x", mode=CHAT, sampling=GREEDY, max_new_tokens=MAX_NEW)
    finally:
        session.close()
    assert isinstance(done, Finished)
    return done


def _saved(tmp_path: Path) -> dict[str, Any]:
    files = list((tmp_path / "conversations").glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text(encoding="utf-8"))


def _notes(app: LLMChatApp) -> list[str]:
    return [n.message for n in app._notifications]


@pytest.mark.parametrize("_", [None], ids=["llama-cpp-python"])
@pytest.mark.remote
@requires_llama_cpp
async def test_the_chat_streams_a_servers_answer_and_its_panels_say_what_they_know(
    llama_server: str, tmp_path: Path, _: None
) -> None:
    host = urlsplit(llama_server).netloc
    app = _app(tmp_path, ServerSpec(llama_server))
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: bool(app.query("#welcome")), "the welcome")
        welcome = str(app.query_one("#welcome").render())
        assert f"runs on the server {host}" in welcome and "0-token" not in welcome
        status = app.query_one(StatusBar).line(0)
        assert f"server on {host}" in status and app.session is not None
        assert app.session.info.name in status

        answer = await _send(pilot, app, QUESTION)
        streamed = _streamed_answer(llama_server, QUESTION)
        assert answer.content_text == streamed.text and answer.finished is not None
        assert answer.finished.reason == streamed.reason == "max_new_tokens"
        assert [t.text for t in answer.tokens] == [t.text for t in answer.tokens if t.text] and len(answer.tokens) == 24

        # the top-k panel: the server's candidates, labelled with what they are
        topk = app.query_one(TopKPanel)
        assert topk.event is not None and topk.event is answer.tokens[-1] and len(topk.event.top) == 8
        assert topk.source == app.session.capabilities.probabilities and "server" in topk.source
        assert topk.border_title == "Top-k · from the server"
        shown = str(topk.render())
        assert topk.source.split("(")[0].strip() in shown and "n/a" in shown  # policy p: not reported
        # the KV and memory panels: on the server, nothing invented (llama-cpp-python reports no usage)
        kv = app.query_one(KVCachePanel)
        assert kv.state.server == host and kv.state.bytes_used == kv.state.bytes_capacity == 0
        kv_text = str(kv.render())
        assert f"on the server {host}" in kv_text and "usage: not reported" in kv_text
        assert "not reported" in str(app.query_one(MemoryPanel).render())

        # the token heatmap and cursor work on the answer's tokens
        await pilot.press("alt+t")
        await pilot.pause(0.2)
        assert answer.token_mode != "text"
        await pilot.press("f8")
        await pilot.pause(0.2)
        assert topk.event is answer.steps[app._selected_token or 0] and "token" in str(topk.border_subtitle)

    saved = _saved(tmp_path)
    assert saved["model"] == {"name": app.session.info.name, "server": llama_server}
    reply = saved["messages"][1]
    assert reply["content"] == streamed.text and reply["stats"]["finish_reason"] == "max_new_tokens"
    assert "".join(r["text"] for r in reply["tokens"]) == streamed.text


@pytest.mark.remote
@requires_llama_cpp
async def test_what_a_server_cannot_show_is_said_and_the_policy_is_partial(llama_server: str, tmp_path: Path) -> None:
    app = _app(tmp_path, ServerSpec(llama_server))
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, QUESTION)
        assert app.session is not None and not app.session.capabilities.reread_steps

        # the policy tab: the sampler chain over the server's top 8, and it says it is partial
        await pilot.press("alt+p")
        screen = app.screen
        assert isinstance(screen, InspectorScreen)
        await _until(pilot, lambda: screen.policy is not None, "the partial policy view")
        step = answer.steps[-1]
        assert screen.policy_note.startswith("partial (top 8 from the server)")
        assert "partial (top 8 from the server)" in str(screen.query_one("#policy-body").render())
        assert screen.policy.chosen_id == step.token_id
        assert [c.token_id for c in screen.policy.candidates] == [t.token_id for t in step.top]
        assert screen.policy.prob(step.token_id) == 1.0  # greedy: all on the chosen candidate
        # a what-if (F3: temperature up) recomputes it, still without the model
        await pilot.press("f3")
        await _until(pilot, lambda: screen.what_if is not None and screen.policy.params == screen.what_if, "what-if")
        # the softmax of the server's log-probabilities at the what-if's temperature, computed here
        temperature = screen.what_if.temperature
        assert temperature > 0
        weights = {t.token_id: math.exp((t.logit - step.top[0].logit) / temperature) for t in step.top}
        expected = weights[step.token_id] / sum(weights.values())
        assert screen.policy.prob(step.token_id) == pytest.approx(expected, rel=1e-6, abs=1e-12)

        # the prompt view, the layer views: one line on why not
        await pilot.press("alt+v")
        await _until(pilot, lambda: "not available" in str(screen.query_one("#prompt-counts").render()), "prompt")
        assert screen.prompt is None and "--tokenizer" in str(screen.query_one("#prompt-counts").render())
        await pilot.press("alt+y")
        await _until(pilot, lambda: "server" in str(screen.query_one("#layers-step").render()), "the layers note")
        await pilot.press("alt+l")
        await _until(pilot, lambda: screen.timeline is not None, "the timeline")
        assert "not reported" in str(screen.query_one("#timeline-prefill").render())
        await pilot.press("escape")

        # branching at a token: not through this protocol; said at once, no dialog, no failed answer
        await pilot.press("f8")
        await pilot.press("ctrl+b")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, InspectorScreen) and type(app.screen).__name__ == "Screen"
        assert any("Branching at a token is not available" in n for n in _notes(app))

        # regenerate: just another answer (greedy: the same one), beside the first
        await pilot.press("ctrl+r")
        await _until(pilot, lambda: not app.generating and len(app.conversation.messages) == 3, "the regenerated")
        await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "its stats")
        assert app.query(AssistantMessage).last().content_text == answer.content_text
        assert not any(a.has_class("failed") for a in app.query(AssistantMessage))


@pytest.mark.remote
@requires_llama_cpp
async def test_the_policy_view_follows_a_servers_answer_live(llama_server: str, tmp_path: Path) -> None:
    """Alt+P while a server's answer streams: the newest step's partial view (over the top N the
    server sent with it), frame by frame, each one a step of the answer's own."""
    app = _app(tmp_path, ServerSpec(llama_server), max_new_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: app.session is not None, "the server's session")
        app.query_one(PromptInput).text = "Write a long story about a dragon who learns to bake bread."
        app.simulate_key("enter")  # posted as the terminal would: Pilot.press waits for an idle CPU
        await _until(pilot, lambda: app.generating and len(app.query(AssistantMessage).last().tokens) >= 2, "tokens")
        app.simulate_key("alt+p")
        await _until(pilot, lambda: isinstance(app.screen, InspectorScreen), "the inspector")
        screen = app.screen
        assert isinstance(screen, InspectorScreen)
        seen = []
        for _ in range(2000):
            if screen.policy is not None and app.generating:
                seen.append((screen.policy, screen.policy_note))
            if not app.generating:
                break
            await pilot.pause(0.01)
        await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "the answer")
        assert seen, "no live view while the answer streamed"
        steps = app.query(AssistantMessage).last().steps
        for view, note in {id(v): (v, n) for v, n in seen}.values():
            assert note.startswith("partial (top")
            ids = [c.token_id for c in view.candidates]
            assert any(s.token_id == view.chosen_id and ids == [t.token_id for t in s.top] for s in steps)


@pytest.mark.remote
@requires_llama_cpp
async def test_a_server_cut_mid_answer_leaves_the_partial_answer_marked_and_saved(
    llama_server: str, tmp_path: Path
) -> None:
    parts = urlsplit(llama_server)
    proxy = FaultyProxy((parts.hostname or "", parts.port or 0), cut_after=4000)  # a few chunks in
    app = _app(tmp_path, ServerSpec(proxy.url), max_new_tokens=64)
    try:
        async with app.run_test(size=SIZE) as pilot:
            answer = await _send(pilot, app, QUESTION)
            done = answer.finished
            assert done is not None and done.reason == "error" and done.error
            assert answer.has_class("stopped") and not answer.has_class("failed")
            assert answer.content_text and answer.content_text == "".join(t.text for t in answer.tokens)
            assert "cut off: the server failed" in str(answer.query_one(".stats").render())
            assert any(done.error in n for n in _notes(app))
            saved = _saved(tmp_path)
            reply = saved["messages"][1]
            assert reply["content"] == answer.content_text and reply["stats"]["finish_reason"] == "error"
            assert reply["stats"]["error"] == done.error  # why, kept for the next time it is opened
            assert len(reply["tokens"]) == len(answer.tokens)

            # now the server hangs up before it answers: the next request fails before it starts
            proxy.cut_after = 0
            failed = await _send(pilot, app, "And of Italy?")
            assert failed.has_class("failed") and failed.finished is None
            # nothing was lost, and the empty answer is never sent as the model's own turn
            saved = _saved(tmp_path)
            assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
            assert saved["messages"][1]["content"] == answer.content_text
            assert saved["messages"][2]["content"] == "And of Italy?"
            sent = app.conversation.chat_messages()
            assert [m["role"] for m in sent] == ["user", "assistant", "user"]
            assert all(m["content"] for m in sent)
    finally:
        proxy.close()

    # opened again: the cut answer is still marked
    store = ConversationStore(tmp_path / "conversations")
    conversation = store.load(saved["id"])
    again = _app(tmp_path, ServerSpec(proxy.url), conversation=conversation)
    async with again.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: bool(again.query(AssistantMessage)), "the saved answers")
        first = again.query(AssistantMessage).first()
        assert first.content_text == answer.content_text and first.has_class("stopped")
        assert f"cut off: the server failed ({done.error})" in str(first.query_one(".stats").render())
        # the server stays unreachable: a note in the chat, not a traceback
        await _until(pilot, lambda: "Could not load the model" in _chat_text(again), "the connection note")


def _chat_text(app: LLMChatApp) -> str:
    return " ".join(str(w.render()) for w in app.query_one(ChatView).query(".note"))


async def test_a_server_that_is_not_there_is_a_note_not_a_crash(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    app = _app(tmp_path, ServerSpec(url))
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: "Could not load the model" in _chat_text(app), "the note", seconds=30)
        assert "cannot reach" in _chat_text(app) and app.session is None
        assert "no model" in app.query_one(StatusBar).line(0)
        app.query_one(PromptInput).text = "hello?"
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert any("not loaded" in n for n in _notes(app)) and not app.conversation.messages


@pytest.mark.remote
@requires_llama_cpp
async def test_resuming_a_servers_chat_reconnects_and_switching_to_a_local_model_closes_it(
    llama_server: str, tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    app = _app(tmp_path, ServerSpec(llama_server))
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, QUESTION)
    conversation = ConversationStore(tmp_path / "conversations").load(app.conversation.id)
    spec = saved_server(conversation)
    assert spec == ServerSpec(llama_server, model=app.session.info.name if app.session else None)

    folder = tiny_model("llama")
    again = _app(tmp_path, spec, conversation=conversation)
    async with again.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: again.session is not None, "the server again")
        remote_session = again.session
        assert isinstance(remote_session, RemoteSession)
        assert again.query(AssistantMessage).first().content_text == answer.content_text
        # the models screen: a registered local model, chosen, replaces the server's session
        from llmchat.models import add_model, add_remote_model

        add_model(folder, "tiny")
        add_remote_model("far", llama_server)
        await pilot.press("ctrl+l")
        await _until(pilot, lambda: isinstance(again.screen, ModelsScreen), "the models screen")
        models = again.screen
        assert isinstance(models, ModelsScreen) and [e.name for e in models.entries] == ["tiny", "far"]
        await pilot.press("up", "enter")  # the cursor starts on the server's row (● loaded): up to "tiny"
        await _until(pilot, lambda: isinstance(again.session, LocalSession), "the local model", seconds=60)
        assert remote_session._client.is_closed
        assert again.conversation.model.get("path") == str(folder) and "server" not in again.conversation.model
        assert "server" not in again.query_one(StatusBar).line(0)
        assert again.query_one(TopKPanel).source == "" and again.query_one(TopKPanel).border_title == "Top-k"
        assert "on the server" not in str(again.query_one(KVCachePanel).render())
        # …and back to the server, the registered one
        await pilot.press("ctrl+l")
        await _until(pilot, lambda: isinstance(again.screen, ModelsScreen), "the models screen again")
        await pilot.press("down", "enter")
        await _until(pilot, lambda: isinstance(again.session, RemoteSession), "the server once more")
        assert again.model is None and again.conversation.model["server"] == llama_server
        answer = await _send(pilot, again, "And of Italy?")
        assert answer.finished is not None and answer.finished.reason == "max_new_tokens"


def test_a_saved_server_chat_keeps_its_server_and_old_files_still_open(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "conversations")
    conversation = Conversation(model={"name": "m", "server": "http://127.0.0.1:1", "api_key_env": "MY_KEY"})
    conversation.add_user("hi")
    store.save(conversation)
    loaded = store.load(conversation.id)
    assert saved_server(loaded) == ServerSpec("http://127.0.0.1:1", model="m", api_key_env="MY_KEY")
    assert "sk-" not in (tmp_path / "conversations" / f"{conversation.id}.json").read_text(encoding="utf-8")
    local = Conversation(model={"name": "tiny", "path": "/models/tiny"})
    assert saved_server(local) is None
    ollama = Conversation(model={"name": "llama3.2", "server": "http://127.0.0.1:11434", "protocol": "ollama"})
    ollama.add_user("hi")
    store.save(ollama)
    assert saved_server(store.load(ollama.id)) == ServerSpec(
        "http://127.0.0.1:11434", model="llama3.2", protocol="ollama"
    )


def _step(tops: list[tuple[str, float]], chosen: str) -> TokenEvent:
    top = tuple(TopToken(i, text, math.log(p), p, math.nan) for i, (text, p) in enumerate(tops))
    index = next((t.token_id for t in top if t.text == chosen), len(top))
    prob = next((t.prob for t in top if t.text == chosen), 0.01)
    return TokenEvent(
        token_id=index, text=chosen, index=0, logit=math.log(prob), prob=prob, policy_prob=math.nan,
        rank=index, top=top, seconds=0.0, cache_tokens=0, cache_bytes=0,
    )  # fmt: skip


def test_the_partial_policy_runs_the_samplers_stages_over_the_servers_candidates() -> None:
    step = _step([("Paris", 0.6), ("Lyon", 0.2), ("Nice", 0.1)], "Paris")
    view = partial_policy_view(step, SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0))
    assert [c.text for c in view.candidates] == ["Paris", "Lyon", "Nice"] and view.chosen_id == step.token_id
    assert math.isclose(view.prob(0, "raw"), 0.6 / 0.9, rel_tol=1e-5)  # renormalized over the three
    assert view.prob(2) == 0.0 and math.isclose(view.prob(0), 0.75, rel_tol=1e-5)  # top-k 2 cut "Nice"
    # a token sampled from outside the server's top N is shown too
    outside = _step([("Paris", 0.6), ("Lyon", 0.2)], "Rome")
    view = partial_policy_view(outside, SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0))
    assert [c.text for c in view.candidates] == ["Paris", "Lyon", "Rome"] and view.chosen_id == outside.token_id
    # the repetition penalty sees the answer's earlier tokens among the candidates
    penalized = partial_policy_view(step, SamplingParams(temperature=1.0, repetition_penalty=2.0), before=[0])
    assert penalized.prob(0, "raw") > penalized.prob(0, "repetition_penalty")
