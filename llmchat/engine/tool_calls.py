"""Tool calls in an answer's text, in the formats tool-tuned models write them.

Tool-tuned models ask for a tool by writing JSON in a wrapper their chat template teaches them:

- Hermes / Qwen 2.5 / Qwen 3: `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (one per call),
- Mistral: `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`,
- Llama 3.1+: `<|python_tag|>{"name": …, "parameters": {…}}`, or a bare JSON object with `name` and
  `parameters` as the whole answer.

`split_tool_calls` returns the text without the calls and the calls in the OpenAI-style shape chat
templates read back (`{"type": "function", "function": {"name", "arguments"}}`), so the next turn
renders them as the model expects. Text that only looks like a call (bad JSON, no name) stays text.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_MISTRAL = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"


def _call(data: Any) -> dict[str, Any] | None:
    """One call in the template shape, or None when `data` is not a call."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("function"), dict):  # already OpenAI-shaped
        data = data["function"]
    name = data.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments)
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _calls(payload: str) -> list[dict[str, Any]] | None:
    """Calls in a JSON payload (an object or a list of them); None if any part is not a call."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    calls = [_call(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def split_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text without its tool calls, the calls); ([text], []) when there are none."""
    if "<tool_call>" in text:
        found: list[dict[str, Any]] = []
        kept: list[str] = []
        last = 0
        for match in _HERMES.finditer(text):
            calls = _calls(match.group(1))
            if calls is None:
                continue
            found.extend(calls)
            kept.append(text[last : match.start()])
            last = match.end()
        if found:
            kept.append(text[last:])
            return "".join(kept).strip(), found
    for marker in (_MISTRAL, _PYTHON_TAG):
        if marker in text:
            before, _, payload = text.partition(marker)
            calls = _calls(payload.strip())
            if calls is not None:
                return before.strip(), calls
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}") and '"name"' in stripped:
        calls = _calls(stripped)
        if calls is not None and "parameters" in json.loads(stripped):  # Llama's bare-JSON form
            return "", calls
    return text, []


def tool_calls_json(calls: list[dict[str, Any]]) -> str:
    """The calls as indented JSON, the way the chat shows them."""
    shown = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
    return json.dumps(shown[0] if len(shown) == 1 else shown, indent=2, ensure_ascii=False)
