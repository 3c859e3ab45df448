"""LocalSession: the engine in this process behind the calls the chat makes (llmchat/session/).

It takes messages, not token ids; keeps each answer's prompt ids and the chat tokens that keep ids
stable across turns; serializes every use of the model behind one lock; and reports the cache and
memory figures the panels show. Checked against the engine driven by hand on a tiny model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import llmchat
from llmchat.engine.events import Finished, PrefillDone, TokenEvent
from llmchat.engine.inspector import policy_view
from llmchat.engine.prompt import CHAT, ChatTokens, request_text
from llmchat.session import LocalSession

GREEDY = llmchat.SamplingParams(temperature=0)
TinyModelFactory = Callable[..., Path]
pytestmark = pytest.mark.usefixtures("one_thread")


def _session(tiny_model: TinyModelFactory, kind: str = "llama") -> LocalSession:
    return LocalSession(llmchat.load(tiny_model(kind), device="cpu", dtype="float32", context_length=256), top_k=4)


def _answer(session: LocalSession, messages: list[dict[str, str]], answer_id: str) -> list[object]:
    return list(session.answer(messages, answer_id=answer_id, mode=CHAT, sampling=GREEDY, max_new_tokens=6))


def test_an_answer_is_the_engines_answer_to_the_rendered_messages(tiny_model: TinyModelFactory) -> None:
    session = _session(tiny_model)
    messages = [{"role": "user", "content": "hello there"}]
    events = _answer(session, messages, "a1")
    model = llmchat.load(tiny_model("llama"), device="cpu", dtype="float32", context_length=256)
    ids = ChatTokens(model.tokenizer).encode(request_text(model, messages, CHAT), CHAT)
    expected = list(model.generate(ids, sampling=GREEDY, max_new_tokens=6, top_k=4))
    assert session.prompt_ids("a1") == ids and session.prompt_ids("other") is None
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [t.token_id for t in tokens] == [e.token_id for e in expected if isinstance(e, TokenEvent)]
    assert all(len(t.top) == session.capabilities.top_k == 4 for t in tokens)
    stats = session.cache_stats()
    cache = session.model.cache
    assert (stats.tokens, stats.capacity, stats.used_bytes, stats.capacity_bytes) == (
        cache.length,
        cache.capacity,
        cache.used_bytes,
        cache.nbytes,
    )
    session.forget_prompts()
    assert session.prompt_ids("a1") is None


def test_the_second_turn_reuses_the_first_through_the_chat_tokens(tiny_model: TinyModelFactory) -> None:
    session = _session(tiny_model)
    first = [{"role": "user", "content": "hello there"}]
    done = next(e for e in _answer(session, first, "a1") if isinstance(e, Finished))
    second = [*first, {"role": "assistant", "content": done.text}, {"role": "user", "content": "and again"}]
    prefill = next(e for e in _answer(session, second, "a2") if isinstance(e, PrefillDone))
    assert prefill.reused_tokens >= len(session.prompt_ids("a1") or []) - 1 > 0


def test_inspector_views_are_the_engines(tiny_model: TinyModelFactory) -> None:
    session = _session(tiny_model)
    messages = [{"role": "user", "content": "hello there"}]
    events = _answer(session, messages, "a1")
    answer = [e.token_id for e in events if isinstance(e, TokenEvent)]
    prompt = session.prompt_ids("a1") or []
    view = session.policy_view(prompt, None, answer[:2], GREEDY, answer[2], CHAT)
    generator = session.model.generator
    logits = generator.step_logits(prompt + answer[:2])
    expected = policy_view(
        logits, GREEDY, generator.token_text, context_ids=prompt + answer[:2], top=10, chosen_id=answer[2]
    )
    assert view == expected
    from_messages = session.policy_view(None, messages, answer[:2], GREEDY, answer[2], CHAT)  # ids rendered again
    assert from_messages == expected
    prompt_view = session.prompt_view(messages, CHAT)
    assert list(prompt_view.token_ids) == prompt and prompt_view.reused == len(prompt) - 1
    assert session.info.chat and session.info.name == session.model.package.name


def test_one_thread_at_a_time_uses_the_model(tiny_model: TinyModelFactory) -> None:
    """While an answer streams, an inspector's call waits for it (the KV cache is never shared)."""
    session = _session(tiny_model)
    messages = [{"role": "user", "content": "hello there"}]
    stream = session.answer(messages, answer_id="a1", mode=CHAT, sampling=GREEDY, max_new_tokens=6)
    next(stream)  # the answer holds the model now
    finished: list[float] = []
    waiter = threading.Thread(target=lambda: (session.prompt_view(messages, CHAT), finished.append(time.monotonic())))
    waiter.start()
    time.sleep(0.2)
    assert not finished, "the inspector ran while the answer held the model"
    released = time.monotonic()
    assert isinstance(list(stream)[-1], Finished)  # the answer runs to its end, then lets go
    waiter.join(10)
    assert finished and finished[0] >= released
    assert torch.get_num_threads() == 1  # the module's one-thread fixture is in force
