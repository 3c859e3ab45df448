"""llmchat: a terminal chat for local LLMs with its own PyTorch inference engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmchat.engine import LoadedModel, SamplingParams, load

__all__ = ["LoadedModel", "SamplingParams", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: `import llmchat.chat` (and headless commands such as `llmchat chats`) must not pay
    # for importing torch.
    if name in __all__:
        import llmchat.engine

        return getattr(llmchat.engine, name)
    raise AttributeError(f"module 'llmchat' has no attribute {name!r}")
