"""A server's own KV-cache figures, read from its Prometheus `/metrics` page.

Each engine names them its own way; only gauges that say how full the KV cache is count, and each
is read as its documentation defines it (all of these are a share from 0 to 1, whatever "perc" in
a name suggests). Parsed with prometheus_client's parser, not by hand: the exposition format has
labels, escapes and comments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# The share of the KV cache in use, by engine (the first one a page has counts).
USAGE_GAUGES = (
    "llmchat:kv_cache_usage_ratio",  # llmchat serve
    "llamacpp:kv_cache_usage_ratio",  # llama-server --metrics
    "vllm:kv_cache_usage_perc",  # vLLM V1: 0.0-1.0
    "vllm:gpu_cache_usage_perc",  # vLLM before V1: "1 means 100 percent usage"
    "sglang:token_usage",  # SGLang: the share of KV-cache tokens in use
)
# Sizes a page may add (llmchat serve's; llama-server reports tokens too)
TOKENS_GAUGES = ("llmchat:kv_cache_tokens", "llamacpp:kv_cache_tokens")
CAPACITY_GAUGES = ("llmchat:kv_cache_capacity_tokens",)
BYTES_GAUGES = ("llmchat:kv_cache_bytes",)
CAPACITY_BYTES_GAUGES = ("llmchat:kv_cache_capacity_bytes",)


@dataclass(frozen=True)
class ServerCache:
    """What a server's metrics say of its KV cache (None: not on its page)."""

    usage: float | None  # the share in use, 0..1
    metric: str  # the gauge it came from (what the panel cites)
    tokens: int | None = None
    capacity: int | None = None
    bytes_used: int | None = None
    bytes_capacity: int | None = None


def parse_server_cache(page: str) -> ServerCache | None:
    """The KV-cache figures on a `/metrics` page; None when it has none we know (or is not one)."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                if sample.name not in values and math.isfinite(sample.value):
                    values[sample.name] = sample.value
    except (ValueError, TypeError, IndexError):  # not the exposition format
        return None
    usage_metric = next((name for name in USAGE_GAUGES if name in values), None)
    if usage_metric is None:
        return None

    def first(names: tuple[str, ...]) -> int | None:
        found = next((values[n] for n in names if n in values), None)
        return None if found is None else int(found)

    return ServerCache(
        usage=min(max(values[usage_metric], 0.0), 1.0),
        metric=usage_metric,
        tokens=first(TOKENS_GAUGES),
        capacity=first(CAPACITY_GAUGES),
        bytes_used=first(BYTES_GAUGES),
        bytes_capacity=first(CAPACITY_BYTES_GAUGES),
    )
