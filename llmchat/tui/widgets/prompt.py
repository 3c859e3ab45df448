"""The prompt input: multi-line, Enter sends, Shift+Enter / Ctrl+J insert a newline.

Up/Down on an empty input walk through earlier prompts, like a shell.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    """A TextArea whose Enter submits instead of breaking the line."""

    @dataclass
    class Submitted(Message):
        """The user pressed Enter on a non-empty prompt."""

        input: PromptInput
        text: str

    def __init__(self, **kwargs: object) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)  # type: ignore[arg-type]
        self.prompt_history: list[str] = []
        self._recall: int | None = None  # index into history while walking it

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.post_message(self.Submitted(self, text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if event.key in ("up", "down") and self._walking_history():
            event.stop()
            event.prevent_default()
            self._recall_step(-1 if event.key == "up" else 1)
            return
        self._recall = None
        await super()._on_key(event)

    def remember(self, text: str) -> None:
        """Add a sent prompt to the history (not twice in a row) and clear the input."""
        if not self.prompt_history or self.prompt_history[-1] != text:
            self.prompt_history.append(text)
        self._recall = None
        self.clear()

    def _walking_history(self) -> bool:
        return bool(self.prompt_history) and (not self.text or self._recall is not None)

    def _recall_step(self, step: int) -> None:
        index = len(self.prompt_history) if self._recall is None else self._recall
        index += step
        if index >= len(self.prompt_history):
            self._recall = None
            self.clear()
            return
        self._recall = max(index, 0)
        self.text = self.prompt_history[self._recall]
        self.move_cursor(self.document.end)
