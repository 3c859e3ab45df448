"""`llmchat serve`: llmchat's own engine as an OpenAI-compatible HTTP server (see serve/app.py)."""

from __future__ import annotations

from llmchat.serve.app import MAX_TOP_LOGPROBS, make_app

__all__ = ["MAX_TOP_LOGPROBS", "make_app"]
