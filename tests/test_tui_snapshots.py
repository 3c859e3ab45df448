"""Snapshot tests (pytest-textual-snapshot) of the chat's main screen, its panels and its dialogs.

A snapshot must not change from run to run, so these draw a saved conversation (text, stats and
per-token top-k as the app saved them) and feed the panels fixed numbers in the shapes the
engine's events and memory math produce; timings and measured memory would differ every run.
Regenerate after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmchat.chat.conversation import Conversation, token_record
from llmchat.chat.store import ConversationStore
from llmchat.engine import SamplingParams
from llmchat.engine.events import TokenEvent, TopToken
from llmchat.engine.memory import MemoryEstimate, MemoryUsage
from llmchat.settings import Settings
from llmchat.tui.app import LLMChatApp
from llmchat.tui.widgets.panels import CacheState, KVCachePanel, MemoryPanel
from llmchat.tui.widgets.status import StatusBar

SIZE = (130, 40)
MiB = 1024**2
ANSWER = [" The", " capital", " of", " France", " is", " **", "Paris", "**", "."]
ALTERNATIVES = {"Paris": [("Paris", 0.91), ("Lyon", 0.04), ("Marseille", 0.02), ("Nice", 0.01)]}
CODE = "Here is a loop:\n\n```python\nfor city in ['Paris', 'Lyon']:\n    print(city)\n```\n"


def _token(i: int, text: str) -> TokenEvent:
    choices = ALTERNATIVES.get(text, [(text, 0.8), (" a", 0.1), (" the", 0.05)])
    top = tuple(
        TopToken(100 + n, word, 10.0 - n, prob, prob / 0.95 if n < 2 else 0.0) for n, (word, prob) in enumerate(choices)
    )
    return TokenEvent(
        token_id=100, text=text, index=i, logit=10.0, prob=top[0].prob, policy_prob=top[0].policy_prob, rank=0,
        top=top, seconds=0.05, cache_tokens=40 + i, cache_bytes=0,
    )  # fmt: skip


def saved_conversation() -> Conversation:
    conversation = Conversation(
        id="snapshot", title="What is the capital of France?", created="2026-11-25T10:00:00+00:00",
        updated="2026-11-25T10:05:00+00:00", model={"name": "SmolLM2-135M-Instruct"},
        sampling={"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.0},
    )  # fmt: skip
    conversation.add_user("What is the capital of France?")
    tokens = [token_record(_token(i, t)) for i, t in enumerate(ANSWER)]
    conversation.add_assistant(
        "".join(ANSWER).strip(), stats={"tokens": len(ANSWER), "decode_tok_s": 31.2}, tokens=tokens
    )
    conversation.add_user("Show me a loop over two cities in Python.")
    conversation.add_assistant(CODE, stats={"tokens": 28, "decode_tok_s": 30.4})
    conversation.updated = "2026-11-25T10:05:00+00:00"  # adding messages touched it
    return conversation


def _app(tmp_path: Path, **options: Any) -> LLMChatApp:
    return LLMChatApp(
        None,
        store=ConversationStore(tmp_path / "conversations"),
        conversation=saved_conversation(),
        sampling=SamplingParams(temperature=0.7, top_k=40, top_p=0.9),
        **options,
    )


async def _fixed_panels(pilot: Any) -> None:
    """The panels and status bar as they look mid-chat, with fixed numbers."""
    app: LLMChatApp = pilot.app
    app.query_one(KVCachePanel).show(
        CacheState(tokens=412, capacity=2048, bytes_used=18 * MiB, bytes_capacity=90 * MiB, reused=371, prefilled=41)
    )
    estimate = MemoryEstimate(
        weights=513 * MiB, kv_cache=90 * MiB, kv_cache_windowed=90 * MiB, activations=60 * MiB,
        runtime=240 * MiB, load_transient=0,
    )  # fmt: skip
    app.query_one(MemoryPanel).show(estimate, MemoryUsage("RAM", 880 * MiB, 912 * MiB, 603 * MiB))
    app.query_one(StatusBar).change(
        model="SmolLM2-135M-Instruct", device="cpu", precision="float32 · Q4_1", context_tokens=412,
        context_capacity=2048, tokens_per_second=31.2, activity="",
    )  # fmt: skip
    await pilot.pause()


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def test_main_screen(tmp_path: Path, snap_compare: Callable[..., bool]) -> None:
    """Chat with Markdown answers (a code block), stats lines, panels and status bar."""
    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=_fixed_panels)


def test_panels_follow_a_selected_token(tmp_path: Path, snap_compare: Callable[..., bool]) -> None:
    """F8 opens the token strip of the last answer with tokens; the top-k panel shows that step."""

    async def select(pilot: Any) -> None:
        await _fixed_panels(pilot)
        await pilot.press("f8", "f8", "f8")  # last token, then two back: "Paris"
        await pilot.pause()

    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=select)


def test_light_theme(tmp_path: Path, snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(
        _app(tmp_path, settings=Settings(theme="llmchat-light")), terminal_size=SIZE, run_before=_fixed_panels
    )


def test_conversations_screen_in_the_app(tmp_path: Path, utc: None, snap_compare: Callable[..., bool]) -> None:
    """Ctrl+O over the chat: the saved conversation listed, and an unreadable file with its reason."""
    store = ConversationStore(tmp_path / "conversations")
    store.save(saved_conversation())
    (store.directory / "broken.json").write_text("{not json", encoding="utf-8")

    async def open_list(pilot: Any) -> None:
        await _fixed_panels(pilot)
        pilot.app.clear_notifications()
        await pilot.press("ctrl+o")
        await pilot.pause()

    app = LLMChatApp(None, store=store, sampling=SamplingParams(temperature=0.7, top_k=40, top_p=0.9))
    assert snap_compare(app, terminal_size=SIZE, run_before=open_list)


# --- the inspector ------------------------------------------------------------------------------


def test_token_heatmap(tmp_path: Path, snap_compare: Callable[..., bool]) -> None:
    """Alt+T: the answer as probability-coloured token chips with the legend; the cursor two back."""

    async def heatmap(pilot: Any) -> None:
        await _fixed_panels(pilot)
        await pilot.press("alt+t", "f8", "f8")
        await pilot.pause()

    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=heatmap)


CITIES = [" Paris", " Lyon", " Marseille", " Nice", " Toulouse", " the", " a", " France", " Bordeaux", " Lille"]


def _fixed_policy() -> Any:
    """A policy view over fixed logits (the app computes the same from a step's real logits)."""
    import torch

    from llmchat.engine.inspector import policy_view

    logits = torch.tensor([9.0, 6.5, 6.1, 5.2, 4.9, 4.0, 3.1, 2.2, 4.4, 3.9] + [0.0] * 40)
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05)
    return policy_view(logits, params, lambda i: CITIES[i] if i < len(CITIES) else f"<{i}>", chosen_id=0)


