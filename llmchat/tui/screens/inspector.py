"""The inspector: the decoding policy of a step, the prompt as the model sees it, and the timeline.

A full screen over the chat rather than a modal dialog: the chat's keys keep working here. F2–F7
try other sampling settings: they change the screen's `what_if` copy, not the chat's settings,
and the policy view recomputes at once; A applies the what-if to the chat, leaving the inspector
drops it. F8/F9 move the token cursor to another step. The app computes the views (tensors stay
on worker threads) and hands them over with `show_*`; the screen only draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Sparkline, Static, TabbedContent, TabPane

from llmchat.engine.inspector import PolicyView, PromptView
from llmchat.engine.sampling import SamplingParams
from llmchat.tui.widgets.inspector import (
    Timeline,
    policy_text,
    prompt_chips,
    prompt_counts,
    timeline_decode,
    timeline_prefill,
    timeline_trend,
)

CHAT_HEADING = "Rendered text (exactly what the chat template produced)"
COMPLETION_HEADING = "The transcript as plain text (completion mode: no chat template; the model continues it)"
TABS = {"policy": "Policy", "prompt": "Prompt", "timeline": "Timeline"}
_PANE = "inspect-"  # pane ids are prefixed: the chat screen's CSS already styles a #prompt
HINT = (
    "Alt+P policy · Alt+V prompt · Alt+L timeline · F8/F9 step · F2–F7 what-if sampling · A apply it · "
    "Esc back to the chat"
)


class InspectorScreen(Screen[None]):
    """Three tabs over the chat's model; the app keeps them current."""

    DEFAULT_CSS = """
    InspectorScreen #inspector-hint {
        height: 1;
        color: $text-muted;
        padding: 0 1;
    }
    InspectorScreen #inspector-tabs, InspectorScreen ContentSwitcher {
        height: 1fr;
    }
    InspectorScreen TabPane {
        padding: 0 1;
        height: 1fr;
    }
    InspectorScreen TabPane > VerticalScroll {
        height: 1fr;
    }
    InspectorScreen .section {
        margin: 1 0 0 0;
        text-style: bold;
        color: $text-accent;
    }
    InspectorScreen #prompt-counts, InspectorScreen #policy-step {
        text-style: bold;
    }
    InspectorScreen #timeline-sparkline {
        height: 6;
        margin: 1 0;
    }
    InspectorScreen #timeline-sparkline > .sparkline--max-color {
        color: $error;
    }
    InspectorScreen #timeline-sparkline > .sparkline--min-color {
        color: $success;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back", show=False),
        Binding("a", "apply_sampling", "Apply what-if"),
    ]

    @dataclass
    class ApplySampling(Message):
        """The user asked for the what-if settings to become the chat's."""

    def __init__(self, tab: str = "policy") -> None:
        super().__init__()
        self.initial_tab = tab
        # Sampling settings tried here (F2–F7), not the chat's until applied; None: the chat's shown.
        self.what_if: SamplingParams | None = None
        # What is drawn now, as data (tests read these).
        self.policy: PolicyView | None = None
        self.prompt: PromptView | None = None
        self.timeline: Timeline | None = None

    def compose(self) -> ComposeResult:
        yield Static(HINT, id="inspector-hint", markup=False)
        with TabbedContent(initial=_PANE + self.initial_tab, id="inspector-tabs"):
            with TabPane(TABS["policy"], id=_PANE + "policy"), VerticalScroll():
                yield Static(id="policy-step")
                yield Static(id="policy-body")
            with TabPane(TABS["prompt"], id=_PANE + "prompt"), VerticalScroll():
                yield Static(id="prompt-counts", markup=False)
                yield Static(id="prompt-chips")
                yield Static(CHAT_HEADING, id="prompt-heading", classes="section", markup=False)
                yield Static(id="prompt-text", markup=False)
            with TabPane(TABS["timeline"], id=_PANE + "timeline"), VerticalScroll():
                yield Static(id="timeline-prefill")
                yield Static(id="timeline-decode", classes="section")
                yield Sparkline([], id="timeline-sparkline")
                yield Static(id="timeline-trend", markup=False)
        yield Footer()

    @property
    def active_tab(self) -> str:
        """ "policy", "prompt" or "timeline"."""
        return self.query_one(TabbedContent).active.removeprefix(_PANE) or self.initial_tab

    def action_apply_sampling(self) -> None:
        self.post_message(self.ApplySampling())

    def show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = _PANE + tab

    @on(TabbedContent.TabActivated)
    def _tab_changed(self, event: TabbedContent.TabActivated) -> None:
        event.stop()
        refresh = getattr(self.app, "refresh_inspector", None)
        if refresh is not None:
            refresh()

    # --- drawing -------------------------------------------------------------------------------

    def _colour(self, name: str, fallback: str) -> str:
        return self.app.theme_variables.get(name, fallback)

    def show_policy(self, step: Text, body: Text | PolicyView) -> None:
        """A step's title and either its sampler chain (a PolicyView) or a note / its saved top-k."""
        self.policy = body if isinstance(body, PolicyView) else None
        if isinstance(body, PolicyView):
            chat = getattr(self.app, "sampling", None)
            body = policy_text(body, self._colour("accent", "cyan"), self._colour("error", "red"), chat=chat)
        self.query_one("#policy-step", Static).update(step)
        self.query_one("#policy-body", Static).update(body)

    def show_prompt(self, view: PromptView | None, note: str = "") -> None:
        """The next request's tokens, the cached ones underlined and the rest highlighted (or a note)."""
        self.prompt = view
        counts = self.query_one("#prompt-counts", Static)
        if view is None:
            counts.update(note)
            self.query_one("#prompt-chips", Static).update("")
            self.query_one("#prompt-text", Static).update("")
            return
        legend = "underlined: in the KV cache already · highlighted: to prefill"
        counts.update(prompt_counts(view) + (f"\n{note}" if note else "") + f"\n{legend}")
        reused_style = f"{self._colour('success', 'green')} underline"
        new_style = f"bold {self._colour('background', 'black')} on {self._colour('accent', 'cyan')}"
        self.query_one("#prompt-chips", Static).update(prompt_chips(view, reused_style, new_style))
        self.query_one("#prompt-text", Static).update(view.text)
        self.query_one("#prompt-heading", Static).update(COMPLETION_HEADING if view.completion else CHAT_HEADING)

    def show_timeline(self, timeline: Timeline | None, note: str = "") -> None:
        self.timeline = timeline
        sparkline = self.query_one(Sparkline)
        if timeline is None:
            self.query_one("#timeline-prefill", Static).update(Text(note, style="dim"))
            self.query_one("#timeline-decode", Static).update("")
            self.query_one("#timeline-trend", Static).update("")
            sparkline.data = []
            return
        self.query_one("#timeline-prefill", Static).update(timeline_prefill(timeline, self._colour("accent", "cyan")))
        self.query_one("#timeline-decode", Static).update(timeline_decode(timeline))
        sparkline.data = [s * 1000 for s in timeline.decode_seconds]
        self.query_one("#timeline-trend", Static).update(timeline_trend(timeline))
