"""The inference engine's public API. No UI code lives under engine/."""

from llmchat.engine.errors import LLMChatError
from llmchat.engine.events import Finished, PrefillDone, PrefillProgress, TokenEvent, TopToken
from llmchat.engine.runtime import LoadedModel, load
from llmchat.engine.sampling import SamplingParams

__all__ = [
    "Finished",
    "LLMChatError",
    "LoadedModel",
    "PrefillDone",
    "PrefillProgress",
    "SamplingParams",
    "TokenEvent",
    "TopToken",
    "load",
]
