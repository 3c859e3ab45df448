"""What an empty chat shows once the model is loaded: the model, its kind, and the keys to start with.

A first run otherwise opens on a blank chat area. The welcome is a widget only, never part of the
conversation: the chat view is cleared and redrawn when the first message goes in, and it goes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rich.text import Text
from textual.widgets import Static

# What each kind of model does in the chat (the kinds `llmchat info` reports).
KIND_LINES = {
    "base": "a base model (no chat template): the chat is one text it continues",
    "chat": "a chat model",
    "reasoning": "a reasoning model: its thinking streams into a block of its own",
}


def key_label(key: str) -> str:
    """A binding's key as people write it: "ctrl+p" → "Ctrl+P", "f1" → "F1", "shift+enter" → "Shift+Enter"."""
    parts = key.split("+")
    return "+".join(part.upper() if len(part) == 1 or re.fullmatch(r"f\d+", part) else part.title() for part in parts)


def kind_line(kind: str, capabilities: Sequence[str] = ()) -> str:
    """One line on what the model is: its kind, and tool use when its template renders tools."""
    line = KIND_LINES.get(kind, f"a {kind} model")
    return line + (" · it can call tools" if "tools" in capabilities else "")


def welcome_text(
    model: str,
    kind: str,
    context: int,
    keys: Sequence[tuple[str, str]],
    capabilities: Sequence[str] = (),
    server: str = "",
) -> Text:
    """The model's name; its kind and context size (and the server it runs on: `server`, host:port);
    then each (key, what it does), keys aligned."""
    text = Text()
    text.append(model, style="bold")
    sizes = f" · {context:,}-token context" if context else ""  # a server may not say its context
    text.append(f"\n{kind_line(kind, capabilities)}{sizes}\n")
    if server:
        text.append(f"It runs on the server {server}: the answers and their top-k come from there.\n")
    width = max((len(key) for key, _ in keys), default=0)
    for key, what in keys:
        text.append(f"\n{key.ljust(width)}  ", style="bold")
        text.append(what)
    return text


class Welcome(Static):
    """The welcome box at the top of an empty chat."""

    DEFAULT_CSS = """
    Welcome {
        height: auto;
        margin: 1 0 0 0;
        padding: 1 2;
        border: round $primary 40%;
        color: $text-muted;
    }
    """

    def __init__(
        self,
        model: str,
        kind: str,
        context: int,
        keys: Sequence[tuple[str, str]],
        capabilities: Sequence[str] = (),
        server: str = "",
    ) -> None:
        super().__init__(welcome_text(model, kind, context, keys, capabilities, server), id="welcome", markup=False)
