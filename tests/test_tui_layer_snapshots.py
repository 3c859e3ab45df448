"""Snapshot tests of the inspector's layer views (Layers, Surprise, Quantization) with fixed numbers.

The views' numbers come from the model and differ with the CPU's kernels, so these draw fixed views
in the shapes engine/inside.py produces (tests/test_inside.py checks the numbers themselves against
transformers; tests/test_tui_layers.py that the chat shows the session's). The app is the saved
conversation of tests/test_tui_snapshots.py, no model loaded. Regenerate after an intended change
with `pytest tests/test_tui_layer_snapshots.py --snapshot-update` and look at the SVGs first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.text import Text

from llmchat.engine.inside import (
    AnswerExperts,
    AttentionPattern,
    Candidate,
    LayerReadout,
    PromptToken,
    QuantizedToken,
    Route,
    StateChange,
    StepInside,
)
from tests.test_tui_snapshots import SIZE, _app, _fixed_panels

TEXTS = ["<|im_start|>", "user", "\n", "What", " is", " the", " capital", " of", " France", "?", "<|im_end|>", "\n",
         "<|im_start|>", "assistant", "\n", " The", " capital", " of", " France", " is"]  # fmt: skip
LENS_WORDS = [" the", " a", " Paris", " Lyon", " France"]


def _step() -> StepInside:
    """A four-layer hybrid MoE step: the answer token " Paris" appears in the last two layers."""
    lens = []
    for layer, kind in enumerate(["embedding", "attention", "conv", "attention", "attention"], start=-1):
        paris = (0.0, 0.01, 0.02, 0.41, 0.87)[layer + 1]
        rest = [(w, (1 - paris) / (n + 2)) for n, w in enumerate(w for w in LENS_WORDS if w != " Paris")]
        top = sorted([(" Paris", paris), *rest], key=lambda c: -c[1])
        candidates = tuple(Candidate(100 + LENS_WORDS.index(w), w, p) for w, p in top)
        rank = [w for w, _ in top].index(" Paris")
        norm, mixer, mlp = 3.1 + 40 * (layer + 1), max(0, 12.5 + layer), max(0, 20.25 + 3 * layer)
        lens.append(
            LayerReadout(
                layer, kind, candidates, paris, rank, norm, mixer if layer >= 0 else 0, mlp if layer >= 0 else 0
            )
        )
    n = len(TEXTS)
    recent = tuple(round(0.5 ** (n - i), 4) for i in range(n))
    to_france = tuple(0.6 if i == 8 else 0.4 / (n - 1) for i in range(n))
    attention = (
        AttentionPattern(0, None, (0, 0, 1, 1), (recent, to_france, recent, to_france), None),
        AttentionPattern(2, 8, (0, 0, 1, 1), (to_france,) * 4, None),
        AttentionPattern(3, None, (0, 0, 1, 1), (to_france, recent, to_france, recent), None),
    )
    routes = tuple(Route(layer, (3, 5), (0.71, 0.29)) for layer in (0, 2, 3))
    states = (StateChange(1, "conv", 6144, 12.75, 1.5),)
    return StepInside(len(TEXTS) - 1, 102, tuple(lens), attention, routes, states)


def _experts() -> AnswerExperts:
    routes = tuple(Route(layer, (3, 5), (0.71, 0.29)) for layer in (0, 2, 3))
    return AnswerExperts(tokens=(routes,) * 5, load={0: (0, 1, 0, 5, 0, 4, 0, 0), 2: (2, 0, 0, 5, 0, 3, 0, 0)})


def _heatmap() -> tuple[PromptToken, ...]:
    probs = [None, 0.9, 0.97, 0.02, 0.6, 0.7, 0.04, 0.85, 0.003, 0.5, 0.8, 0.99, 0.96, 0.99, 0.98]
    tokens = []
    for i, (text, prob) in enumerate(zip(TEXTS, probs, strict=False)):
        top = () if prob is None else (Candidate(7, " Who", 0.3), Candidate(8, " How", 0.2))
        rank = None if prob is None else (0 if prob > 0.5 else 4 + i)
        entropy = None if prob is None else 1.5 + i / 10
        tokens.append(PromptToken(i, 10 + i, text, prob, rank, entropy, top))
    return tuple(tokens)


def _quantized() -> tuple[QuantizedToken, ...]:
    words = [(" The", 0.14, 0.152, 1, 0, 0.0312), (" capital", 0.98, 0.981, 0, 0, 0.0004), (" of", 0.99, 0.99, 0, 0, 0),
             (" France", 0.989, 0.988, 0, 0, 0.0001), (" is", 0.965, 0.961, 0, 0, 0.0009),
             (" Paris", 0.95, 0.93, 0, 0, 0.0015)]  # fmt: skip
    out = []
    for i, (text, prob, ref, rank, ref_rank, kl) in enumerate(words):
        greedy, ref_greedy = (20, 10) if rank else (10 + i, 10 + i)
        out.append(QuantizedToken(i, 10 + i, text, kl, prob, ref, rank, ref_rank, greedy, ref_greedy, text))
    return tuple(out)


async def _open(pilot: Any, key: str) -> Any:
    from llmchat.tui.screens.inspector import InspectorScreen

    await _fixed_panels(pilot)
    await pilot.press("f8", key)
    await pilot.pause()
    screen = pilot.app.screen
    assert isinstance(screen, InspectorScreen)
    return screen


def test_layers_view(tmp_path: Path, snap_compare: Callable[..., bool]) -> None:
    """Alt+Y: the logit lens layer by layer, attention over the chips (] to a sliding layer), the
    step's experts and the answer's expert load, the recurrent layer's state."""

    async def layers(pilot: Any) -> None:
        screen = await _open(pilot, "alt+y")
        title = Text('Step 4 of 5 · token " Paris" (id 102)', style="bold")
        screen.show_layers(title, _step(), TEXTS, _experts())
        await pilot.press("right_square_bracket")  # the sliding layer, its window marked
        await pilot.pause()

    assert snap_compare(_app(tmp_path), terminal_size=(130, 60), run_before=layers)


def test_surprise_view(tmp_path: Path, snap_compare: Callable[..., bool]) -> None:
    """Alt+U: the prompt as a heatmap of its own probabilities, the most surprising tokens listed."""

    async def surprise(pilot: Any) -> None:
        screen = await _open(pilot, "alt+u")
        screen.show_heatmap(_heatmap())
        await pilot.pause()

    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=surprise)


def test_quantization_view(tmp_path: Path, snap_compare: Callable[..., bool]) -> None:
    """Alt+Q: the packed answer against the float32 reference; the first step's greedy flip marked."""

    async def quantization(pilot: Any) -> None:
        screen = await _open(pilot, "alt+q")
        screen.show_quantization(_quantized())
        await pilot.pause()

    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=quantization)
