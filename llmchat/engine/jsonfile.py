"""Reading the small JSON files a model package is made of, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmchat.engine.errors import LLMChatError


def read_json_object(path: Path, error: type[LLMChatError]) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no such file.

    Unreadable files, bad JSON and non-object JSON raise `error` with a one-line message naming
    the file, so each caller reports the problem in its own terms (model, tokenizer, template).
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise error(f"cannot read {path}: {detail}") from None
    if not isinstance(data, dict):
        raise error(f"cannot read {path}: expected a JSON object")
    return data
