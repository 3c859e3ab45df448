"""What every session says about itself: its model, its capabilities, and its cache's numbers."""

from __future__ import annotations

from dataclasses import dataclass

from llmchat.engine.sampling import SamplingParams


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
