"""Events a generation emits, as plain dataclasses.

Everything a UI panel or a script needs travels in these: the engine never calls back into a UI.
A generation yields, in order: `PrefillProgress`* (one per prefill chunk), `PrefillDone`,
`ForcedPrefix` (only when the answer continues from tokens chosen before: a branch at a token),
`TokenEvent`* (one per generated token), then exactly one `Finished`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# "error": a remote server failed mid-answer (refused, cut the stream, timed out); `Finished.error`
# says how, and the text so far is kept like a stopped answer's.
FinishReason = Literal["eos", "stop_string", "max_new_tokens", "context_full", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class TopToken:
    """One candidate for the next token."""

    token_id: int
    text: str
    logit: float
    prob: float  # softmax of the raw logits (temperature 1, no filtering)
    policy_prob: float  # probability under the active sampling policy (0 if the policy cut it)


@dataclass(frozen=True, slots=True)
class PrefillProgress:
    """One prefill chunk went through the model."""

    done_tokens: int  # prompt tokens processed so far in this request (excluding reused ones)
    total_tokens: int  # prompt tokens this request has to prefill
    chunk_tokens: int
    chunk_seconds: float
    cache_tokens: int
    cache_bytes: int


@dataclass(frozen=True, slots=True)
class PrefillDone:
    """The prompt is in the KV cache; decoding starts next."""

    prompt_tokens: int  # length of the whole prompt
    reused_tokens: int  # tokens taken from the cache (longest common prefix)
    prefilled_tokens: int  # tokens that went through the model now
    seconds: float
    tokens_per_second: float
    cache_tokens: int
    cache_bytes: int


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token and what the model thought of it."""

    token_id: int
    text: str  # the new text this token completes (UTF-8 safe; may be "" while a character is split)
    index: int  # 0-based position in the answer
    logit: float
    prob: float  # raw probability (temperature 1)
    policy_prob: float
    rank: int  # 0 = the most likely token under the raw distribution
    top: tuple[TopToken, ...]
    seconds: float  # wall time of this decode step (for the first token: since the request began)
    cache_tokens: int
    cache_bytes: int
    # `text` routed by channel (reasoning models think inside <think>…</think>); markers dropped.
    reasoning: str = ""
    content: str = ""
    entropy: float = 0.0  # of the raw distribution, in bits: how unsure the model was at this step
    policy_entropy: float = 0.0  # of the distribution the token was drawn from (0 for greedy)


@dataclass(frozen=True, slots=True)
class ForcedPrefix:
    """The answer begins with tokens chosen before this request (a branch at a token).

    They are not sampled again: they went into the cache with the prompt, and their text is
    handed over once, here; the `TokenEvent`s that follow continue at index `len(token_ids)`.
    """

    token_ids: tuple[int, ...]
    text: str
    reasoning: str = ""
    content: str = ""


@dataclass(frozen=True, slots=True)
class Finished:
    """The generation ended; totals for the request."""

    reason: FinishReason
    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    ttft_seconds: float  # request start to the first generated token
    text: str = ""  # the whole answer (cut before a stop string)
    tail: str = ""  # answer text not carried by any TokenEvent (held back until the end)
    reasoning: str = ""  # the thinking part of `text` (reasoning models), markers dropped
    content: str = ""  # the answer proper
    token_ids: tuple[int, ...] = field(default_factory=tuple)  # the whole answer, a forced prefix included
    cache_tokens: int = 0
    cache_bytes: int = 0
    prefix_tokens: int = 0  # answer tokens given by the request (ForcedPrefix), not generated
    prefill_chunks: tuple[tuple[int, float], ...] = ()  # (tokens, seconds) of each prefill chunk
    # The step that chose end-of-sequence (reason "eos"): its probabilities, for the inspector. Its
    # token is not part of the answer; `text` is the token's display text (e.g. "<|im_end|>").
    end_step: TokenEvent | None = None
    error: str = ""  # reason "error": what went wrong, in words for the user (never an API key)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first token comes out of prefill; decode steps are the ones after it.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


GenerationEvent = PrefillProgress | PrefillDone | ForcedPrefix | TokenEvent | Finished
