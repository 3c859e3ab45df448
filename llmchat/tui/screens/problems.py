"""What went wrong at start-up (settings, themes, unreadable conversations), kept for the user to read.

Start-up can find many problems at once: a toast each would stack past the top of the screen and
hide the first ones, and a long one (a settings line lists every known action) fills a toast by
itself. So one toast sums them up, a line each, and this screen (Ctrl+P → "Start-up problems")
keeps every one in full for as long as the app runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static

from llmchat.tui.screens.confirm import Dialog
from llmchat.tui.widgets.format import printable

PROBLEMS_COMMAND = "Start-up problems"
TOAST_LINES = 4  # problems named in the summary toast; the rest are counted
TOAST_WIDTH = 54  # cells of a line in a toast on a wide screen: see toast_line_width


@dataclass(frozen=True)
class Problem:
    """One problem: where it comes from ("Settings", "Themes", "Conversations") and what it is."""

    source: str
    text: str


def brief(text: str, width: int = TOAST_WIDTH) -> str:
    """One short line: a leading file path cut to its name, the rest cut with "…" at `width`."""
    text = " ".join(printable(text).split())
    head, sep, rest = text.partition(": ")
    if sep and ("/" in head or "\\" in head):
        text = f"{PurePath(head).name}: {rest}"
    if cell_len(text) <= width:
        return text
    while cell_len(text) > width - 1:
        text = text[:-1]
    return text.rstrip() + "…"


def toast_line_width(screen_width: int) -> int:
    """Cells of a "• …" line that fit on one row of a toast: Textual's toasts are 60 cells wide but
    at most half the screen, less a padding cell each side, the border, the bullet, and a cell
    the half-screen width loses to rounding."""
    return max(16, min(60, screen_width // 2) - 6)


def startup_toast(problems: Sequence[Problem], width: int = TOAST_WIDTH) -> tuple[str, str]:
    """(title, message) of the one toast that reports `problems`: a single problem in full, or a
    line per problem (the first few, each cut to `width`) and where to read them all."""
    if len(problems) == 1:
        return problems[0].source, printable(problems[0].text)
    # Named: the first problem of each source, then the others in order, while there is room; so
    # four settings lines never crowd out the one that says a conversation file is unreadable.
    order = list(range(len(problems)))
    firsts = [next(i for i in order if problems[i].source == s) for s in dict.fromkeys(p.source for p in problems)]
    named = sorted((firsts + [i for i in order if i not in firsts])[:TOAST_LINES])
    lines = [f"• {brief(problems[i].text, width)}" for i in named]
    if len(problems) > len(named):
        lines.append(f"… and {len(problems) - len(named)} more")
    lines.append(f"Ctrl+P → “{PROBLEMS_COMMAND}” shows them in full.")
    return f"{len(problems)} problems at start-up", "\n".join(lines)


def problems_text(problems: Sequence[Problem]) -> Text:
    """Every problem in full, grouped under its source, in the order they were found."""
    groups: dict[str, list[str]] = {}
    for problem in problems:
        groups.setdefault(problem.source, []).append(printable(problem.text))
    text = Text()
    for number, (source, texts) in enumerate(groups.items()):
        if number:
            text.append("\n\n")
        text.append(f"{source} ({len(texts)})", style="bold")
        for line in texts:
            text.append(f"\n• {line}")
    return text


class ProblemsScreen(Dialog[None]):
    """The start-up problems, each in full; Esc, Enter or q closes."""

    DEFAULT_CSS = """
    ProblemsScreen #problems-box {
        height: auto;
        max-height: 70vh;
        margin: 1 0 0 0;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,q", "close", "Close")]

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__()
        self.problems = list(problems)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = PROBLEMS_COMMAND
            with VerticalScroll(id="problems-box"):
                yield Static(problems_text(self.problems), id="problems", markup=False)
            yield Static(
                "llmchat used the defaults for what it could not read and left the files as they are. Esc closes.",
                classes="hint",
                markup=False,
            )

    def on_mount(self) -> None:
        self.query_one("#problems-box").focus()  # arrows scroll a long list

    def action_close(self) -> None:
        self.dismiss(None)
