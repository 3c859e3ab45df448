"""The decoding policy: which token comes next, given the model's logits.

The stages and their math follow Hugging Face transformers exactly (repetition penalty →
temperature → top-k → top-p → min-p → sample, filter value -inf, min_tokens_to_keep=1), so a
chat here picks from the same distribution as `model.generate` would. Each stage is a plain
function; `Sampler` (the generation loop) and `policy_stages` (the inspector) run the same ones,
so what the inspector shows is what was sampled from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmchat.engine.knobs import KNOBS

_FILTER = float("-inf")
_GEN_CONFIG_KEYS = tuple(knob.name for knob in KNOBS if knob.generation_config)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; the neutral value of each knob disables it."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None  # None = a fresh random seed per generation

    def __post_init__(self) -> None:
        # Coerce so that JSON/CLI ints behave like the floats transformers expects; ranges: knobs.KNOBS.
        for knob in KNOBS:
            value = getattr(self, knob.name)
            if knob.kind is int:
                if int(value) != value:
                    raise ValueError(f"{knob.name} must be a whole number, got {value!r}")
                value = int(value)
            object.__setattr__(self, knob.name, knob.kind(value))
        for knob in KNOBS:
            value = getattr(self, knob.name)
            problem = knob.problem(value)
            if problem:
                raise ValueError(f"{knob.name} {problem}, got {value}")

    @property
    def greedy(self) -> bool:
        """Temperature 0: argmax, like transformers with do_sample=False."""
        return self.temperature == 0.0

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(cls, gen: Mapping[str, Any], **overrides: Any) -> SamplingParams:
        """Params from a parsed generation_config.json; overrides that are not None win.

        Only an explicit `do_sample: false` means greedy: many shipped configs omit it while
        setting a temperature they clearly intend to be used.
        """
        fields: dict[str, Any] = {k: gen[k] for k in _GEN_CONFIG_KEYS if gen.get(k) is not None}
        if gen.get("do_sample") is False:
            fields["temperature"] = 0.0
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


# --- stages -----------------------------------------------------------------------------------
# Each takes logits [..., vocab] and returns the input object itself when the stage is disabled
# (no copy), else a new tensor; the caller's logits are never modified.


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the context less likely: divide positive logits, multiply negative."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sharpen (<1) or flatten (>1) the distribution."""
    if params.temperature == 1.0:
        return logits
    return logits / params.temperature


def apply_top_k(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Keep the k highest logits; ties with the k-th are kept too (same as transformers)."""
    if params.top_k == 0:
        return logits
    k = min(params.top_k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, _FILTER)


def apply_top_p(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Nucleus: drop the least likely tokens whose cumulative probability is <= 1 - top_p."""
    if params.top_p == 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - params.top_p)
    sorted_remove[..., -1:] = False  # min_tokens_to_keep=1: the top token always survives
    remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
    return logits.masked_fill(remove, _FILTER)


