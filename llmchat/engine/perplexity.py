"""Perplexity of a text under a model: how the fast paths prove they did not trade quality away.

The text is cut into windows of `window` tokens; each window is one fresh forward pass and every
token after its first is scored by the log-probability the model gave it. Perplexity is
exp(mean negative log-likelihood) over all scored tokens. Comparing the same weights run packed
and dequantized to float32 (`llmchat perplexity MODEL --file TEXT` with and without
`--dequantize`) shows what a kernel's rounding costs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_WINDOW = 512


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    scored_tokens: int
    windows: int
    seconds: float


@torch.inference_mode()
def perplexity(
    logits_of: Callable[[Sequence[int]], torch.Tensor],
    ids: Sequence[int],
    *,
    window: int = DEFAULT_WINDOW,
) -> PerplexityResult:
    """Score `ids` window by window with `logits_of(window_ids) -> [n, vocab]` (LoadedModel.logits)."""
    if window < 2:
        raise ValueError("a window must hold at least 2 tokens")
    if len(ids) < 2:
        raise ValueError("the text must be at least 2 tokens long")
    began = time.perf_counter()
    total, scored, windows = 0.0, 0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = list(ids[start : start + window])
        if len(chunk) < 2:
            break
        logits = logits_of(chunk).float()
        targets = torch.tensor(chunk[1:], dtype=torch.long, device=logits.device)
        total += F.cross_entropy(logits[:-1], targets, reduction="sum").item()
        scored += len(chunk) - 1
        windows += 1
    mean = total / scored
    return PerplexityResult(math.exp(mean), mean, scored, windows, time.perf_counter() - began)
