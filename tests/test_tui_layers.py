"""The inspector's layer views in the chat, driven with Pilot on tiny random models through the real
engine: the layers tab shows the engine's own view of the step under the cursor ([ ] and { } walk
layers and heads), the surprise tab the prompt heatmap, the quantization tab its comparison (or why
there is none); the numbers are the session's, checked against engine/inside.py directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmchat.engine.inside import inside_step, prompt_heatmap
from llmchat.session import LocalSession
from llmchat.tui.screens.inspector import InspectorScreen
from tests.test_inspector import _inspector
from tests.test_tui_actions import SIZE, _app, _drawn, _send, _until


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_model

    return build_tiny_model("gemma2", tmp_path_factory.mktemp("layers") / "gemma2")  # windows and soft caps


async def test_the_layers_tab_shows_the_steps_views_and_walks_layers_and_heads(folder: Path, tmp_path: Path) -> None:
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "hello there")
        await pilot.press("f8")  # the cursor on the last token
        await pilot.press("f8")  # and one before it
        index = len(answer.steps) - 2
        screen = await _inspector(pilot, app, "alt+y")
        await _until(pilot, lambda: screen.inside is not None, "the layer views")
        step = screen.inside
        assert step is not None
        session = app.session
        assert isinstance(session, LocalSession)
        prompt_ids = session.prompt_ids(answer.message_id)
        assert prompt_ids is not None
        answer_ids = [t.token_id for t in answer.tokens]
        expected = inside_step(session.model.generator, prompt_ids + answer_ids[:index], answer_ids[index])
        assert step == expected  # the session's numbers, for the step under the cursor
        lens = "\n".join(_drawn(screen.query_one("#layers-lens")))
        assert "Logit lens" in lens and f"{step.lens[-1].chosen_prob:6.1%}".strip() in lens
        attention = lambda: "\n".join(_drawn(screen.query_one("#layers-attention")))  # noqa: E731
        assert "layer 0 · all 4 heads averaged" in attention()
        await pilot.press("right_square_bracket")
        await _until(pilot, lambda: "layer 1 ·" in attention(), "the next layer")
        assert screen.attention_layer == 1
        await pilot.press("right_curly_bracket")
        await _until(pilot, lambda: "head 1 of 4" in attention(), "the first head")
        windows = [a.window for a in step.attention]
        assert any(windows)  # Gemma 2's sliding layers say so in their title
        await pilot.press("left_square_bracket")
        await _until(pilot, lambda: "layer 0 ·" in attention(), "the first layer again")
        assert ("sliding window" in attention()) == (windows[0] is not None)


async def test_the_surprise_tab_is_the_prompt_heatmap(folder: Path, tmp_path: Path) -> None:
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "hello there")
        screen = await _inspector(pilot, app, "alt+u")
        await _until(pilot, lambda: screen.heatmap is not None, "the heatmap")
        session = app.session
        assert isinstance(session, LocalSession)
        prompt_ids = session.prompt_ids(answer.message_id)
        assert prompt_ids is not None
        assert screen.heatmap == prompt_heatmap(session.model.generator, prompt_ids)
        drawn = "\n".join(_drawn(screen.query_one("#surprise-body")))
        assert "How surprising each prompt token was" in drawn and "Most surprising" in drawn

        # the cursor: on the most surprising token first, then , and . move it; each token it lands on
        # shows its own probability, rank and what the model expected there (its top candidates)
        heatmap = screen.heatmap
        scored = [t for t in heatmap if t.prob is not None]
        assert screen.heatmap_cursor == max(scored, key=lambda t: -math.log2(t.prob)).index
        for key, step in (("full_stop", 1), ("comma", -1), ("comma", -1)):
            before = screen.heatmap_cursor
            await pilot.press(key)
            assert screen.heatmap_cursor == (before + step) % len(heatmap)
        token = heatmap[screen.heatmap_cursor]
        drawn = "\n".join(_drawn(screen.query_one("#surprise-body")))
        assert f"position {token.index} of {len(heatmap)}: " in drawn
        if token.prob is not None:
            assert f"p {token.prob:.3%} · rank {token.rank}" in drawn and "expected here:" in drawn
            assert token.top and all(f"{c.prob:8.3%}" in drawn for c in token.top)
        await pilot.press("home")  # other keys leave it alone
        assert heatmap[screen.heatmap_cursor] is token


async def test_the_quantization_tab_says_a_float_model_has_nothing_to_compare(folder: Path, tmp_path: Path) -> None:
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _send(pilot, app, "hello there")
        screen = await _inspector(pilot, app, "alt+q")
        body = lambda: "\n".join(_drawn(screen.query_one("#quantization-body")))  # noqa: E731
        await _until(pilot, lambda: "not packed" in body(), "the note")
        assert screen.quantization is None and isinstance(app.screen, InspectorScreen)


async def test_the_quantization_tab_compares_a_packed_answer(tiny_gguf, tmp_path: Path) -> None:
    path = tiny_gguf("llama", "Q4_0")
    app = _app(path, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "hello there")
        screen = await _inspector(pilot, app, "alt+q")
        await _until(pilot, lambda: screen.quantization is not None, "the comparison", seconds=60)
        tokens = screen.quantization
        assert tokens is not None and [t.token_id for t in tokens] == [t.token_id for t in answer.tokens]
        assert "mean KL" in "\n".join(_drawn(screen.query_one("#quantization-body")))
