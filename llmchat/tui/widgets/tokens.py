"""The tokens of one answer as clickable chips, to pick any earlier token for the top-k panel.

A saved answer keeps its tokens as plain records (`chat.conversation.token_record`);
`token_event` turns one back into the engine's `TokenEvent` so the panels draw saved and live
tokens the same way, without the model loaded.
"""

from __future__ import annotations

from typing import Any

from rich.style import Style
from rich.text import Text
from textual.widgets import Static

from llmchat.engine.events import TokenEvent, TopToken
from llmchat.tui.widgets.format import visible_token

LOW_CONFIDENCE = 0.3  # chips of tokens the model gave less than this are drawn in the warning colour


def token_event(record: dict[str, Any], index: int) -> TokenEvent:
    """A saved token record as a TokenEvent (timings and cache numbers are not kept: zero)."""
    top = tuple(
        TopToken(
            token_id=int(entry[0]),
            text=str(entry[1]),
            logit=float(entry[2]),
            prob=float(entry[3]),
            policy_prob=float(entry[4]) if len(entry) > 4 else 0.0,
        )
        for entry in record.get("top", [])
    )
    return TokenEvent(
        token_id=int(record.get("id", -1)),
        text=str(record.get("text", "")),
        index=index,
        logit=next((t.logit for t in top if t.token_id == record.get("id")), 0.0),
        prob=float(record.get("prob", 0.0)),
        policy_prob=float(record.get("policy_prob", 0.0)),
        rank=int(record.get("rank", 0)),
        top=top,
        seconds=0.0,
        cache_tokens=0,
        cache_bytes=0,
    )


def token_events(records: list[dict[str, Any]] | None) -> list[TokenEvent]:
    """Every saved record of an answer, skipping malformed ones (a hand-edited file must not crash the chat)."""
    events: list[TokenEvent] = []
    for record in records or []:
        try:
            events.append(token_event(record, len(events)))
        except (TypeError, ValueError, IndexError, AttributeError):
            continue
    return events


class TokenStrip(Static):
    """One answer's tokens as chips; click a chip (or use the token keys) to inspect that step."""

    DEFAULT_CSS = """
    TokenStrip {
        height: auto;
        max-height: 8;
        overflow-y: auto;
        color: $text-muted;
        margin: 1 0 0 0;
    }
    """

    def __init__(self, message_id: str, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self.message_id = message_id
        self.selected: int | None = None

    def show(self, tokens: list[TokenEvent], selected: int) -> None:
        self.selected = selected
        self.update(self._chips(tokens, selected))
        self.scroll_to(y=max(self._line_of(tokens, selected) - 2, 0), animate=False)

    def _chips(self, tokens: list[TokenEvent], selected: int) -> Text:
        variables = self.app.theme_variables if self.is_attached else {}
        warn = variables.get("warning", "yellow")
        accent = variables.get("accent", "cyan")
        text = Text()
        for i, token in enumerate(tokens):
            chip = visible_token(token.text).replace("↵", "↵ ")
            if i == selected:
                style = Style(color=variables.get("background", "black"), bgcolor=accent, bold=True)
            elif token.prob < LOW_CONFIDENCE:
                style = Style(color=warn)
            else:
                style = Style()
            text.append(chip, style + Style(meta={"@click": f"app.select_token('{self.message_id}', {i})"}))
            text.append(" ")
        return text

    def _line_of(self, tokens: list[TokenEvent], selected: int) -> int:
        """Roughly which wrapped line the selected chip is on, to keep it in view."""
        width = max(self.size.width, 1)
        cells = sum(len(visible_token(t.text)) + 1 for t in tokens[:selected])
        return cells // width
