"""Side panels: the KV cache, the memory bill, and the top-k candidates of a token.

Each panel keeps the numbers it shows as plain attributes (tests read them) and renders them as
Rich text. They are fed from engine events by the app; none of them touches a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.cells import set_cell_size
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from llmchat.engine import TokenEvent
from llmchat.engine.memory import MemoryEstimate, MemoryUsage
from llmchat.session.metrics import ServerCache
from llmchat.tui.widgets.format import bar, human_bytes, visible_token
from llmchat.tui.widgets.repaint import LineRepaint

BAR_WIDTH = 22


class Panel(LineRepaint, Static):
    """A bordered side panel whose Rich styles may name theme colours (`$accent`, `$error`...)."""

    DEFAULT_CLASSES = "panel"

    def themed(self, spec: str) -> str:
        """Resolve `$name` words of a Rich style against the current theme (Rich has no variables)."""
        variables = self.app.theme_variables if self.is_attached else {}
        words = [variables.get(w[1:], "") if w.startswith("$") else w for w in spec.split()]
        return " ".join(w for w in words if w)


@dataclass
class CacheState:
    """What the KV-cache panel shows."""

    tokens: int = 0
    capacity: int = 0
    bytes_used: int = 0
    bytes_capacity: int = 0
    reused: int = 0  # tokens the last turn took from the cache
    prefilled: int = 0  # tokens the last turn pushed through the model
    # Tokens of another conversation still in the engine's cache (a new or an opened chat, before its
    # first turn): the next request keeps only the start they share with its prompt.
    left_over: int = 0
    # A hybrid model's recurrent layers: bytes of their fixed state (and its snapshots), part of bytes_used
    state_bytes: int = 0
    # The cache is a server's ("host:port"): only what it reported is known (bytes only from its /metrics)
    server: str = ""
    server_cache: ServerCache | None = None  # its /metrics page's figures for the whole cache


class KVCachePanel(Panel):
    """Tokens cached / capacity, bytes, a fill bar, reuse of the last turn."""

    BORDER_TITLE = "KV cache"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.state = CacheState()

    def show(self, state: CacheState) -> None:
        self.state = state
        self.update_lines(self._render_state())  # fixed size: no screen reflow

    def _render_state(self) -> RenderableType:
        s = self.state
        if s.server:
            return self._render_server(s)
        share = s.tokens / s.capacity if s.capacity else 0.0
        lines = Text()
        lines.append(f"{s.tokens:,}", style="bold")
        lines.append(f" / {s.capacity:,} tokens  ")
        lines.append(f"{share:.0%}\n", style="bold")
        lines.append(bar(share, BAR_WIDTH), style=self.themed("$accent" if share < 0.9 else "$error"))
        lines.append("\n")
        if s.left_over:  # this chat has no turn yet; the cache still holds the last one's tokens
            lines.append(f"{s.left_over:,} tokens left from the last chat\n", style="dim")
            lines.append("the next message reuses what matches", style="dim")
            return lines
        lines.append(f"{human_bytes(s.bytes_used)} of {human_bytes(s.bytes_capacity)}")
        if s.state_bytes:  # only the attention layers grow; the recurrent ones hold this much, fixed
            lines.append(f" · {human_bytes(s.state_bytes)} fixed state", style="dim")
        lines.append("\n")
        lines.append("last turn: ", style="dim")
        lines.append(f"{s.reused:,} reused", style=self.themed("$success"))
        lines.append(" · ", style="dim")
        lines.append(f"{s.prefilled:,} prefilled")
        return lines

    def _render_server(self, s: CacheState) -> Text:
        """A server's cache: what its last answer reported (0: not reported), never bytes."""
        lines = Text()
        lines.append(f"on the server {s.server}\n", style="dim")
        if s.tokens:
            lines.append(f"{s.tokens:,}", style="bold")
            lines.append(f" / {s.capacity:,} tokens\n" if s.capacity else " tokens (context not reported)\n")
        else:
            lines.append("tokens: not reported yet\n" if s.capacity else "tokens, context: not reported\n", style="dim")
        metrics = s.server_cache
        if metrics is not None and metrics.usage is not None:  # the whole cache, all of its requests
            lines.append("in use ", style="dim")
            lines.append(f"{metrics.usage:.0%} ", style="bold")
            lines.append(bar(metrics.usage, 8), style=self.themed("$accent" if metrics.usage < 0.9 else "$error"))
            if metrics.bytes_used is not None and metrics.bytes_capacity:
                lines.append(f" {human_bytes(metrics.bytes_used)} of {human_bytes(metrics.bytes_capacity)}")
            lines.append("\n")
        else:
            lines.append("bytes, usage: not reported\n", style="dim")
        lines.append("last turn: ", style="dim")
        if s.tokens:
            lines.append(f"{s.reused:,} reused", style=self.themed("$success"))
            lines.append(" · ", style="dim")
            lines.append(f"{s.prefilled:,} prefilled")
        else:
            lines.append("not reported", style="dim")
        return lines


