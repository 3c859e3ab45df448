"""Reading a server's KV-cache figures off its Prometheus page (session/metrics.py), in each
engine's own naming: pages shaped as llama-server, vLLM and SGLang document them."""

from __future__ import annotations

import pytest

from llmchat.session.metrics import parse_server_cache

LLAMA_SERVER = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 6886
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.25
# HELP llamacpp:kv_cache_tokens KV-cache tokens.
# TYPE llamacpp:kv_cache_tokens gauge
llamacpp:kv_cache_tokens 1024
"""

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="unsloth/Llama-3.2-1B-Instruct"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="unsloth/Llama-3.2-1B-Instruct"} 0.0375
"""

OLD_VLLM = """\
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
"""

SGLANG = """\
# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.125
"""


@pytest.mark.parametrize(
    ("page", "metric", "usage", "tokens"),
    [
        (LLAMA_SERVER, "llamacpp:kv_cache_usage_ratio", 0.25, 1024),
        (VLLM, "vllm:kv_cache_usage_perc", 0.0375, None),
        (OLD_VLLM, "vllm:gpu_cache_usage_perc", 0.5, None),
        (SGLANG, "sglang:token_usage", 0.125, None),
    ],
)
def test_each_engines_gauge_is_read_as_a_share(page: str, metric: str, usage: float, tokens: int | None) -> None:
    figures = parse_server_cache(page)
    assert figures is not None
    assert figures.metric == metric and figures.usage == pytest.approx(usage) and figures.tokens == tokens
    assert figures.bytes_used is None  # only llmchat serve reports bytes


def test_a_page_without_a_cache_gauge_or_not_a_page_at_all_gives_nothing() -> None:
    assert parse_server_cache("# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total 5\n") is None
    assert parse_server_cache("<html><body>404 Not Found</body></html>") is None
    assert parse_server_cache("") is None


async def test_the_kv_panel_shows_the_servers_own_usage() -> None:
    from textual.app import App, ComposeResult

    from llmchat.tui.widgets.panels import CacheState, KVCachePanel

    class _Panel(App[None]):
        def compose(self) -> ComposeResult:
            yield KVCachePanel()

    app = _Panel()
    async with app.run_test(size=(50, 10)) as pilot:
        panel = app.query_one(KVCachePanel)
        panel.show(CacheState(tokens=40, capacity=2048, reused=0, prefilled=40, server="127.0.0.1:9",
                              server_cache=parse_server_cache(LLAMA_SERVER)))  # fmt: skip
        await pilot.pause()
        text = str(panel.render())
        assert "in use 25%" in text and "not reported" not in text
        panel.show(CacheState(tokens=40, capacity=2048, server="127.0.0.1:9"))
        await pilot.pause()
        assert "usage: not reported" in str(panel.render())
