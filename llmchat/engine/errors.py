"""Errors the user can act on.

Every failure caused by input (a path, a file, a config, a template, a prompt) is raised as an
`LLMChatError` subclass with a one-line message; the CLI prints it and exits with code 2, the TUI
shows it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LLMChatError(Exception):
    """Base class: the message is shown to the user as is."""


class ModelLoadError(LLMChatError):
    """A model package is missing, corrupt, unsafe or of an unsupported kind."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture the engine does not implement."""


class TokenizerError(LLMChatError):
    """The tokenizer files are missing or unreadable."""


class TemplateError(LLMChatError):
    """A chat template is missing, does not parse, or raised while rendering."""


class ContextFullError(LLMChatError):
    """The prompt alone does not fit in the context window."""
