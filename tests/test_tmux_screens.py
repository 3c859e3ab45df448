"""The conversations screen in a real terminal (tmux): a word typed in one burst and a bracketed paste.

Pilot hands keys over one at a time and waits for each; a terminal delivers a word typed fast in
one read and a paste as one bracketed sequence. This drives the screen through tmux (no model
needed: a bare app pushes the screen over a store of saved conversations) and reads the screen
back with `capture-pane`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SESSION = "llmchat-screens-test"
ROOT = Path(__file__).resolve().parents[1]

HOST = """
import sys
sys.path.insert(0, {root!r})
from textual.app import App
from llmchat.chat.conversation import Conversation
from llmchat.chat.store import ConversationStore
from llmchat.tui.screens import ConversationsScreen

store = ConversationStore({store!r})
for number, title in enumerate(["Berlin trip", "Pasta recipe", "Rust lifetimes"]):
    conversation = Conversation(id=f"c{{number}}", model={{"name": "tiny-llama"}})
    conversation.add_user(f"{{title}}: tell me more")
    conversation.title = title
    store.save(conversation)


class Host(App[None]):
    def on_mount(self) -> None:
        self.push_screen(ConversationsScreen(store))


Host().run()
"""


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30).stdout


def _wait_for(condition: Callable[[str], bool], what: str, seconds: float = 60.0) -> str:
    deadline = time.monotonic() + seconds
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-t", SESSION)
        if condition(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{screen}")


def _search_line(screen: str) -> str:
    """The search box's text line (the one between its ▊ … ▎ edges that is not a rule)."""
    lines = [line for line in screen.splitlines() if "▊" in line and "▔" not in line and "▁" not in line]
    assert lines, screen
    return lines[0]


@pytest.fixture()
def conversations_screen(tmp_path: Path) -> Iterator[None]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    script = tmp_path / "host.py"
    script.write_text(HOST.format(root=str(ROOT), store=str(tmp_path / "conversations")), encoding="utf-8")
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("LLMCHAT_")}
    command = " ".join([*(f"{k}={v}" for k, v in env.items()), "TERM=tmux-256color", sys.executable, str(script)])
    _tmux("new-session", "-d", "-s", SESSION, "-x", "120", "-y", "30", command)
    try:
        _wait_for(lambda s: "Search titles" in s and "Rust lifetimes" in s, "the conversations screen")
        yield
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)


def test_a_word_typed_fast_in_the_list_is_searched_whole(conversations_screen: None) -> None:
    _tmux("send-keys", "-t", SESSION, "-l", "Berlin")  # one write: the app reads the word at once
    screen = _wait_for(lambda s: "Pasta recipe" not in s, "the list to filter")
    assert "Berlin" in _search_line(screen) and "Berlin trip" in screen, screen
    assert "Rust lifetimes" not in screen, screen


def test_a_bracketed_paste_over_the_list_goes_into_the_search_box(conversations_screen: None) -> None:
    _tmux("set-buffer", "Pasta")
    _tmux("paste-buffer", "-p", "-t", SESSION)  # -p: as a bracketed paste, as terminals send one
    screen = _wait_for(lambda s: "Berlin trip" not in s, "the list to filter")
    assert "Pasta" in _search_line(screen) and "Pasta recipe" in screen, screen
