"""A conversation's current branch as text a person reads: Markdown for export, plain text for `show`.

Both print only the branch on screen (`Conversation.path()`): a transcript is one line of talk,
not the whole tree of edits and retries.
"""

from __future__ import annotations

import json
from typing import Any

from llmchat.chat.conversation import Conversation, Message

FINISH_REASONS = {
    "eos": "end of answer",
    "stop_string": "stop string",
    "max_new_tokens": "token limit",
    "context_full": "context full",
    "cancelled": "stopped by user",
}


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


def to_markdown(conversation: Conversation) -> str:
    """A clean Markdown transcript: reasoning folded in <details>, a stats line under each answer."""
    lines = [f"# {conversation.title or 'Untitled conversation'}", ""]
    model = conversation.model.get("name")
    if model:
        lines.append(f"- Model: {model}")
    lines += [f"- Created: {conversation.created}", f"- Updated: {conversation.updated}", ""]
    if conversation.system:
        lines += ["## System", "", conversation.system, ""]
    for message in conversation.path():
        lines += [f"## {_heading(message)}", ""]
        if message.reasoning:
            lines += ["<details>", "<summary>Reasoning</summary>", "", message.reasoning.strip(), "", "</details>", ""]
        if message.content:
            lines += [message.content, ""]
        if message.tool_calls:
            lines += ["Tool calls:", "", "```json", _tool_calls_json(message), "```", ""]
        stats = format_stats(message.stats)
        if stats:
            lines += [f"*{stats}*", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def to_text(conversation: Conversation) -> str:
    """The current branch for a terminal: role headers, branch positions ('2/3'), reasoning indented."""
    model = conversation.model.get("name") or "no model"
    lines = [
        f"{conversation.title or 'Untitled conversation'}  [{conversation.id}]",
        f"{model} · {conversation.turns} turn{'' if conversation.turns == 1 else 's'} · updated {conversation.updated}",
        "",
    ]
    if conversation.system:
        lines += ["--- system ---", conversation.system, ""]
    for message in conversation.path():
        index, count = conversation.sibling_position(message.id)
        branch = f" (branch {index + 1}/{count})" if count > 1 else ""
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
    return "\n".join(lines).rstrip("\n") + "\n"
