"""Sessions: what the chat and the CLI talk to instead of an engine.

A session takes a conversation's messages (not token ids), renders and tokenizes them as its engine
needs, streams the engine's `GenerationEvent`s, and says what it can show (`Capabilities`). `LocalSession` is
llmchat's own engine in this process; `RemoteSession` (session/remote.py) an OpenAI-compatible
server (vLLM, llama-server, Ollama, SGLang, `llmchat serve`) behind the same calls.
"""

from __future__ import annotations

from llmchat.session.base import (
    CacheStats,
    Capabilities,
    ServerSpec,
    Session,
    SessionInfo,
    SessionUnavailable,
    server_host,
)
from llmchat.session.local import LocalSession

__all__ = [
    "CacheStats",
    "Capabilities",
    "LocalSession",
    "ServerSpec",
    "Session",
    "SessionInfo",
    "SessionUnavailable",
    "server_host",
]
