"""`llmchat` (the chat) exits non-zero with one line when the app crashes, the traceback in a log.

Textual ends an app on an exception nothing caught and returns from `App.run` as if all was well:
the chat used to print a screenful of traceback (with every frame's local variables, the user's
messages among them) and exit 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# `llmchat --model FOLDER` as the console script runs it, headless, with a bug planted in the app.
DRIVER = textwrap.dedent(
    """
    import sys
    from textual.app import App
    from llmchat.cli import main
    from llmchat.tui.app import LLMChatApp

    def headless(self, **options):
        return App.run(self, headless=True, **options)

    async def bug(self):
        raise RuntimeError("boom\\nover two lines")

    LLMChatApp.run = headless
    LLMChatApp._show_conversation = bug
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_crash_in_the_chat_exits_1_with_one_line_and_a_crash_log(tiny_model, llmchat_dirs: dict[str, Path]) -> None:
    folder = tiny_model("llama")
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, "--model", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    log = llmchat_dirs["cache"] / "crash.log"
    assert lines == [
        f"llmchat: error: the chat stopped on an unexpected error: RuntimeError: boom over two lines "
        f"(the traceback is in {log})"
    ], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    text = log.read_text(encoding="utf-8")
    assert text.startswith("llmchat ") and "Traceback (most recent call last)" in text
    assert "RuntimeError: boom" in text and "in bug" in text  # the planted bug's frame