def test_policy_view(tmp_path: Path, snap_compare: Callable[..., bool]) -> None:
    """Alt+P: each stage of the sampler chain, what it cut, and every candidate's probability after it."""
    from llmchat.tui.screens.inspector import InspectorScreen
    from llmchat.tui.widgets.inspector import step_title

    async def policy(pilot: Any) -> None:
        await _fixed_panels(pilot)
        await pilot.press("f8", "f8", "f8", "alt+p")
        await pilot.pause()
        screen = pilot.app.screen
        assert isinstance(screen, InspectorScreen)
        token = pilot.app._token_answer.tokens[6]
        screen.show_policy(step_title(token, 6, 9), _fixed_policy())
        await pilot.pause()

    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=policy)


def test_prompt_view(tmp_path: Path, snap_compare: Callable[..., bool]) -> None:
    """Alt+V: the next request as rendered, token by token with ids; the cached part marked."""
    from llmchat.engine.inspector import PromptView
    from llmchat.tui.screens.inspector import InspectorScreen

    pieces = ["<|im_start|>", "user", "\n", "What", " is", " the", " capital", " of", " France", "?", "<|im_end|>",
              "\n", "<|im_start|>", "assistant", "\n", "Paris", ".", "<|im_end|>", "\n", "<|im_start|>", "user", "\n",
              "And", " Italy", "?", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]  # fmt: skip
    view = PromptView("".join(pieces), tuple(range(1, len(pieces) + 1)), tuple(pieces), reused=19)

    async def prompt(pilot: Any) -> None:
        await _fixed_panels(pilot)
        await pilot.press("alt+v")
        await pilot.pause()
        screen = pilot.app.screen
        assert isinstance(screen, InspectorScreen)
        screen.show_prompt(view)
        await pilot.pause()

    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=prompt)


def test_timeline(tmp_path: Path, snap_compare: Callable[..., bool]) -> None:
    """Alt+L on a saved answer: its prefill chunks and a bar per decode step, from the saved timings."""
    conversation = saved_conversation()
    answer = next(m for m in conversation.path() if m.role == "assistant")
    assert answer.tokens is not None
    for i, record in enumerate(answer.tokens):
        record["seconds"] = 0.4 if i == 0 else 0.029 + 0.0015 * i + (0.004 if i % 3 == 0 else 0.0)
    answer.stats = {**(answer.stats or {}), "prompt_tokens": 1180, "reused_tokens": 0,
                    "prefill_chunks": [[512, 1.41], [512, 1.46], [156, 0.47]]}  # fmt: skip

    async def timeline(pilot: Any) -> None:
        await _fixed_panels(pilot)
        await pilot.press("f8", "alt+l")
        await pilot.pause()

    app = LLMChatApp(
        None,
        store=ConversationStore(tmp_path / "c"),
        conversation=conversation,
        sampling=SamplingParams(temperature=0.7),
    )
    assert snap_compare(app, terminal_size=SIZE, run_before=timeline)
