"""What every session says about itself: its model, its capabilities, and its cache's numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmchat.engine.errors import LLMChatError
from llmchat.engine.prompt import PromptMode
from llmchat.engine.sampling import SamplingParams
from llmchat.session.metrics import ServerCache


@dataclass(frozen=True)
class Capabilities:
    """What a session can show; a panel or view asks before it offers something."""

    top_k: int  # candidates reported per generated token
    probabilities: str  # what those are: "raw softmax and after the sampling policy"
    reread_steps: bool  # a step's full logits can be read again (the inspector's policy view)
    branch_at_token: bool  # an answer can continue from chosen tokens (answer_prefix)
    kv_cache: bool  # cache figures (tokens, bytes, reuse)
    memory: bool  # the memory bill, predicted and measured
    prompt_tokens: bool  # the prompt as token ids (the inspector's prompt view)
    # what happens inside the layers (logit lens, attention, experts, recurrent state, prompt heatmap):
    # llmchat's own engine only, computed on demand (engine/inside.py)
    layer_views: bool = False
    # where the model runs, for the panels' titles and "on the server" notes: "this process" or a URL
    where: str = "this process"
    # the token ids are the model's vocabulary ids (False: a server's protocol carries only text, and
    # the ids are the session's own numbering of the texts it has seen)
    token_ids: bool = True


@dataclass(frozen=True)
class SessionInfo:
    """The model behind a session, as the status bar and the welcome screen describe it."""

    name: str
    path: str
    kind: str  # "chat", "base", "reasoning" …: model_type.detect's kind
    labels: tuple[str, ...]  # its capabilities in words (tools, reasoning …)
    chat: bool  # it has a chat template (else only completion mode)
    context_length: int
    device: str  # "cpu", "cuda"
    precision: str  # "float32 · Q4_1 packed"
    default_sampling: SamplingParams


@dataclass(frozen=True)
class CacheStats:
    """The KV cache's size now (the KV panel)."""

    tokens: int  # positions held
    capacity: int  # positions it can hold
    used_bytes: int  # bytes holding those positions (and a hybrid's fixed states)
    capacity_bytes: int  # what the whole cache costs
    state_bytes: int  # a hybrid model's recurrent states and their snapshots (0 for the others)
    server: ServerCache | None = None  # a server's own figures for its whole cache (its /metrics)


def server_host(url: str) -> str:
    """host:port of a server's URL, as the status bar, the panels and messages name it."""
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url


class SessionUnavailable(LLMChatError):
    """What a session cannot do, in words the user sees ("a server cannot re-read a step's logits")."""


@dataclass(frozen=True)
class ServerSpec:
    """An OpenAI-compatible server a remote session talks to (a registered remote model, or --server).

    The API key is never held here, only the name of the environment variable it is read from, so
    a spec can be saved (models.toml, a conversation file) without leaking it.
    """

    url: str  # base URL, e.g. http://127.0.0.1:8080 (the session adds /v1/...)
    model: str | None = None  # the server's model name (None: the server's only/first one)
    api_key_env: str | None = None  # environment variable holding the API key (never the key)
    tokenizer: str | None = None  # a local model folder/GGUF whose template and tokenizer match the server's
    protocol: str = "openai"  # "openai" (chat completions) or "ollama" (Ollama's native /api/chat)


class Session(Protocol):
    """What the chat and the CLI call; `LocalSession` (this process) and `RemoteSession` (a server)
    implement it. A call a session cannot serve raises `SessionUnavailable`; the UI asks
    `capabilities` first so the user is told before, not after."""

    info: SessionInfo
    capabilities: Capabilities

    def answer(
        self,
        messages: list[dict[str, Any]],
        *,
        answer_id: str,
        mode: PromptMode,
        sampling: SamplingParams,
        live_sampling: Callable[[], SamplingParams] | None = None,
        cancel: Any = None,
        max_new_tokens: int | None = None,
        answer_prefix: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
    ) -> Iterator[Any]: ...

    def prompt_tokens(self, messages: list[dict[str, Any]], mode: PromptMode) -> list[int]: ...
    def prompt_ids(self, answer_id: str | None) -> list[int] | None: ...
    def token_text(self, token_id: int) -> str: ...
    def forget_prompts(self) -> None: ...
    def default_system_prompt(self) -> str | None: ...
    def cache_stats(self) -> CacheStats: ...
    def close(self) -> None: ...