class MemoryPanel(Panel):
    """The memory bill: predicted by the memory math next to what is measured now."""

    BORDER_TITLE = "Memory"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.predicted: MemoryEstimate | None = None
        self.measured: MemoryUsage | None = None
        self.server = ""  # a server's model: its memory is not known here

    def show(self, predicted: MemoryEstimate | None, measured: MemoryUsage | None) -> None:
        self.predicted, self.measured, self.server = predicted, measured, ""
        self.update_lines(self._render_state())  # fixed size: no screen reflow

    def show_server(self, where: str) -> None:
        """The model's memory is a server's: nothing here is invented."""
        self.predicted, self.measured, self.server = None, None, where
        self.update_lines(self._render_state())

    def _render_state(self) -> RenderableType:
        if self.server:
            return Text(f"on the server {self.server}\nits memory is not reported", style="dim")
        table = Table.grid(padding=(0, 1))
        table.add_column(style="dim")
        table.add_column(justify="right")
        p, m = self.predicted, self.measured
        if p is not None:
            table.add_row("weights", human_bytes(p.weights))
            table.add_row("KV cache", human_bytes(p.kv_cache))
            table.add_row("overhead", human_bytes(p.overhead))
            table.add_row("predicted", Text(human_bytes(p.total), style="bold"))
        if m is not None:
            table.add_row(f"{m.kind} now", Text(human_bytes(m.used), style="bold"))
            table.add_row(f"{m.kind} peak", human_bytes(m.peak))
            table.add_row("tensors", human_bytes(m.tensors))
        if p is None and m is None:
            return Text("no model loaded", style="dim")
        return table


class TopKPanel(Panel):
    """The k most likely candidates for one token: raw probability and probability under the policy."""

    BORDER_TITLE = "Top-k"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.event: TokenEvent | None = None
        # What the numbers are when they are not this engine's own: a server's (its capabilities say)
        self.source = ""

    def describe(self, source: str) -> None:
        """Say where the candidates come from ("" for llmchat's own engine: raw and after the policy)."""
        self.source = source
        self.border_title = "Top-k · from the server" if source else self.BORDER_TITLE
        self.update_lines(self._render_state())

    def show(self, event: TokenEvent | None, *, title: str = "latest token") -> None:
        self.event = event
        self.set_border_subtitle(title)
        self.update_lines(self._render_state())  # fixed size: no screen reflow

    def _render_state(self) -> RenderableType:
        out = self._render_event()
        if self.source:
            out = Text(self.source + "\n", style="dim") + out
        return out

    def _render_event(self) -> Text:
        # Plain Text lines with fixed cell widths: a rich Table measured its columns on every
        # repaint, which cost ~20 ms of the UI thread per token shown.
        event = self.event
        if event is None:
            return Text("no token yet", style="dim")
        mark_style = self.themed("bold $accent")
        raw_style, policy_style = self.themed("$secondary"), self.themed("$accent")
        out = Text("  token      raw p        policy p\n", style="dim")
        for top in event.top:
            chosen = top.token_id == event.token_id
            out.append("▶ " if chosen else "  ", style=mark_style)
            out.append(set_cell_size(visible_token(top.text), 9), style="bold" if chosen else "")
            out.append(f" {top.prob:>6.1%} ", style="dim")
            out.append(bar(top.prob, 5), style=raw_style)
            if math.isnan(top.policy_prob):  # a server that does not say what its sampler made of it
                out.append("    n/a", style="dim")
            elif top.policy_prob > 0:
                out.append(f" {top.policy_prob:>6.1%} ")
                out.append(bar(top.policy_prob, 5), style=policy_style)
            else:
                out.append("    cut", style="dim")
            out.append("\n")
        if all(top.token_id != event.token_id for top in event.top):  # sampled from outside the top k
            out.append("▶ ", style=mark_style)
            out.append(set_cell_size(visible_token(event.text), 9))
            out.append(f" {event.prob:>6.1%} ", style="dim")
            out.append(f"#{event.rank + 1:<4}", style="dim")
            out.append("    n/a\n" if math.isnan(event.policy_prob) else f" {event.policy_prob:>6.1%}\n")
        if self.source and event.entropy:  # a server's top N: the rest of the vocabulary is not known
            out.append(f"\nentropy ≥ {event.entropy:.2f} bits (top {len(event.top)})", style="dim")
            out.append(f" · rank #{event.rank + 1}", style="dim")
        elif event.entropy or event.policy_entropy:
            out.append(f"\nentropy {event.entropy:.2f} bits", style="dim")
            out.append(f" · policy {event.policy_entropy:.2f}", style="dim")
            out.append(f" · rank #{event.rank + 1}", style="dim")
        out.rstrip()
        return out
