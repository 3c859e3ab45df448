"""`llmchat serve` on the demo model, as a real subprocess on loopback, driven by clients no one here
wrote (the `openai` package, plain HTTP) and by llmchat's own remote session: the same greedy tokens as
`llmchat run`, logprobs that are the engine's, the KV cache reused across a conversation's requests,
errors in OpenAI's shape, and a client that leaves mid-stream not taking the server with it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.remote_servers import free_port, wait_until_up

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"
KEY = "serve-test-key-5f3a"


def _start(model: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    command = [sys.executable, "-m", "llmchat", "serve", str(model), "--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url + "/health", process)  # type: ignore[arg-type]
    return process, url


def _stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    try:
        _, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return err


@pytest.fixture(scope="module")
def server(demo_gguf: Path) -> Iterator[str]:
    process, url = _start(demo_gguf)
    yield url
    _stop(process)


def _run_json(model: Path, prompt: str, tokens: int) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "llmchat", "run", str(model), "--prompt", prompt, "--temperature", "0"]
    command += ["--max-new-tokens", str(tokens), "--json", "--top-logprobs", "5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_openai_client_gets_the_engines_greedy_answer_and_logprobs(server: str, demo_gguf: Path) -> None:
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    [model] = [m.id for m in client.models.list().data]
    messages: Any = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=12, logprobs=True, top_logprobs=5
    )
    local = _run_json(demo_gguf, QUESTION, 12)
    finished = local[-1]
    steps = [e for e in local if e["event"] == "TokenEvent"]
    assert reply.choices[0].message.content == finished["text"]
    assert reply.usage is not None and reply.usage.completion_tokens == finished["generated_tokens"] == len(steps)
    assert reply.usage.prompt_tokens == finished["prompt_tokens"]
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == len(steps) > 3
    for entry, step in zip(content, steps, strict=True):
        assert math.isclose(entry.logprob, math.log(step["prob"]), abs_tol=1e-4)  # the engine's raw softmax
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert [t.token for t in entry.top_logprobs] == [t["text"] for t in step["top"]]
    # streamed: the same text, chunk by chunk, and usage at the end when asked
    stream = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == finished["text"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(steps)
    reason = {"eos": "stop", "max_new_tokens": "length"}[finished["reason"]]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert reply.choices[0].finish_reason == reason


def test_a_conversation_reuses_the_kv_cache_and_metrics_show_it(server: str) -> None:
    first = [{"role": "user", "content": "Name a colour."}]
    one = httpx.post(server + "/v1/chat/completions", json={"messages": first, "max_tokens": 6, "temperature": 0})
    answer = one.json()["choices"][0]["message"]["content"]
    follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And another?"}]
    two = httpx.post(server + "/v1/chat/completions", json={"messages": follow, "max_tokens": 6, "temperature": 0})
    usage = two.json()["usage"]
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    metrics = dict(
        line.rsplit(" ", 1) for line in httpx.get(server + "/metrics").text.splitlines() if not line.startswith("#")
    )
    assert float(metrics["llmchat:kv_cache_tokens"]) == usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert float(metrics["llmchat:requests_total"]) >= 2 and float(metrics["llmchat:kv_cache_usage_ratio"]) > 0


def test_completions_tokenize_and_bad_requests(server: str, demo_gguf: Path) -> None:
    from llmchat.engine.package import open_tokenizer

    reply = httpx.post(
        server + "/v1/completions",
        json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 2},
    ).json()
    choice = reply["choices"][0]
    assert choice["text"] and len(choice["logprobs"]["tokens"]) == 4 == reply["usage"]["completion_tokens"]
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert len(choice["logprobs"]["token_policy_logprobs"]) == 4  # greedy: the chosen token's policy p is 1
    assert all(math.isclose(v, 0.0, abs_tol=1e-6) for v in choice["logprobs"]["token_policy_logprobs"])
    streamed = httpx.post(
        server + "/v1/completions",
        json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "stream": True},
    )
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    tokens = httpx.post(server + "/tokenize", json={"content": "Hello world"}).json()["tokens"]
    assert tokens == open_tokenizer(demo_gguf).encode("Hello world")
    assert httpx.post(server + "/detokenize", json={"tokens": tokens}).json()["content"] == "Hello world"
    for body, param in (
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, None),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ):
        response = httpx.post(server + "/v1/chat/completions", json=body)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    # a prompt longer than the context: a 400 before the stream's headers, not an error mid-stream
    context = httpx.get(server + "/v1/models").json()["data"][0]["max_model_len"]
    long = {"messages": [{"role": "user", "content": "hi " * (context + 10)}], "stream": True}
    response = httpx.post(server + "/v1/chat/completions", json=long, timeout=120)
    assert response.status_code == 400 and "context" in response.json()["error"]["message"]


def test_a_client_that_leaves_mid_stream_leaves_the_server_answering(server: str) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data: ")
            if chunks >= 2:
                break  # closes the connection mid-answer
    reply = httpx.post(
        server + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0},
        timeout=120,
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    metrics = httpx.get(server + "/metrics").text
    assert "llmchat:requests_cancelled_total 1" in metrics.splitlines()  # the engine stopped, not finished


def test_llmchats_remote_session_reads_both_probabilities(server: str) -> None:
    from llmchat.engine.events import TokenEvent
    from llmchat.engine.prompt import CHAT
    from llmchat.engine.sampling import SamplingParams
    from llmchat.session import ServerSpec
    from llmchat.session.remote import RemoteSession

    session = RemoteSession(ServerSpec(server), top_k=5)
    policy = SamplingParams(temperature=0.7, top_k=2, seed=1)
    events = list(session.answer([{"role": "user", "content": QUESTION}], answer_id="a", mode=CHAT,
                                 sampling=policy, max_new_tokens=5))  # fmt: skip
    steps = [e for e in events if isinstance(e, TokenEvent)]
    assert len(steps) == 5
    for step in steps:
        kept = [t for t in step.top if t.policy_prob > 0]
        assert len(kept) <= 2 and math.isclose(sum(t.policy_prob for t in kept), 1.0, abs_tol=1e-4)  # top-k 2
        assert all(t.policy_prob == 0 for t in step.top[2:])
    assert events[-1].prompt_tokens > 0  # usage arrives in the stream's last chunk


def test_the_remote_session_shows_the_servers_own_cache_figures_from_metrics(server: str) -> None:
    """After an answer the session reads the server's /metrics: the KV panel's "in use" is the
    server's own gauge, with the tokens, capacity and bytes it reports, not the session's guess."""
    from llmchat.engine.prompt import CHAT
    from llmchat.engine.sampling import SamplingParams
    from llmchat.session import ServerSpec
    from llmchat.session.remote import RemoteSession

    session = RemoteSession(ServerSpec(server), top_k=3)
    assert session.cache_stats().server is None  # nothing asked yet
    list(session.answer([{"role": "user", "content": QUESTION}], answer_id="m", mode=CHAT,
                        sampling=SamplingParams(temperature=0), max_new_tokens=4))  # fmt: skip
    figures = session.cache_stats().server
    page = dict(line.rsplit(" ", 1) for line in httpx.get(server + "/metrics").text.splitlines() if line[:1] != "#")
    assert figures is not None and figures.metric == "llmchat:kv_cache_usage_ratio"
    assert figures.tokens == int(float(page["llmchat:kv_cache_tokens"])) > 0
    assert figures.capacity == int(float(page["llmchat:kv_cache_capacity_tokens"]))
    assert figures.usage == pytest.approx(figures.tokens / figures.capacity)
    assert figures.bytes_used == int(float(page["llmchat:kv_cache_bytes"])) > 0
    assert figures.bytes_capacity == int(float(page["llmchat:kv_cache_capacity_bytes"]))


def test_the_remote_prompt_view_is_the_servers_rendering_and_tokens(server: str, demo_gguf: Path) -> None:
    """Without --tokenizer the prompt view asks the server (/apply-template, /tokenize with pieces):
    the same text and ids as the local template and tokenizer of the same model give."""
    from llmchat.engine.prompt import CHAT, COMPLETION
    from llmchat.session import ServerSpec
    from llmchat.session.remote import RemoteSession

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    remote = RemoteSession(ServerSpec(server), top_k=3)
    local = RemoteSession(ServerSpec(server, tokenizer=str(demo_gguf)), top_k=3)
    assert remote.capabilities.prompt_tokens
    for mode in (CHAT, COMPLETION):
        seen, expected = remote.prompt_view(messages, mode), local.prompt_view(messages, mode)
        assert seen.text == expected.text and seen.token_ids == expected.token_ids and len(seen.token_ids) > 10
        assert "".join(seen.token_texts) == seen.text  # each id with its own piece
    assert "Be brief." in remote.prompt_view(messages, CHAT).text
    bad = httpx.post(server + "/apply-template", json={"messages": "no"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


def test_a_remote_branch_at_a_token_continues_through_completions(server: str) -> None:
    """Branch at a token on a server: the kept tokens and the picked candidate come back as the
    answer's start (ForcedPrefix), and the rest is the server's own greedy completion of the prompt
    it renders (/apply-template) followed by their text."""
    from llmchat.engine.events import ForcedPrefix, TokenEvent
    from llmchat.engine.prompt import CHAT
    from llmchat.engine.sampling import SamplingParams
    from llmchat.session import ServerSpec
    from llmchat.session.remote import RemoteSession

    greedy = SamplingParams(temperature=0)
    messages = [{"role": "user", "content": QUESTION}]
    session = RemoteSession(ServerSpec(server), top_k=5)
    assert session.capabilities.branch_at_token
    first = [e for e in session.answer(messages, answer_id="a", mode=CHAT, sampling=greedy, max_new_tokens=8)
             if isinstance(e, TokenEvent)]  # fmt: skip
    picked = first[2].top[1]  # the runner-up at the third step
    assert picked.token_id != first[2].token_id
    prefix = [step.token_id for step in first[:2]] + [picked.token_id]
    events = list(session.answer(messages, answer_id="b", mode=CHAT, sampling=greedy, max_new_tokens=8,
                                 answer_prefix=prefix))  # fmt: skip
    forced, done = events[0], events[-1]
    assert isinstance(forced, ForcedPrefix) and forced.token_ids == tuple(prefix)
    assert forced.text == first[0].text + first[1].text + picked.text
    steps = [e for e in events if isinstance(e, TokenEvent)]
    assert [s.index for s in steps] == list(range(3, 3 + len(steps)))
    assert 1 <= len(steps) == done.generated_tokens <= 5  # 8 with the kept 3 (fewer: an end of answer)
    assert done.token_ids[:3] == tuple(prefix) and done.prefix_tokens == 3
    rendered = httpx.post(server + "/apply-template", json={"messages": messages}).json()["prompt"]
    knobs = {"temperature": 0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
    reply = httpx.post(server + "/v1/completions", json={"prompt": rendered + forced.text, "max_tokens": 5} | knobs)
    assert done.content == forced.text + reply.json()["choices"][0]["text"]


def test_an_api_key_is_required_when_set_and_never_echoed(demo_gguf: Path) -> None:
    env = os.environ | {"LLMCHAT_SERVE_KEY": KEY}
    process, url = _start(demo_gguf, "--api-key-env", "LLMCHAT_SERVE_KEY", env=env)
    try:
        refused = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401 and KEY not in refused.text
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        err = _stop(process)
    assert KEY not in err


def test_a_port_in_use_is_one_line(demo_gguf: Path, server: str) -> None:
    port = server.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "llmchat", "serve", str(demo_gguf), "--port", port],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"llmchat: error: cannot listen on 127.0.0.1:{port}")
