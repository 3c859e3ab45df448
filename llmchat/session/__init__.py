"""Sessions: what the chat and the CLI talk to instead of an engine.

A session takes a conversation's messages (not token ids), renders and tokenizes them as its engine
needs, streams the engine's `GenerationEvent`s, and says what it can show (`Capabilities`). The only
one today is `LocalSession`, llmchat's own engine in this process; a remote one (an
OpenAI-compatible server) will implement the same calls.
"""

from __future__ import annotations

from llmchat.session.base import CacheStats, Capabilities, SessionInfo
from llmchat.session.local import LocalSession

__all__ = ["CacheStats", "Capabilities", "LocalSession", "SessionInfo"]
