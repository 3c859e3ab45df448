"""transformers as the reference: a tiny folder's float32 logits and greedy tokens, and random prompts.

One home for what the parity tests (test_parity, test_moe, test_smollm3) compare llmchat against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def vocab_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_model(folder: Path) -> PreTrainedModel:
    """A fresh transformers model: dynamic RoPE keeps state between calls, so none is shared."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def hf_greedy(model: PreTrainedModel, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of `generate`; `eos_token_id=None` turns EOS stopping off without touching logits
    (`min_new_tokens` would instead mask EOS out of the argmax)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


def llmchat_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """llmchat's greedy tokens for `prompt` from an empty cache, EOS not stopping them: what
    `hf_greedy` gives for transformers."""
    from llmchat.engine.events import TokenEvent
    from llmchat.engine.sampling import SamplingParams

    model.reset()
    events = model.generate(
        prompt, sampling=SamplingParams(temperature=0), max_new_tokens=new_tokens, stop_on_eos=False
    )
    return [e.token_id for e in events if isinstance(e, TokenEvent)]
