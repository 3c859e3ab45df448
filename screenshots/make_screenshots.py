"""Make the SVG screenshots in this folder from the real app on the demo model.

    python screenshots/make_screenshots.py

Pulls the demo model if needed (see `llmchat models pull demo`), asks it a question in a headless
Textual session (the same `App.run_test()` the tests use), and saves what the screen shows.
Conversations go to a temporary folder, not to your data dir.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIZE = (150, 44)
QUESTION = "What is the capital of France? Tell me three things to see there."
# The model's own defaults (temperature 0.7, top-k 40, top-p 0.95, min-p 0.05), seeded: greedy decoding
# of a 135M model falls into a loop, and a screenshot should show a typical answer.
SAMPLING = {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 11}


async def _until(pilot: object, condition: object, what: str, seconds: float = 600.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():  # type: ignore[operator]
            return
        await pilot.pause(0.05)  # type: ignore[attr-defined]
    raise SystemExit(f"timed out waiting for {what}")


async def _inspector(pilot: Any, app: Any, key: str) -> Any:
    """Press an inspector key; the inspector screen once it is on top."""
    from llmchat.tui.screens.inspector import InspectorScreen

    await pilot.press(key)
    await _until(pilot, lambda: isinstance(app.screen, InspectorScreen), "the inspector")
    return app.screen


async def shoot(model: Path, data_dir: Path) -> list[Path]:
    from llmchat.chat.store import ConversationStore
    from llmchat.engine import SamplingParams
    from llmchat.tui.app import LLMChatApp
    from llmchat.tui.widgets.messages import AssistantMessage
    from llmchat.tui.widgets.prompt import PromptInput

    written: list[Path] = []
    store = ConversationStore(data_dir / "conversations")
    app = LLMChatApp(model, store=store, sampling=SamplingParams(**SAMPLING))
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: app.model is not None, "the model to load")
        app.query_one(PromptInput).text = QUESTION
        await pilot.press("enter")

        def answering() -> bool:
            answers = app.query(AssistantMessage)
            return bool(answers) and (len(answers.last().tokens) >= 12 or not app.generating)

        await _until(pilot, answering, "the first tokens")
        written.append(Path(app.save_screenshot(filename="main-mid-answer.svg", path=str(HERE))))
        await _until(pilot, lambda: not app.generating, "the answer")
        await pilot.pause(0.5)
        await pilot.press("f8", *["f8"] * 6)  # the token cursor, 7 tokens back: the top-k panel follows
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="panels.svg", path=str(HERE))))
        await pilot.press("alt+t")  # the heatmap with token boundaries and ids
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="token-heatmap.svg", path=str(HERE))))

        screen = await _inspector(pilot, app, "alt+p")  # the sampler chain of the step under the cursor
        await _until(pilot, lambda: screen.policy is not None, "the policy view")
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="policy-view.svg", path=str(HERE))))
        await pilot.press("alt+l")
        await _until(pilot, lambda: screen.timeline is not None, "the timeline")
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="timeline.svg", path=str(HERE))))
        await pilot.press("alt+y")  # inside the layers at the step under the cursor
        await _until(pilot, lambda: screen.inside is not None, "the layer views")
        await pilot.press(*["right_square_bracket"] * 20)  # a late layer, where attention gathers
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="layers.svg", path=str(HERE))))
        await pilot.press("alt+u")  # how surprising each prompt token was
        await _until(pilot, lambda: screen.heatmap is not None, "the prompt heatmap")
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="surprise.svg", path=str(HERE))))
        await pilot.press("alt+q")  # the answer under the float32 reference of the same file
        await _until(pilot, lambda: screen.quantization is not None, "the quantization view")
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="quantization.svg", path=str(HERE))))
        await pilot.press("escape")
        await pilot.pause(0.2)
        app.query_one(PromptInput).text = "And what is the best time of year to visit?"
        screen = await _inspector(pilot, app, "alt+v")  # the next request as the model will see it
        await _until(pilot, lambda: screen.prompt is not None, "the prompt view")
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="prompt-view.svg", path=str(HERE))))
        await pilot.press("escape")
        app.query_one(PromptInput).text = ""
        await pilot.press("escape", "ctrl+o")
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="conversations.svg", path=str(HERE))))
        await pilot.press("escape", "f1")
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="help.svg", path=str(HERE))))
        await pilot.press("escape")
        app.theme = "llmchat-light"
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="light-theme.svg", path=str(HERE))))
    return written


def main() -> int:
    from llmchat.models import resolve_model

    model = resolve_model("demo")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LLMCHAT_DATA_DIR"] = tmp
        os.environ["LLMCHAT_CONFIG_DIR"] = tmp  # shipped themes and default settings only
        for path in asyncio.run(shoot(model, Path(tmp))):
            print(path.relative_to(HERE.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
