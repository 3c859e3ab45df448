"""llmchat: a terminal chat for local LLMs with its own PyTorch inference engine."""

from llmchat.engine import LoadedModel, SamplingParams, load

__all__ = ["LoadedModel", "SamplingParams", "load"]
__version__ = "0.1.0"
