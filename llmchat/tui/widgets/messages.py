"""The chat transcript: user messages, streaming assistant answers, and their stats lines.

An assistant answer streams into a `StreamingMarkdown` (widgets/stream.py), one fragment per
frame, at a cost that does not grow with the answer. Reasoning (`<think>` content) streams into
its own one inside a collapsible block, apart from the answer. Both show the line breaks the
model wrote (`chat.markdown`: single newlines become hard breaks, as in the Markdown export).
"""

from __future__ import annotations

from typing import Any

from rich.style import Style
from rich.syntax import Syntax
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Collapsible, Markdown, Static

from llmchat.chat.markdown import LineBreaks, hard_line_breaks
from llmchat.engine import Finished, TokenEvent
from llmchat.engine.tool_calls import tool_calls_json
from llmchat.tui.widgets.format import printable
from llmchat.tui.widgets.stream import StreamingMarkdown, quiet_virtual_size
from llmchat.tui.widgets.tokens import TokenView

_REASONS = {
    "eos": "end of answer",
    "stop_string": "stop string",
    "max_new_tokens": "token limit",
    "context_full": "context full",
    "cancelled": "stopped",
    "error": "cut off: the server failed",
}


def stats_line(done: Finished) -> str:
    """`42 tokens · TTFT 0.21 s · 31.0 tok/s · end of answer`."""
    parts = [f"{done.generated_tokens} tokens", f"TTFT {done.ttft_seconds:.2f} s"]
    if done.generated_tokens > 1:
        parts.append(f"{done.decode_tokens_per_second:.1f} tok/s")
    if done.reused_tokens:
        parts.append(f"{done.reused_tokens} cached + {done.prefilled_tokens} prefilled")
    reason = _REASONS.get(done.reason, done.reason)
    parts.append(f"{reason} ({done.error})" if done.reason == "error" and done.error else reason)
    return " · ".join(parts)


def branch_title(name: str, position: tuple[int, int] | None) -> str:
    """`assistant ‹2/3›` when the message has siblings (regenerated answers, edited prompts)."""
    if position is None or position[1] < 2:
        return name
    return f"{name} ‹{position[0] + 1}/{position[1]}›"


def saved_stats_line(stats: dict[str, Any]) -> str:
    """The stats line of a saved answer, from the numbers the conversation file keeps."""
    try:
        return _saved_stats_line(stats)
    except (TypeError, ValueError, KeyError):  # a hand-edited file: show what it says, not a traceback
        return " · ".join(f"{key} {value}" for key, value in stats.items())


def _saved_stats_line(stats: dict[str, Any]) -> str:
    parts = []
    if "tokens" in stats:
        parts.append(f"{stats['tokens']} tokens")
    if "ttft_s" in stats:
        parts.append(f"TTFT {stats['ttft_s']:.2f} s")
    if stats.get("tokens", 0) > 1 and "decode_tok_s" in stats:
        parts.append(f"{stats['decode_tok_s']:.1f} tok/s")
    if stats.get("reused_tokens"):
        prefilled = stats.get("prompt_tokens", 0) - stats["reused_tokens"]
        parts.append(f"{stats['reused_tokens']} cached + {prefilled} prefilled")
    if "finish_reason" in stats:
        reason = _REASONS.get(stats["finish_reason"], str(stats["finish_reason"]))
        parts.append(f"{reason} ({stats['error']})" if stats.get("error") else reason)
    return " · ".join(parts)


class UserMessage(Static):
    """One user turn (plain text, never Markdown: what you typed is what you see)."""

    def __init__(
        self, text: str, message_id: str | None = None, branch: tuple[int, int] | None = None, **kwargs: object
    ) -> None:
        super().__init__(text, markup=False, **kwargs)  # type: ignore[arg-type]
        self.text = text
        self.message_id = message_id
        self.border_title = branch_title("you", branch)