def apply_min_p(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability.

    transformers also re-admits the top token (min_tokens_to_keep=1); that is a no-op because
    min_p <= 1 means the top probability never falls below its own threshold.
    """
    if params.min_p == 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = params.min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, _FILTER)


_Warper = Callable[[torch.Tensor, SamplingParams], torch.Tensor]
# The warpers in transformers' order; they only apply when sampling (not greedy).
_WARPERS: tuple[tuple[str, _Warper], ...] = (
    ("temperature", apply_temperature),
    ("top_k", apply_top_k),
    ("top_p", apply_top_p),
    ("min_p", apply_min_p),
)


def _seen_mask(vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """A context mask with one spare slot at `vocab_size` that absorbs ids the logits lack."""
    return torch.zeros(vocab_size + 1, dtype=torch.bool, device=device)


def _mark_seen(mask: torch.Tensor, token_ids: torch.Tensor | Sequence[int]) -> None:
    """Flag ids in the mask; ids past the logits' vocab (padded embeddings) go to the spare slot."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=mask.device).reshape(-1)
    mask.index_fill_(0, ids.clamp(max=mask.numel() - 1), True)


class Sampler:
    """Holds params, the RNG and a penalty mask; one per generation."""

    def __init__(
        self, params: SamplingParams, vocab_size: int, device: torch.device | str = "cpu", *, live: bool = False
    ):
        self.params = params
        self.vocab_size = vocab_size
        # A live sampler may have its params changed mid-answer, so it tracks the context even
        # while the repetition penalty is off: turning the penalty on then sees the whole context.
        self._track_context = live
        self._seen_all = _seen_mask(vocab_size, device)
        self._seen = self._seen_all[:vocab_size]
        # Own generator, seeded once: reproducible with a seed, and the global RNG is left alone.
        self._generator = torch.Generator(device=device)
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)

    def observe(self, token_ids: torch.Tensor | Sequence[int]) -> None:
        """Add ids to the context the repetition penalty sees (the prompt once, then each token)."""
        if self._track_context or self.params.repetition_penalty != 1.0:
            _mark_seen(self._seen_all, token_ids)

    def update(self, params: SamplingParams) -> None:
        """Switch the policy for the next token (a user turned a knob mid-answer); the RNG stays."""
        if params.seed != self.params.seed and params.seed is not None:
            self._generator.manual_seed(params.seed)
        self.params = params

    def policy_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits after penalty → temperature → top-k → top-p → min-p, -inf where cut.

        Greedy stops after the penalty, as transformers applies no warpers without do_sample.
        """
        params = self.params
        logits = apply_repetition_penalty(logits, self._seen, params.repetition_penalty)
        if params.greedy:
            return logits
        for _, warp in _WARPERS:
            logits = warp(logits, params)
        return logits

    def choose(self, policy_logits: torch.Tensor) -> torch.Tensor:
        """The next token id as a 0-d int64 tensor (stays on device: no sync)."""
        if self.params.greedy:
            return policy_logits.argmax(dim=-1)
        probs = policy_logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(-1)

    def policy_probs(self, policy_logits: torch.Tensor) -> torch.Tensor:
        """The distribution `choose` draws from; greedy is a one-hot on the argmax."""
        if self.params.greedy:
            top = policy_logits.argmax(dim=-1, keepdim=True)
            return torch.zeros_like(policy_logits).scatter_(-1, top, 1.0)
        return policy_logits.softmax(dim=-1)


# --- the candidates' order ---------------------------------------------------------------------
# One order for every view of a step: highest logit first, equal logits by lowest token id. It is
# the order greedy decoding picks in (argmax returns the first maximum), the order the top-k lists
# show, and what a token's rank counts. torch.topk leaves equal values in no promised order.


def candidate_order(values: Sequence[float], ids: Sequence[int], k: int) -> list[int] | None:
    """Positions in (`values`, `ids`) of the k first candidates in the canonical order, given
    torch.topk's k + 1 highest (values descending); None when the cut at k splits equal logits, so
    that which ids come in is not known from these (`exact_top` then)."""
    if k < len(values) and values[k - 1] == values[k]:
        return None
    return sorted(range(min(k, len(values))), key=lambda i: (-values[i], ids[i]))


def exact_top(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k first candidates of 1-D `logits` in the canonical order, by a stable sort of
    the whole vocabulary (what `candidate_order` falls back to on a tie across the cut)."""
    return torch.sort(logits, descending=True, stable=True).indices[:k]


def top_candidates(logits: torch.Tensor, k: int) -> list[int]:
    """Ids of the k highest of 1-D `logits`, highest first, equal logits by lowest id."""
    k = min(k, logits.numel())
    if k <= 0:
        return []
    values, ids = logits.topk(min(k + 1, logits.numel()))
    listed = ids.tolist()
    order = candidate_order(values.tolist(), listed, k)
    return exact_top(logits, k).tolist() if order is None else [listed[i] for i in order]


def rank_of(logits: torch.Tensor, chosen: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The chosen token's place in the canonical order (0 = first) as a 0-d tensor (no sync):
    the logits above its own, plus the equal ones of a lower id. `positions`: arange(vocab), when
    the caller keeps one."""
    if positions is None:
        positions = torch.arange(logits.shape[-1], device=logits.device)
    value = logits[chosen]
    return (logits > value).sum() + ((logits == value) & (positions < chosen)).sum()


NATS_PER_BIT = math.log(2)


def entropy(probs: torch.Tensor, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Shannon entropy (nats, a 0-d tensor) of a distribution over a 1-D vocabulary; 0·log 0 = 0.

    `log_probs`, for a distribution with no zeros (a raw softmax), turns it into one dot product:
    `entr` over the demo model's 49k entries took twice as long. A policy's distribution, zero where
    it cut, goes through `entr`.
    """
    if log_probs is not None:
        return -torch.dot(probs, log_probs)
    return torch.special.entr(probs).sum()


def policy_stages(
    logits: torch.Tensor, params: SamplingParams, context_ids: Sequence[int] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """The logits after each stage, for the inspector; a disabled stage repeats the previous one."""
    seen = _seen_mask(logits.shape[-1], logits.device)
    if context_ids:
        _mark_seen(seen, context_ids)
    stages = [("raw", logits)]
    current = apply_repetition_penalty(logits, seen[:-1], params.repetition_penalty)
    stages.append(("repetition_penalty", current))
    for name, warp in _WARPERS:
        if not params.greedy:
            current = warp(current, params)
        stages.append((name, current))
    return stages
