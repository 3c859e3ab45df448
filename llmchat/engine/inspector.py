"""What the inspector shows of one decoding step, as plain numbers (no tensors leave this module).

`policy_view` runs the sampler's own stage functions (`sampling.policy_stages`) over a step's raw
logits and reports, for the step's top candidates, the probability after each stage, what each
stage cut, and the entropy left: a "what if" for other sampling settings costs only this, never
a forward pass. `prompt_view` says which tokens of the next request the KV cache already holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llmchat.engine.knobs import KNOB, KNOBS
from llmchat.engine.sampling import NATS_PER_BIT, SamplingParams, entropy, policy_stages, top_candidates

STAGE_TITLES = {"raw": "raw logits (softmax)"} | {knob.name: knob.label for knob in KNOBS} | {"policy": "sampled from"}


@dataclass(frozen=True)
class Candidate:
    """One token and its probability after each stage (0 once a stage cut it)."""

    token_id: int
    text: str
    logit: float  # raw
    probs: tuple[float, ...]  # one per PolicyView.stages


@dataclass(frozen=True)
class Stage:
    """One stage of the sampler chain."""

    name: str  # "raw", "repetition_penalty", "temperature", "top_k", "top_p", "min_p", "policy"
    setting: str  # e.g. "0.7", "off", "greedy: argmax"
    active: bool  # whether it changed the distribution (a disabled stage repeats the previous one)
    kept: int  # vocabulary entries still possible after it
    removed: int  # entries it cut
    removed_shown: tuple[str, ...]  # the candidates (of those shown) it cut
    entropy: float  # bits, of the distribution after it
    other: float  # probability mass outside the shown candidates


@dataclass(frozen=True)
class PolicyView:
    """The sampler chain applied to one step's logits."""

    params: SamplingParams
    stages: tuple[Stage, ...]
    candidates: tuple[Candidate, ...]
    chosen_id: int | None

    def prob(self, token_id: int, stage: str = "policy") -> float:
        """A candidate's probability after a stage (0 if it is not among the candidates)."""
        index = [s.name for s in self.stages].index(stage)
        return next((c.probs[index] for c in self.candidates if c.token_id == token_id), 0.0)


def _setting(name: str, params: SamplingParams) -> tuple[str, bool]:
    """How a stage is set and whether it acts (warpers act only when sampling)."""
    if name == "repetition_penalty":  # the one stage greedy decoding applies too
        off = params.repetition_penalty == KNOB[name].neutral
        return ("off", False) if off else (f"{params.repetition_penalty:g}", True)
    if params.greedy:
        return "skipped (greedy)", False
    value = getattr(params, name)
    return ("off", False) if value == KNOB[name].neutral else (f"{value:g}", True)


@torch.inference_mode()
def policy_view(
    logits: torch.Tensor,
    params: SamplingParams,
    token_text: Callable[[int], str],
    *,
    context_ids: Sequence[int] = (),
    top: int = 10,
    chosen_id: int | None = None,
) -> PolicyView:
    """The sampler chain over raw `logits` [vocab] of one step, seen through its `top` candidates.

    `context_ids` are the tokens before the step (the repetition penalty's context); `chosen_id`,
    the token the step produced, is shown even when it is not among the top candidates.
    """
    logits = logits.float().reshape(-1)
    staged = policy_stages(logits, params, context_ids)
    final = staged[-1][1]
    if params.greedy:  # what Sampler.policy_probs draws from: all mass on the argmax
        policy_probs = torch.zeros_like(final).scatter_(-1, final.argmax(-1, keepdim=True), 1.0)
    else:
        policy_probs = final.softmax(-1)
    ids = top_candidates(logits, top)  # the order the step's top-k list and rank use
    if chosen_id is not None and chosen_id not in ids and 0 <= chosen_id < logits.numel():
        ids.append(chosen_id)
    index = torch.tensor(ids, dtype=torch.long)

    rows: list[list[float]] = []
    stages: list[Stage] = []
    previous_kept = logits.numel()
    previous_alive = torch.ones_like(logits, dtype=torch.bool)
    distributions = [(name, values.softmax(-1), values > -math.inf) for name, values in staged]
    distributions.append(("policy", policy_probs, policy_probs > 0 if params.greedy else final > -math.inf))
    for name, probs, alive in distributions:
        kept = int(alive.sum())
        cut = previous_alive & ~alive
        removed_shown = tuple(token_text(i) for i in index[cut[index]].tolist())
        if name == "raw":
            setting, active = "", True
        elif name == "policy":
            setting, active = ("greedy: argmax", True) if params.greedy else ("", True)
        else:
            setting, active = _setting(name, params)
        shown = probs[index]
        stages.append(
            Stage(
                name=name,
                setting=setting,
                active=active,
                kept=kept,
                removed=previous_kept - kept,
                removed_shown=removed_shown,
                entropy=float(entropy(probs)) / NATS_PER_BIT,
                other=max(0.0, 1.0 - float(shown.sum())),
            )
        )
        rows.append(shown.tolist())
        previous_kept, previous_alive = kept, alive
    raw_logits = logits[index].tolist()
    candidates = tuple(
        Candidate(token_id=i, text=token_text(i), logit=raw_logits[n], probs=tuple(row[n] for row in rows))
        for n, i in enumerate(ids)
    )
    return PolicyView(params=params, stages=tuple(stages), candidates=candidates, chosen_id=chosen_id)


@dataclass(frozen=True)
class PromptView:
    """The next request as the model will see it: rendered text, its tokens, and what the cache holds."""

    text: str
    token_ids: tuple[int, ...]
    token_texts: tuple[str, ...]
    reused: int  # leading tokens the KV cache already holds (the engine's own count)
    completion: bool = False  # the text is the plain transcript (completion mode), not a chat template's

    @property
    def to_prefill(self) -> int:
        return len(self.token_ids) - self.reused