class AssistantMessage(Vertical):
    """One answer: an optional reasoning block, the Markdown answer, a stats line."""

    virtual_size = quiet_virtual_size()

    def __init__(
        self,
        title: str = "assistant",
        message_id: str | None = None,
        branch: tuple[int, int] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.message_id = message_id
        self.border_title = branch_title(title, branch)
        self.reasoning_text = ""
        self.content_text = ""
        self.tokens: list[TokenEvent] = []
        self.forced: set[int] = set()  # indices of tokens picked at a branch, not sampled
        self.end: TokenEvent | None = None  # the step that chose end-of-sequence (not in the text)
        self.token_mode = "text"  # or "heatmap" / "ids": the token view replaces the Markdown
        self.finished: Finished | None = None
        # Streamed text as Markdown with the model's line breaks (each newline converted once).
        self._content_breaks, self._reasoning_breaks = LineBreaks(), LineBreaks()

    def compose(self) -> ComposeResult:
        with Collapsible(title="reasoning", collapsed=True, classes="reasoning"):
            yield StreamingMarkdown(classes="reasoning-text")
        yield StreamingMarkdown(classes="content")
        yield Static("", classes="stats")

    def on_mount(self) -> None:
        self.query_one(".reasoning", Collapsible).display = False

    async def append(self, reasoning: str, content: str, tokens: list[TokenEvent]) -> None:
        """Stream new text in; each Markdown widget gets one fragment per UI frame at most."""
        self.tokens.extend(tokens)
        if reasoning:
            if not self.reasoning_text:
                self.query_one(".reasoning", Collapsible).display = True
            self.reasoning_text += reasoning
            await self._markdown(".reasoning-text").write(self._reasoning_breaks.feed(printable(reasoning)))
        if content:
            self.content_text += content
            await self._markdown(".content").write(self._content_breaks.feed(printable(content)))

    def _markdown(self, selector: str) -> StreamingMarkdown:
        return self.query_one(selector, StreamingMarkdown)

    async def finish(self, done: Finished) -> None:
        """Close the streams and show the stats line (a stopped answer stays, marked as stopped)."""
        self.finished = done
        self.end = done.end_step
        for selector in (".reasoning-text", ".content"):
            await self._markdown(selector).finish()
        self.show_stats(stats_line(done))
        if done.reason in ("cancelled", "error"):
            self.add_class("stopped")

    async def set_text(self, reasoning: str, content: str, stats: str = "") -> None:
        """Show a finished answer at once (a resumed conversation)."""
        self.reasoning_text, self.content_text = reasoning, content
        if reasoning:
            self.query_one(".reasoning", Collapsible).display = True
            await self._markdown(".reasoning-text").update(hard_line_breaks(printable(reasoning)))
        await self._markdown(".content").update(hard_line_breaks(printable(content)))
        self.show_stats(stats)

    async def set_content(self, content: str) -> None:
        """Replace the answer text (a finished answer whose tool calls moved into their own block)."""
        self.content_text = content
        await self._markdown(".content").update(hard_line_breaks(printable(content)))

    def show_stats(self, line: str) -> None:
        """The stats line, with a clickable `tokens` link that opens the token view."""
        text = Text(line)
        if self.tokens and self.message_id is not None:
            text.append(" · ")
            link = f"app.select_token('{self.message_id}', {len(self.steps) - 1})"
            text.append("tokens ▸", Style(underline=True, meta={"@click": link}))
        self.query_one(".stats", Static).update(text)

    async def show_tool_calls(self, calls: list[dict[str, Any]]) -> None:
        """Tool calls the model asked for, as JSON in their own block."""
        block = Static(Syntax(tool_calls_json(calls), "json", background_color="default"), classes="tool-calls")
        block.border_title = "tool call" if len(calls) == 1 else f"{len(calls)} tool calls"
        await self.mount(block, before=self.query_one(".stats"))

    @property
    def steps(self) -> list[TokenEvent]:
        """Every decoding step of the answer: its tokens, then the one that chose to end it."""
        return self.tokens + [self.end] if self.end is not None else self.tokens

    async def show_tokens(self, selected: int | None, mode: str | None = None) -> TokenView:
        """Show the token view (in place of the Markdown) with the cursor on `selected`."""
        self.token_mode = mode or (self.token_mode if self.token_mode != "text" else "heatmap")
        views = self.query(TokenView)
        if views:
            view = views.first()
        else:
            view = TokenView(self.message_id or "", classes="token-view")
            await self.mount(view, after=self.query_one(".content"))
        self.query_one(".content", Markdown).display = False
        self.query_one(".reasoning", Collapsible).display = False
        view.show(self.steps, selected, self.token_mode, frozenset(self.forced), ended=self.end is not None)
        return view

    async def hide_tokens(self) -> None:
        """Back to the answer's text."""
        self.token_mode = "text"
        await self.query(TokenView).remove()
        self.query_one(".content", Markdown).display = True
        self.query_one(".reasoning", Collapsible).display = bool(self.reasoning_text)

    def fail(self, message: str) -> None:
        self.add_class("failed")
        self.query_one(".stats", Static).update(Text(f"error: {message}"))


class ChatView(VerticalScroll):
    """The transcript; follows the newest text unless the user scrolled up to read."""

    virtual_size = quiet_virtual_size()  # see there: one layout per new line of an answer, not two

    def on_mount(self) -> None:
        self.anchor()

    async def add_user(
        self, text: str, message_id: str | None = None, branch: tuple[int, int] | None = None
    ) -> UserMessage:
        message = UserMessage(text, message_id, branch, classes="message user")
        await self.mount(message)
        return message

    async def add_assistant(
        self, title: str = "assistant", message_id: str | None = None, branch: tuple[int, int] | None = None
    ) -> AssistantMessage:
        message = AssistantMessage(title, message_id, branch, classes="message assistant")
        await self.mount(message)
        return message

    async def add_note(self, text: str, *, error: bool = False) -> Static:
        note = Static(text, markup=False, classes="note error" if error else "note")
        await self.mount(note)
        return note

    async def clear(self) -> None:
        await self.remove_children()
