"""The inspector: the decoding policy of a step, the prompt as the model sees it, the timeline, and
inside the layers (the logit lens, attention, experts and state of a step; the prompt's surprise
heatmap; what quantization changed).

A full screen over the chat rather than a modal dialog: the chat's keys keep working here. F2–F7
try other sampling settings: they change the screen's `what_if` copy, not the chat's settings,
and the policy view recomputes at once; A applies the what-if to the chat, leaving the inspector
drops it. F8/F9 move the token cursor to another step. The app computes the views (tensors stay
on worker threads) and hands them over with `show_*`; the screen only draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Sparkline, Static, TabbedContent, TabPane

from llmchat.engine.errors import LLMChatError
from llmchat.engine.inside import AnswerExperts, PromptToken, QuantizedToken, StepInside
from llmchat.engine.inspector import PolicyView, PromptView
from llmchat.engine.prompt import PromptMode
from llmchat.engine.sampling import SamplingParams
from llmchat.tui.model_thread import on_model_thread
from llmchat.tui.widgets.inspector import (
    Timeline,
    policy_text,
    prompt_chips,
    prompt_counts,
    timeline_decode,
    timeline_prefill,
    timeline_trend,
)
from llmchat.tui.widgets.layers import (
    attention_text,
    heatmap_text,
    inside_extras,
    lens_text,
    quantization_text,
    surprise,
)

CHAT_HEADING = "Rendered text (exactly what the chat template produced)"
COMPLETION_HEADING = "The transcript as plain text (completion mode: no chat template; the model continues it)"
TABS = {
    "policy": "Policy",
    "prompt": "Prompt",
    "timeline": "Timeline",
    "layers": "Layers",
    "surprise": "Surprise",
    "quantization": "Quantization",
}
_PANE = "inspect-"  # pane ids are prefixed: the chat screen's CSS already styles a #prompt
HINT = (
    "Alt+P policy · Alt+V prompt · Alt+L timeline · Alt+Y layers · Alt+U surprise · Alt+Q quantization · "
    "F8/F9 step · F2–F7 what-if · A apply · Esc back"
)


@dataclass(frozen=True)
class StepContext:
    """What the layer views need of the inspected step, gathered by the app on the UI thread."""

    session: Any  # the chat's session (None: no model loaded)
    title: Text
    answer_ids: list[int]  # the inspected answer's tokens
    index: int  # the step: the pass that chose answer_ids[index] (len(answer_ids): the end)
    prompt_ids: list[int] | None  # the answer's prompt as the engine got it (None: ask `messages`)
    messages: list[dict[str, Any]] | None
    mode: PromptMode
    generating: bool


@dataclass
class ViewReady(Message):
    """A layer view computed on a worker thread (or a note: `view` None)."""

    request: int
    tab: str
    view: Any
    note: str = ""
    extra: Any = None


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
        Binding("left_square_bracket", "attention_layer(-1)", "◀ Layer", show=False),
        Binding("right_square_bracket", "attention_layer(1)", "Layer ▶", show=False),
        Binding("left_curly_bracket", "attention_head(-1)", "◀ Head", show=False),
        Binding("right_curly_bracket", "attention_head(1)", "Head ▶", show=False),
        Binding("comma", "heatmap_cursor(-1)", "◀ Prompt token", show=False),
        Binding("full_stop", "heatmap_cursor(1)", "Prompt token ▶", show=False),
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
        self.policy_note = ""  # what the policy view is when it is not the whole chain ("partial (top 8 …")
        self.prompt: PromptView | None = None
        self.timeline: Timeline | None = None
        self.inside: StepInside | None = None
        self.heatmap: tuple[PromptToken, ...] | None = None
        self.heatmap_cursor: int | None = None  # the surprise tab's prompt token under the cursor
        self._heatmap_note = ""
        self.quantization: tuple[QuantizedToken, ...] | None = None
        # the layers tab: the step's tokens (for the attention chips), which attention layer and head
        # (None: the heads averaged) are drawn, and the answer's expert load
        self._inside_texts: list[str] = []
        self._experts: AnswerExperts | None = None
        self.attention_layer = 0
        self.attention_head: int | None = None
        self._view_request = 0  # results of older layer-view requests are dropped

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
            with TabPane(TABS["layers"], id=_PANE + "layers"), VerticalScroll():
                yield Static(id="layers-step")
                yield Static(id="layers-lens")
                yield Static(id="layers-attention", classes="section")
                yield Static(id="layers-extras")
            with TabPane(TABS["surprise"], id=_PANE + "surprise"), VerticalScroll():
                yield Static(id="surprise-body")
            with TabPane(TABS["quantization"], id=_PANE + "quantization"), VerticalScroll():
                yield Static(id="quantization-body")
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

    def show_policy(self, step: Text, body: Text | PolicyView, note: str = "") -> None:
        """A step's title and either its sampler chain (a PolicyView, with a `note` on what it is: a
        partial one of a server's candidates) or a note / its saved top-k."""
        self.policy = body if isinstance(body, PolicyView) else None
        self.policy_note = note
        if isinstance(body, PolicyView):
            chat = getattr(self.app, "sampling", None)
            body = policy_text(body, self._colour("accent", "cyan"), self._colour("error", "red"), chat=chat)
            if note:
                body = Text(note + "\n\n", style=f"bold {self._colour('warning', 'yellow')}") + body
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

    def show_layers(
        self, title: Text, step: StepInside | None, texts: list[str] | None = None, experts: AnswerExperts | None = None
    ) -> None:
        """A step's layer views (or, with `step` None, a note in `title`)."""
        self.inside, self._inside_texts, self._experts = step, list(texts or []), experts
        self.query_one("#layers-step", Static).update(title)
        if step is None:
            for part in ("#layers-lens", "#layers-attention", "#layers-extras"):
                self.query_one(part, Static).update("")
            return
        self.attention_layer = min(self.attention_layer, max(len(step.attention) - 1, 0))
        self.query_one("#layers-lens", Static).update(lens_text(step, self._colour("accent", "cyan")))
        self._draw_attention()
        self.query_one("#layers-extras", Static).update(inside_extras(step, experts))

    def _draw_attention(self) -> None:
        step = self.inside
        widget = self.query_one("#layers-attention", Static)
        if step is None or not step.attention:
            widget.update("" if step is None else "No attention layer (every layer is recurrent).")
            return
        pattern = step.attention[self.attention_layer]
        head = (
            self.attention_head if self.attention_head is None or self.attention_head < len(pattern.weights) else None
        )
        widget.update(attention_text(pattern, self._inside_texts, head, self._colour("accent", "#00aaff")))

    def action_attention_layer(self, step: int) -> None:
        """[ and ]: the previous / next attention layer of the layers tab."""
        if self.inside is not None and self.inside.attention:
            self.attention_layer = (self.attention_layer + step) % len(self.inside.attention)
            self._draw_attention()

    def action_attention_head(self, step: int) -> None:
        """{ and }: the previous / next head, through "all heads averaged"."""
        if self.inside is None or not self.inside.attention:
            return
        heads = len(self.inside.attention[self.attention_layer].weights)
        order: list[int | None] = [None, *range(heads)]
        self.attention_head = order[(order.index(self.attention_head) + step) % len(order)]
        self._draw_attention()

    def show_heatmap(self, tokens: tuple[PromptToken, ...] | None, note: str = "") -> None:
        if tokens != self.heatmap:  # another prompt: the cursor starts on its most surprising token
            scored = [t for t in tokens or () if t.prob is not None]
            self.heatmap_cursor = max(scored, key=surprise).index if scored else None
        self.heatmap, self._heatmap_note = tokens, note
        self._draw_heatmap()

    def _draw_heatmap(self) -> None:
        tokens = self.heatmap
        body = heatmap_text(tokens, self._colour("warning", "#ff8800"), self.heatmap_cursor) if tokens else Text()
        if self._heatmap_note:
            body = Text(self._heatmap_note + "\n\n", style="dim") + body
        self.query_one("#surprise-body", Static).update(body)

    def action_heatmap_cursor(self, step: int) -> None:
        """, and .: the previous / next prompt token of the surprise tab."""
        if self.heatmap:
            start = self.heatmap_cursor if self.heatmap_cursor is not None else -step
            self.heatmap_cursor = (start + step) % len(self.heatmap)
            self._draw_heatmap()

    def show_quantization(self, tokens: tuple[QuantizedToken, ...] | None, note: str = "") -> None:
        self.quantization = tokens
        body = Text()
        if tokens:
            body = quantization_text(tokens, self._colour("accent", "cyan"), self._colour("error", "red"))
        if note:
            body = Text(note + "\n\n", style="dim") + body
        self.query_one("#quantization-body", Static).update(body)

    # --- the layer views: computed by this screen's own workers ---------------------------------------

    def refresh_view(self, tab: str, context: StepContext | None, note: str = "") -> None:
        """Bring a layer view up to date: a note at once, the numbers from a worker thread (they run
        the model: about a decode step for the layers tab, a prefill for the others)."""
        self._view_request += 1
        show = {"layers": self._note_layers, "surprise": self.show_heatmap, "quantization": self.show_quantization}[tab]
        session = None if context is None else context.session
        if context is None or session is None:
            show(None, note or "No answer yet: ask something first.")
            return
        if not session.capabilities.layer_views:
            show(None, "Inside the layers is llmchat's own engine only: this model runs on a server.")
            return
        if context.generating:
            show(None, "The model is answering: this view shows when it is done.")
            return
        show(None, "computing… (loading the float32 reference first, once)" if tab == "quantization" else "computing…")
        self._compute_view(self._view_request, tab, context)

    def _note_layers(self, _: object, note: str) -> None:
        self.show_layers(Text(note, style="dim"), None)

    @work(thread=True, exclusive=True, group="layer-views")
    @on_model_thread
    def _compute_view(self, request: int, tab: str, context: StepContext) -> None:
        session = context.session
        try:
            prompt_ids = context.prompt_ids
            if prompt_ids is None:
                prompt_ids = session.prompt_tokens(context.messages or [], context.mode)
            if tab == "layers":
                step = session.inside_step(prompt_ids, context.answer_ids, context.index)
                texts = [session.token_text(i) for i in prompt_ids + context.answer_ids[: context.index]]
                experts = session.answer_experts(prompt_ids, context.answer_ids) if step.routes else None
                self.post_message(ViewReady(request, tab, step, extra=(texts, experts, context.title)))
            elif tab == "surprise":
                self.post_message(ViewReady(request, tab, session.prompt_heatmap(prompt_ids)))
            else:

                def progress(done: int, total: int) -> None:
                    note = f"loading the float32 reference of the same file: {done}/{total} tensors…"
                    self.post_message(ViewReady(request, tab, None, note))

                tokens = session.quantization_diff(prompt_ids, context.answer_ids, progress)
                self.post_message(ViewReady(request, tab, tokens))
        except (ValueError, LLMChatError) as err:
            self.post_message(ViewReady(request, tab, None, f"Not available: {err}"))

    def on_view_ready(self, message: ViewReady) -> None:
        if message.request != self._view_request:
            return
        if message.tab == "layers":
            if message.view is None:
                self._note_layers(None, message.note)
            else:
                texts, experts, title = message.extra
                self.show_layers(title, message.view, texts, experts)
        elif message.tab == "surprise":
            self.show_heatmap(message.view, message.note)
        else:
            self.show_quantization(message.view, message.note)
