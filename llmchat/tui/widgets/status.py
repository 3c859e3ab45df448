"""The status bar: model, device, dtype/quant, sampling knobs, context fill and the last tok/s."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from textual.widgets import Static

from llmchat.engine import SamplingParams


@dataclass(frozen=True)
class StatusState:
    model: str = "no model"
    device: str = ""
    precision: str = ""  # dtype, and the file's quant when there is one
    sampling: SamplingParams = SamplingParams()
    context_tokens: int = 0
    context_capacity: int = 0
    tokens_per_second: float | None = None
    activity: str = ""  # loading…, prefill 40%, generating…


class StatusBar(Static):
    """One line at the bottom; every field comes from `StatusState`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.state = StatusState()

    def change(self, **changes: Any) -> None:
        state = replace(self.state, **changes)
        if state != self.state:
            self.state = state
            self.update(self.line(), layout=False)  # one fixed line: never reflow the screen for it

    def line(self) -> str:
        s = self.state
        p = s.sampling
        temp = "greedy" if p.temperature == 0 else f"{p.temperature:.2f}"
        parts = [s.model]
        if s.device:
            parts.append(f"{s.device} {s.precision}".strip())
        parts += [
            f"temp {temp}",
            f"top-p {p.top_p:.2f}",
            f"top-k {p.top_k or 'off'}",
        ]
        if s.context_capacity:
            share = s.context_tokens / s.context_capacity
            parts.append(f"ctx {s.context_tokens:,}/{s.context_capacity:,} ({share:.0%})")
        if s.tokens_per_second is not None:
            parts.append(f"{s.tokens_per_second:.1f} tok/s")
        if s.activity:
            parts.append(s.activity)
        return " │ ".join(parts)
