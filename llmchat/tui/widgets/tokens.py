"""The token view of an answer: every token as a chip, coloured by the probability the model gave it.

The view replaces the answer's Markdown while it is open (Alt+T cycles text → heatmap → heatmap
with token boundaries and ids). A cursor (F8/F9, or a click on a chip) picks a token; the app
shows that step in the top-k panel and the inspector, and branches there with Ctrl+B.

A saved answer keeps its tokens as plain records (`chat.conversation.token_record`);
`token_event` turns one back into the engine's `TokenEvent` so saved and live tokens are drawn
the same way, without the model loaded.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from rich.style import Style
from rich.text import Text
from textual.widgets import Static

from llmchat.engine.events import TokenEvent, TopToken
from llmchat.tui.widgets.format import printable, subscript, visible_token

# The heatmap: (lowest probability, background, foreground, legend label), highest first. Fixed
# colours rather than theme ones: the scale must read the same in every theme.
HEAT: tuple[tuple[float, str, str, str], ...] = (
    (0.9, "#2e7d32", "#ffffff", "≥90%"),
    (0.6, "#7cb342", "#000000", "60–90%"),
    (0.3, "#fbc02d", "#000000", "30–60%"),
    (0.1, "#f57c00", "#000000", "10–30%"),
    (0.0, "#c62828", "#ffffff", "<10%"),
)
LOW_CONFIDENCE = 0.3  # below this a token counts as one the model was unsure of (orange and red)
MODES = ("text", "heatmap", "ids")  # what Alt+T cycles through


def token_event(record: dict[str, Any], index: int) -> TokenEvent:
    """A saved token record as a TokenEvent (cache numbers are not kept: zero)."""
    top = tuple(
        TopToken(
            token_id=int(entry[0]),
            text=str(entry[1]),
            logit=float(entry[2]),
            prob=float(entry[3]),
            policy_prob=float(entry[4]) if len(entry) > 4 else math.nan,  # not kept: unknown
        )
        for entry in record.get("top", [])
    )
    return TokenEvent(
        entropy=float(record.get("entropy", 0.0)),
        policy_entropy=float(record.get("policy_entropy", 0.0)),
        token_id=int(record.get("id", -1)),
        text=str(record.get("text", "")),
        index=index,
        logit=next((t.logit for t in top if t.token_id == record.get("id")), 0.0),
        prob=float(record.get("prob", 0.0)),
        policy_prob=float(record.get("policy_prob", math.nan)),
        rank=int(record.get("rank", 0)),
        top=top,
        seconds=float(record.get("seconds", 0.0)),
        cache_tokens=0,
        cache_bytes=0,
    )


def token_events(records: list[dict[str, Any]] | None) -> list[TokenEvent]:
    """Every saved record of an answer, skipping malformed ones (a hand-edited file must not crash the chat)."""
    events: list[TokenEvent] = []
    for record in records or []:
        if isinstance(record, dict) and record.get("end"):
            continue
        try:
            events.append(token_event(record, len(events)))
        except (TypeError, ValueError, IndexError, AttributeError):
            continue
    return events


def end_event(records: list[dict[str, Any]] | None, index: int) -> TokenEvent | None:
    """The saved step that chose end-of-sequence (step `index`, after the answer's tokens), if any."""
    ends = [r for r in records or [] if isinstance(r, dict) and r.get("end")]
    try:
        return token_event(ends[-1], index) if ends else None
    except (TypeError, ValueError, IndexError, AttributeError):
        return None


def forced_indices(records: list[dict[str, Any]] | None) -> set[int]:
    """Which saved tokens were picked at a branch rather than sampled."""
    return {i for i, record in enumerate(records or []) if isinstance(record, dict) and record.get("forced")}


def heat(prob: float) -> tuple[str, str]:
    """(background, foreground) of a chip for a token the model gave probability `prob`."""
    for lowest, background, foreground, _ in HEAT:
        if prob >= lowest:
            return background, foreground
    return HEAT[-1][1], HEAT[-1][2]


def legend(mode: str) -> Text:
    """What the colours (and marks) of the token view mean, and the keys that work on it."""
    text = Text()  # not Text(..., style="dim"): that style is the whole text's, chips appended to it too
    text.append("p(token) ", style="dim")
    for _, background, foreground, label in HEAT:
        text.append(f" {label} ", Style(color=foreground, bgcolor=background))
        text.append(" ")
    if mode == "ids":
        text.append(" ₁₂₃ token id", style="dim")
    text.append("\nF8/F9/click: cursor · Ctrl+B: branch here · Alt+T: ids · underlined: picked", style="dim")
    return text


def chips(
    tokens: list[TokenEvent],
    selected: int | None,
    mode: str,
    forced: frozenset[int] = frozenset(),
    link: str = "",
    *,
    ended: bool = False,
) -> Text:
    """The answer's tokens as heatmap chips; `link` (a message id) makes each chip clickable.

    `ended`: the last entry is the step that chose end-of-sequence, drawn as ∎ and its token.
    """
    text = Text()
    boundaries = mode == "ids"
    for i, token in enumerate(tokens):
        if ended and i == len(tokens) - 1:
            token = replace(token, text=f"∎{token.text}")
        background, foreground = heat(token.prob)
        style = Style(color=foreground, bgcolor=background, underline=i in forced)
        if i == selected:
            style += Style(reverse=True, bold=True)
        if link:
            style += Style(meta={"@click": f"app.select_token('{link}', {i})"})
        shown = visible_token(token.text) if boundaries else printable(token.text).replace("\n", "↵")
        text.append(shown or "∅", style)
        if boundaries:
            text.append(subscript(token.token_id), Style(dim=True, meta=style.meta))
            text.append(" ")
        if "\n" in token.text:  # keep the answer's lines
            text.append("\n")
    return text


class TokenView(Static):
    """One answer's tokens as a heatmap with a cursor; shown in place of the answer's Markdown."""

    DEFAULT_CSS = """
    TokenView {
        height: auto;
        margin: 0;
    }
    """

    def __init__(self, message_id: str, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        # Each chip is a click target (`@click` meta); Textual would draw every one as a link,
        # underlined and in the link colour, over the heat colours and the "underlined: picked" mark.
        self.auto_links = False
        self.message_id = message_id
        self.selected: int | None = None
        self.mode = "heatmap"

    def show(
        self,
        tokens: list[TokenEvent],
        selected: int | None,
        mode: str,
        forced: frozenset[int] = frozenset(),
        *,
        ended: bool = False,
    ) -> None:
        self.selected, self.mode = selected, mode
        body = legend(mode)
        body.append("\n\n")
        body.append_text(chips(tokens, selected, mode, forced, self.message_id, ended=ended))
        self.update(body)
