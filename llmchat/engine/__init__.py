"""The inference engine's public API. No UI code lives under engine/.

Names are imported on first use, so that light modules (`engine.errors`, `engine.events`) can be
used without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmchat.engine.errors import LLMChatError
    from llmchat.engine.events import Finished, ForcedPrefix, PrefillDone, PrefillProgress, TokenEvent, TopToken
    from llmchat.engine.runtime import LoadedModel, load
    from llmchat.engine.sampling import SamplingParams

_WHERE = {
    "Finished": "events",
    "ForcedPrefix": "events",
    "PrefillDone": "events",
    "PrefillProgress": "events",
    "TokenEvent": "events",
    "TopToken": "events",
    "LLMChatError": "errors",
    "LoadedModel": "runtime",
    "load": "runtime",
    "SamplingParams": "sampling",
}
__all__ = [
    "Finished",
    "ForcedPrefix",
    "LLMChatError",
    "LoadedModel",
    "PrefillDone",
    "PrefillProgress",
    "SamplingParams",
    "TokenEvent",
    "TopToken",
    "load",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"llmchat.engine.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'llmchat.engine' has no attribute {name!r}")
