"""The installed `llmchat` in a real terminal (tmux): keys reach the app, the demo model answers.

Drives `llmchat --model <demo gguf>` with `tmux send-keys` and reads the screen with
`capture-pane`, so it proves what Pilot cannot: the key bindings arrive through a terminal
multiplexer, the app starts from its console script, and it quits leaving the conversation saved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.float_reference import assert_follows_float_reference

pytestmark = pytest.mark.slow

SESSION = "llmchat-test"


def _tmux(*args: str) -> str:
    result = subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30)
    return result.stdout


def _screen() -> str:
    return _tmux("capture-pane", "-p", "-t", SESSION)


def _wait_for(condition: Callable[[str], bool], what: str, seconds: float = 180.0) -> str:
    deadline = time.monotonic() + seconds
    screen = ""
    while time.monotonic() < deadline:
        screen = _screen()
        if condition(screen):
            return screen
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{screen}")


@pytest.fixture()
def terminal(llmchat_dirs: dict[str, Path]) -> Iterator[Path]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    script = Path(sys.executable).with_name("llmchat")
    if not script.exists():
        pytest.skip("the llmchat console script is not installed in this environment")
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("LLMCHAT_")}
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    _tmux("new-session", "-d", "-s", SESSION, "-x", "150", "-y", "45", "bash", "--norc", "--noprofile")
    _tmux("send-keys", "-t", SESSION, f"export {exports} TERM=tmux-256color", "Enter")
    yield script
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)


def _press(key: str, condition: Callable[[str], bool], what: str) -> str:
    """Send one key through tmux and wait for the screen it should lead to."""
    _tmux("send-keys", "-t", SESSION, key)
    return _wait_for(condition, what)


def test_chat_in_tmux_answers_shows_panels_takes_keys_and_saves(
    terminal: Path, demo_gguf: Path, llmchat_dirs: dict[str, Path]
) -> None:
    _tmux("send-keys", "-t", SESSION, f"{terminal} --model {demo_gguf} --temperature 0 --max-new-tokens 200", "Enter")
    _wait_for(lambda s: "ctx 0/" in s, "the model to load")

    _tmux("send-keys", "-t", SESSION, "-l", "What is the capital of France?")
    _tmux("send-keys", "-t", SESSION, "Enter")
    # The answer's own stats line (TTFT) says it finished; its words depend on the CPU's kernels.
    screen = _wait_for(lambda s: "tok/s" in s and "TTFT" in s, "the answer with its stats")

    # The KV-cache panel shows numbers (tokens of a capacity), the top-k panel its candidates.
    kv = re.search(r"(\d[\d,]*) / (\d[\d,]*) tokens", screen)
    assert kv is not None and int(kv.group(1).replace(",", "")) > 0, screen
    assert "Top-k" in screen and re.search(r"\d+\.\d%", screen), screen

    assert "temp greedy" in screen, screen  # --temperature 0
    _press("F3", lambda s: "temp 0.10" in s, "the temperature to change")

    # The inspection and branch keys arrive through tmux too.
    # F8: the last answer's tokens; the top-k panel follows the cursor
    _press("F8", lambda s: re.search(r"token \d+/\d+|end of answer", s) is not None, "the token cursor")
    _tmux("send-keys", "-t", SESSION, "C-r")  # regenerate: a second answer beside the first
    _tmux("send-keys", "-t", SESSION, "C-c")  # Ctrl+C never quits mid-answer
    # The answer's own stats line (not the status bar's tok/s) says the regenerated answer finished;
    # branch keys wait for that.
    _wait_for(lambda s: "‹2/2›" in s and "TTFT" in s, "the regenerated answer")
    _press("M-Left", lambda s: "‹1/2›" in s, "the first branch")
    # The inspector's Alt keys: the heatmap, the branch dialog, the three inspector tabs.
    _press("M-t", lambda s: "p(token)" in s and "≥90%" in s, "the token heatmap")
    _press("C-b", lambda s: "Branch at token" in s, "the branch dialog")
    _press("Escape", lambda s: "Branch at token" not in s, "the branch dialog to close")
    _press("M-p", lambda s: "sampled from" in s and "raw logits" in s, "the policy view")
    _press("M-v", lambda s: "to prefill" in s and "<|im_start|>" in s, "the prompt view")
    _press("M-l", lambda s: "ms/token" in s and "chunk 1" in s, "the timeline")
    # The layer views, computed on demand for the step under the cursor.
    _press("M-y", lambda s: "Logit lens" in s and re.search(r"^\s+29 attn", s, re.M) is not None, "the logit lens")
    _press("M-u", lambda s: "How surprising" in s and "Most surprising" in s, "the prompt heatmap")
    _press("M-q", lambda s: "KL bits" in s and "float p" in s, "the quantization view")
    _press("Escape", lambda s: "KV cache" in s and "p(token)" in s, "the chat with its heatmap")
    _press("Escape", lambda s: "p(token)" not in s, "the answer's text")
    _press("F1", lambda s: "Temperature up" in s, "the help screen")
    _press("Escape", lambda s: "Temperature up" not in s, "the help screen to close")
    _press("C-o", lambda s: "Search titles" in s and "What is the capital" in s, "the conversations screen")
    _press("Escape", lambda s: "Search titles" not in s, "the conversations screen to close")

    _tmux("send-keys", "-t", SESSION, "C-q")
    _wait_for(lambda s: "Top-k" not in s, "the app to quit", seconds=30)

    files = list((llmchat_dirs["data"] / "conversations").glob("*.json"))
    assert len(files) == 1, files
    saved = json.loads(files[0].read_text(encoding="utf-8"))
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "assistant"]
    first, second = saved["messages"][1:]
    assert first["parent"] == second["parent"]  # siblings: the regenerated answer is a branch
    # Not which words (the CPU's kernels decide near-ties): a saved answer made of its own tokens,
    # each one the float32 reference of the same weights rates at the top.
    steps = [record for record in first["tokens"] if not record.get("end")]
    assert first["content"].strip() and "".join(record["text"] for record in steps) == first["content"]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert_follows_float_reference(demo_gguf, question, [(r["id"], r["top"][r["rank"]][2]) for r in steps])
    assert saved["current"] == first["id"]  # Alt+Left showed the first branch, and that was saved
