"""`llmchat --server URL` in a real terminal (tmux) against llama-cpp-python's server on the demo
model: the answer reaches the screen with the server's top-k in the panel, the conversation is saved
with the server, and `llmchat --resume` connects to that server again."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.remote_servers import llama_cpp_server, requires_llama_cpp
from tests.test_tmux import SESSION, _tmux, _wait_for, terminal  # noqa: F401 (terminal: the fixture)

pytestmark = [pytest.mark.slow, pytest.mark.remote, requires_llama_cpp]


@pytest.fixture()
def llama_server(demo_gguf: Path) -> Iterator[str]:
    with llama_cpp_server(demo_gguf) as url:
        yield url


def test_chat_in_tmux_against_a_server(terminal: Path, llama_server: str, llmchat_dirs: dict[str, Path]) -> None:  # noqa: F811
    host = llama_server.removeprefix("http://")
    command = f"{terminal} --server {llama_server} --temperature 0 --max-new-tokens 24"
    _tmux("send-keys", "-t", SESSION, command, "Enter")
    _wait_for(lambda s: f"server on {host}" in s and "runs on the server" in s, "the server's model", seconds=60)

    _tmux("send-keys", "-t", SESSION, "-l", "What is the capital of France?")
    _tmux("send-keys", "-t", SESSION, "Enter")
    screen = _wait_for(lambda s: "TTFT" in s and "token limit" in s, "the answer with its stats", seconds=120)
    # the top-k panel: the server's candidates, titled as the server's, with their probabilities
    assert "Top-k · from the server" in screen and "reported by the server" in screen, screen
    assert len(re.findall(r"\d+\.\d% ", screen)) >= 5 and "n/a" in screen, screen
    assert f"on the server {host}" in screen and "usage: not reported" in screen, screen

    _tmux("send-keys", "-t", SESSION, "C-q")
    _wait_for(lambda s: "Top-k" not in s, "the app to quit", seconds=30)
    files = list((llmchat_dirs["data"] / "conversations").glob("*.json"))
    assert len(files) == 1, files
    saved = json.loads(files[0].read_text(encoding="utf-8"))
    assert saved["model"]["server"] == llama_server and "path" not in saved["model"]
    answer = saved["messages"][1]["content"]
    assert answer.strip() and saved["messages"][1]["stats"]["finish_reason"] == "max_new_tokens"

    # --resume: the saved chat opens on the same server, its answer on screen
    _tmux("send-keys", "-t", SESSION, f"{terminal} --resume last", "Enter")
    words = answer.split()[0]
    screen = _wait_for(lambda s: f"server on {host}" in s and words in s, "the resumed chat", seconds=60)
    assert "What is the capital of France?" in screen
    _tmux("send-keys", "-t", SESSION, "C-q")
    _wait_for(lambda s: "Top-k" not in s, "the app to quit", seconds=30)
