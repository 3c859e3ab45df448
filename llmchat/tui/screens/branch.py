"""Branch at a token: pick one of the alternatives the model had at that step.

The answer is cut before the token, the chosen alternative takes its place and the model goes on
from there; the old continuation stays as a sibling branch (Alt+←/→).
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from llmchat.engine.events import TokenEvent
from llmchat.tui.screens.confirm import Dialog
from llmchat.tui.widgets.format import bar, visible_token

HINT = "Enter: continue the answer from this token · Esc: cancel · the current answer stays as a branch"


class BranchScreen(Dialog[int | None]):
    """The step's top candidates; dismisses with the chosen token id, or None."""

    DEFAULT_CSS = """
    BranchScreen OptionList {
        height: auto;
        max-height: 60vh;
        margin: 1 0 0 0;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self, token: TokenEvent, index: int) -> None:
        super().__init__()
        self.token = token
        self.index = index

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as dialog:
            dialog.border_title = f"Branch at token {self.index + 1}: {visible_token(self.token.text)}"
            yield OptionList(*self._options(), id="alternatives")
            yield Static(HINT, classes="hint", markup=False)

    def _options(self) -> list[Option]:
        options = []
        for top in self.token.top:
            line = Text()
            current = top.token_id == self.token.token_id
            line.append("● " if current else "  ", style="bold")
            line.append(f"{visible_token(top.text)[:18]:<18}", style="bold" if current else "")
            line.append(f" {top.prob:>6.1%} ", style="dim")
            line.append(bar(top.prob, 10))
            line.append(f"  policy {top.policy_prob:>6.1%}" if top.policy_prob > 0 else "  policy    cut", style="dim")
            line.append(f"  id {top.token_id}", style="dim")
            if current:
                line.append("  (the answer's token)", style="dim italic")
            options.append(Option(line, id=str(top.token_id), disabled=current))
        return options

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.focus()
        first = next((i for i, top in enumerate(self.token.top) if top.token_id != self.token.token_id), None)
        if first is not None:
            options.highlighted = first

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            self.dismiss(int(event.option.id))

    def action_close(self) -> None:
        self.dismiss(None)
