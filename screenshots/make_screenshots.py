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

HERE = Path(__file__).resolve().parent
SIZE = (150, 44)
QUESTION = "What is the capital of France? Answer in two sentences."


async def _until(pilot: object, condition: object, seconds: float = 120.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():  # type: ignore[operator]
            return
        await pilot.pause(0.05)  # type: ignore[attr-defined]
    raise SystemExit("timed out waiting for the app")


async def shoot(model: Path, data_dir: Path) -> list[Path]:
    from llmchat.chat.store import ConversationStore
    from llmchat.engine import SamplingParams
    from llmchat.tui.app import LLMChatApp
    from llmchat.tui.widgets.messages import AssistantMessage
    from llmchat.tui.widgets.prompt import PromptInput

    written: list[Path] = []
    store = ConversationStore(data_dir / "conversations")
    app = LLMChatApp(model, store=store, sampling=SamplingParams(temperature=0.0))
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: app.model is not None)
        app.query_one(PromptInput).text = QUESTION
        await pilot.press("enter")

        def answering() -> bool:
            answers = app.query(AssistantMessage)
            return bool(answers) and len(answers.last().tokens) >= 10

        await _until(pilot, answering)
        written.append(Path(app.save_screenshot(filename="main-mid-answer.svg", path=str(HERE))))
        await _until(pilot, lambda: not app.generating)
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="panels.svg", path=str(HERE))))
        app.theme = "textual-light"
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(filename="light-theme.svg", path=str(HERE))))
    return written


def main() -> int:
    from llmchat.models import resolve_model

    model = resolve_model("demo")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LLMCHAT_DATA_DIR"] = tmp
        for path in asyncio.run(shoot(model, Path(tmp))):
            print(path.relative_to(HERE.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
