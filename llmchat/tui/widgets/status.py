"""The status bar: model, device, dtype/quant, sampling knobs, context fill, tok/s and what is going on.

One line, laid out for the width it has: when everything does not fit, the least useful parts are
shortened, then dropped (`SHRINK_ORDER`), so what the user acts on — the sampling values the F2–F7
keys change, and the activity (generating, stopped, the editing hint) — is always on screen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from rich.cells import cell_len
from textual import events
from textual.widgets import Static

from llmchat.engine import SamplingParams
from llmchat.tui.widgets.repaint import LineRepaint

SEPARATOR = " │ "
MODEL_SHORT = 16  # cells of a model name shortened for a narrow terminal
# The order in which parts give way when the line is too long: each name moves that part on to
# its next shorter form (the last form of a part that may go is "").
SHRINK_ORDER = ("device", "device", "context", "model", "sampling", "model", "context", "rate", "mode", "activity")


@dataclass(frozen=True)
class StatusState:
    model: str = "no model"
    device: str = ""
    precision: str = ""  # dtype, and the file's quant when there is one
    sampling: SamplingParams = SamplingParams()
    context_tokens: int = 0
    context_capacity: int = 0
    tokens_per_second: float | None = None  # live while an answer streams, then the answer's
    activity: str = ""  # loading…, prefill 40%, generating…, stopped, editing
    hint: str = ""  # what to do about the activity, shown after it when there is room
    mode: str = "chat"  # the conversation's prompt mode; "completion" is shown next to the model


class StatusBar(LineRepaint, Static):
    """One line at the bottom; every field comes from `StatusState`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.state = StatusState()

    def change(self, **changes: Any) -> None:
        if "activity" in changes:
            changes.setdefault("hint", "")  # a hint belongs to the activity it came with
        state = replace(self.state, **changes)
        if state != self.state:
            self.state = state
            self.update_lines(self.line())  # one fixed line: never reflow the screen for it

    def on_resize(self, event: events.Resize) -> None:
        self.update_lines(self.line())

    def parts(self) -> list[tuple[str, list[str]]]:
        """Each part of the line, in display order, with its forms from the longest to the shortest."""
        s, p = self.state, self.state.sampling
        temp = "greedy" if p.temperature == 0 else f"{p.temperature:.2f}"
        short_temp = "greedy" if p.temperature == 0 else f"t {p.temperature:.2f}"
        top_k = p.top_k or "off"
        model = s.model if cell_len(s.model) <= MODEL_SHORT else s.model[: MODEL_SHORT - 1] + "…"
        sampling = f"temp {temp}{SEPARATOR}top-p {p.top_p:.2f}{SEPARATOR}top-k {top_k}"
        parts: list[tuple[str, list[str]]] = [
            ("model", [s.model, model, ""]),
            ("mode", ["completion", ""] if s.mode == "completion" else [""]),
            ("device", [f"{s.device} {s.precision}".strip(), s.device, ""] if s.device else [""]),
            ("sampling", [sampling, f"{short_temp} · p {p.top_p:.2f} · k {top_k}"]),
        ]
        if s.context_capacity:
            share = s.context_tokens / s.context_capacity
            context = f"ctx {s.context_tokens:,}/{s.context_capacity:,} ({share:.0%})"
            parts.append(("context", [context, f"ctx {share:.0%}", ""]))
        if s.tokens_per_second is not None:
            parts.append(("rate", [f"{s.tokens_per_second:.1f} tok/s", ""]))
        if s.activity:
            parts.append(("activity", [f"{s.activity}: {s.hint}", s.activity] if s.hint else [s.activity]))
        return parts

    def line(self, width: int | None = None) -> str:
        """The line for `width` cells (by default the bar's own width; unlimited before it has one)."""
        if width is None:
            width = self.content_region.width if self.is_mounted else 0
        return fit(self.parts(), width)


def fit(parts: list[tuple[str, list[str]]], width: int) -> str:
    """Join the parts, shortening them in `SHRINK_ORDER` until the line fits `width` (0: no limit)."""
    forms = dict(parts)
    chosen = dict.fromkeys(forms, 0)

    def joined() -> str:
        return SEPARATOR.join(text for name, options in parts if (text := options[chosen[name]]))

    line = joined()
    for name in SHRINK_ORDER:
        if not width or cell_len(line) <= width:
            break
        if name in forms and chosen[name] + 1 < len(forms[name]):
            chosen[name] += 1
            line = joined()
    return line
