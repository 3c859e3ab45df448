"""A conversation's current branch as text a person reads: Markdown for export, plain text for `show`.

Both print only the branch on screen (`Conversation.path()`): a transcript is one line of talk,
not the whole tree of edits and retries. The system prompt appears where it was set (before the
first message it applied to), and again wherever it was changed.
"""

from __future__ import annotations

import json
from typing import Any

from llmchat.chat.conversation import INTERRUPTED, Conversation, Message
from llmchat.chat.markdown import hard_line_breaks

FINISH_REASONS = {
    "eos": "end of answer",
    "stop_string": "stop string",
    "max_new_tokens": "token limit",
    "context_full": "context full",
    "cancelled": "stopped by user",
    "error": "cut off (the server failed mid-answer)",
    INTERRUPTED: "interrupted (the chat closed mid-answer)",
}
SYSTEM_REMOVED = "(system prompt removed)"


def format_stats(stats: dict[str, Any] | None) -> str:
    """One line of an answer's numbers, e.g. '42 tokens · TTFT 0.21 s · decode 25.1 tok/s · end of answer'."""
    if not stats:
        return ""
    parts: list[str] = []
    if isinstance(stats.get("tokens"), int):
        parts.append(f"{stats['tokens']} tokens")
    for key, label, unit, digits in (
        ("ttft_s", "TTFT", "s", 2),
        ("prefill_tok_s", "prefill", "tok/s", 1),
        ("decode_tok_s", "decode", "tok/s", 1),
    ):
        value = stats.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {value:.{digits}f} {unit}")
    reason = stats.get("finish_reason")
    if isinstance(reason, str):
        parts.append(FINISH_REASONS.get(reason, reason))
    return " · ".join(parts)


def _heading(message: Message) -> str:
    return message.role.capitalize()


def _tool_calls_json(message: Message) -> str:
    return json.dumps(message.tool_calls, ensure_ascii=False, indent=2)


def _system_sections(conversation: Conversation) -> dict[int, str]:
    """Index in the branch → the system prompt that took effect before that message."""
    return {index: text or SYSTEM_REMOVED for index, text in conversation.system_prompts()}


def to_markdown(conversation: Conversation) -> str:
    """A clean Markdown transcript: reasoning folded in <details>, a stats line under each answer."""
    lines = [f"# {conversation.title or 'Untitled conversation'}", ""]
    model = conversation.model.get("name")
    if model:
        lines.append(f"- Model: {model}")
    lines += [f"- Created: {conversation.created}", f"- Updated: {conversation.updated}", ""]
    systems = _system_sections(conversation)
    path = conversation.path()
    for index, message in enumerate(path):
        if index in systems:
            lines += ["## System", "", hard_line_breaks(systems[index]), ""]
        lines += [f"## {_heading(message)}", ""]
        if message.reasoning:
            reasoning = hard_line_breaks(message.reasoning.strip())  # the lines as the model wrote them
            lines += ["<details>", "<summary>Reasoning</summary>", "", reasoning, "", "</details>", ""]
        if message.content:
            lines += [hard_line_breaks(message.content), ""]
        if message.tool_calls:
            lines += ["Tool calls:", "", "```json", _tool_calls_json(message), "```", ""]
        stats = format_stats(message.stats)
        if stats:
            lines += [f"*{stats}*", ""]
    if len(path) in systems:  # set after the last message: it applies to the next one
        lines += ["## System", "", hard_line_breaks(systems[len(path)]), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def to_text(conversation: Conversation) -> str:
    """The current branch for a terminal: role headers, branch positions ('2/3'), reasoning indented."""
    model = conversation.model.get("name") or "no model"
    lines = [
        f"{conversation.title or 'Untitled conversation'}  [{conversation.id}]",
        f"{model} · {conversation.turns} turn{'' if conversation.turns == 1 else 's'} · updated {conversation.updated}",
        "",
    ]
    systems = _system_sections(conversation)
    path = conversation.path()
    for index, message in enumerate(path):
        if index in systems:
            lines += ["--- system ---", systems[index], ""]
        position, count = conversation.sibling_position(message.id)
        branch = f" (branch {position + 1}/{count})" if count > 1 else ""
        lines.append(f"--- {message.role}{branch} ---")
        if message.reasoning:
            lines += ["[reasoning]", *("  " + line for line in message.reasoning.strip().splitlines()), "[/reasoning]"]
        if message.content:
            lines.append(message.content)
        if message.tool_calls:
            lines += ["[tool calls]", _tool_calls_json(message)]
        stats = format_stats(message.stats)
        if stats:
            lines.append(f"({stats})")
        lines.append("")
    if len(path) in systems:
        lines += ["--- system ---", systems[len(path)], ""]
    return "\n".join(lines).rstrip("\n") + "\n"
