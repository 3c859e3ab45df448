"""The remote session against real servers on loopback: llama-cpp-python's OpenAI-compatible server on
the demo model (a server no one here wrote), a proxy in front of it that cuts or stalls the stream,
and small Starlette apps that refuse, fail, or speak Ollama's NDJSON.
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
from urllib.parse import urlsplit

import httpx
import pytest

from llmchat.engine.events import Finished, PrefillDone, TokenEvent
from llmchat.engine.prompt import CHAT, COMPLETION
from llmchat.engine.sampling import SamplingParams
from llmchat.session import ServerSpec, SessionUnavailable
from llmchat.session.remote import RemoteError, RemoteSession
from tests.remote_servers import FaultyProxy, llama_cpp_server, requires_llama_cpp, route, starlette_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# what the session sends for greedy decoding: every knob explicit (a server's own defaults differ)
GREEDY_FIELDS = {"temperature": 0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
GREEDY = SamplingParams(temperature=0)
SECRET = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def llama_server(demo_gguf: Path) -> Iterator[str]:
    with llama_cpp_server(demo_gguf) as url:
        yield url


def _answer(session: RemoteSession, **options: Any) -> list[Any]:
    options = {"answer_id": "a", "mode": CHAT, "sampling": GREEDY, "max_new_tokens": 24} | options
    messages = options.pop("messages", QUESTION)
    return list(session.answer(messages, **options))


@requires_llama_cpp
def test_greedy_stream_is_the_servers_own_answer_with_consistent_top_k(llama_server: str) -> None:
    session = RemoteSession(ServerSpec(llama_server), top_k=5)
    events = _answer(session)
    assert isinstance(events[0], PrefillDone) and isinstance(events[-1], Finished)
    done = events[-1]
    steps = [e for e in events if isinstance(e, TokenEvent)]
    # the server's own non-streamed answer to the same request
    reply = httpx.post(
        llama_server + "/v1/chat/completions",
        json={"messages": QUESTION, "max_tokens": 24, "model": session.model_name} | GREEDY_FIELDS,
        timeout=120,
    ).json()
    assert done.text == reply["choices"][0]["message"]["content"]
    assert done.reason == "max_new_tokens" and len(steps) == 24 == done.generated_tokens
    assert "".join(s.text for s in steps) + done.tail == done.text
    for step in steps:
        assert 1 <= len(step.top) <= 5
        probs = [t.prob for t in step.top]
        assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)
        assert math.isclose(step.prob, math.exp(step.logit), rel_tol=1e-9)  # logit: the server's logprob
        assert step.rank == 0 and step.top[0].token_id == step.token_id  # greedy: the first candidate
        assert math.isclose(step.top[0].prob, step.prob, rel_tol=1e-6)
        assert math.isnan(step.policy_prob)  # llama-server does not say what its sampler made of it
    assert session.capabilities.top_k == 5 and not session.capabilities.reread_steps
    assert session.info.device == "server" and session.info.name.endswith(".gguf")


@requires_llama_cpp
def test_a_server_without_metrics_is_asked_once_and_its_usage_stays_unknown(llama_server: str) -> None:
    """llama-cpp-python's server has no /metrics page: the figures stay None (the panel says "not
    reported"), and the next answers do not ask again."""
    session = RemoteSession(ServerSpec(llama_server), top_k=3)
    _answer(session, max_new_tokens=2)
    assert session.cache_stats().server is None and not session._metrics_offered
    assert session.cache_stats().tokens > 0  # what the answer itself reported is still there


def test_completion_mode_continues_the_text(llama_server: str) -> None:
    session = RemoteSession(ServerSpec(llama_server), top_k=3)
    messages = [{"role": "user", "content": "The capital of France is"}]
    done = _answer(session, messages=messages, mode=COMPLETION, max_new_tokens=4)[-1]
    reply = httpx.post(
        llama_server + "/v1/completions",
        json={"prompt": "The capital of France is", "max_tokens": 4} | GREEDY_FIELDS,
        timeout=120,
    ).json()
    assert done.text == reply["choices"][0]["text"] and done.generated_tokens == 4


@requires_llama_cpp
def test_what_a_server_cannot_do_is_said_not_raised_later(llama_server: str) -> None:
    session = RemoteSession(ServerSpec(llama_server), top_k=3)
    for call in (session.memory, lambda: session.policy_view(None, QUESTION, [], GREEDY, 0, CHAT)):
        with pytest.raises(SessionUnavailable):
            call()
    with pytest.raises(SessionUnavailable, match="branch"):
        _answer(session, answer_prefix=[1, 2])
    with pytest.raises(SessionUnavailable, match="--tokenizer"):
        session.prompt_tokens(QUESTION, CHAT)


@requires_llama_cpp
def test_a_local_tokenizer_gives_the_prompt_view(llama_server: str, demo_gguf: Path) -> None:
    from llmchat.engine.package import open_tokenizer

    session = RemoteSession(ServerSpec(llama_server, tokenizer=str(demo_gguf)), top_k=3)
    view = session.prompt_view(QUESTION, CHAT)
    assert "<|im_start|>user" in view.text and view.reused == 0
    assert list(view.token_ids) == open_tokenizer(demo_gguf).encode(view.text)
    assert session.capabilities.prompt_tokens


@requires_llama_cpp
def test_with_a_local_template_a_branch_continues_on_a_server_without_apply_template(
    llama_server: str, demo_gguf: Path
) -> None:
    """llama-cpp-python renders no prompt for us; with --tokenizer the local template does, and the
    branch's continuation is the server's own greedy completion of that text plus the kept tokens."""
    from llmchat.engine.events import ForcedPrefix

    session = RemoteSession(ServerSpec(llama_server, tokenizer=str(demo_gguf)), top_k=5)
    assert session.capabilities.branch_at_token
    first = [e for e in _answer(session, max_new_tokens=6) if isinstance(e, TokenEvent)]
    prefix = [first[0].token_id, first[1].top[1].token_id]  # the runner-up at the second step
    events = _answer(session, answer_id="b", max_new_tokens=6, answer_prefix=prefix)
    forced, done = events[0], events[-1]
    assert isinstance(forced, ForcedPrefix) and forced.text == first[0].text + first[1].top[1].text
    prompt = session.prompt_view(QUESTION, CHAT).text + forced.text
    reply = httpx.post(
        llama_server + "/v1/completions", json={"prompt": prompt, "max_tokens": 4} | GREEDY_FIELDS, timeout=120
    ).json()
    assert done.content == forced.text + reply["choices"][0]["text"] and done.prefix_tokens == 2


@requires_llama_cpp
def test_run_server_json_prints_the_local_event_stream(llama_server: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmchat", "run", "--server", llama_server, "--prompt", "Hi", "--temperature", "0"]
        + ["--max-new-tokens", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # strict JSON: no NaN
    tokens = [line for line in lines if line["event"] == "TokenEvent"]
    assert len(tokens) == 5 and all(t["top"] and t["top"][0]["prob"] > 0 for t in tokens)
    assert lines[-1]["event"] == "Finished" and lines[-1]["text"] == "".join(t["text"] for t in tokens)


@requires_llama_cpp
def test_a_stream_cut_mid_answer_keeps_the_text_so_far(llama_server: str) -> None:
    parts = urlsplit(llama_server)
    proxy = FaultyProxy((parts.hostname or "", parts.port or 0), cut_after=2500)  # a few chunks in
    try:
        session = RemoteSession(ServerSpec(proxy.url), top_k=3)
        events = _answer(session, max_new_tokens=64)
    finally:
        proxy.close()
    done = events[-1]
    steps = [e for e in events if isinstance(e, TokenEvent)]
    assert isinstance(done, Finished) and done.reason == "error", done
    assert steps and done.text == "".join(s.text for s in steps) + done.tail
    assert "\n" not in done.error and proxy.url.split("//")[1] in done.error


@requires_llama_cpp
def test_a_server_that_stalls_mid_answer_times_out(llama_server: str) -> None:
    parts = urlsplit(llama_server)
    proxy = FaultyProxy((parts.hostname or "", parts.port or 0), stall_after=2500)
    try:
        session = RemoteSession(ServerSpec(proxy.url), top_k=3, timeout=2.0)
        done = _answer(session, max_new_tokens=64)[-1]
    finally:
        proxy.close()
    assert done.reason == "error" and "timed out" in done.error and done.text


def test_refused_and_failing_servers_are_one_line_errors_without_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    monkeypatch.setenv("LLMCHAT_TEST_KEY", SECRET)
    seen: list[str] = []

    async def models(request: Request) -> JSONResponse:
        seen.append(request.headers.get("authorization", ""))
        if request.headers.get("authorization") != "Bearer right":
            return JSONResponse({"error": {"message": "invalid api key", "type": "auth"}}, status_code=401)
        return JSONResponse({"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]})

    async def broken(request: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": "out of memory"}}, status_code=500)

    with starlette_server([route("/v1/models", models), route("/v1/chat/completions", broken)]) as url:
        with pytest.raises(RemoteError) as refused:
            RemoteSession(ServerSpec(url, api_key_env="LLMCHAT_TEST_KEY"), top_k=3)
        assert seen == [f"Bearer {SECRET}"]  # sent as a bearer token...
        message = str(refused.value)
        assert "401" in message and "API key" in message and SECRET not in message  # ...never shown
        monkeypatch.setenv("LLMCHAT_TEST_KEY", "right")
        with pytest.raises(RemoteError, match="serves 2 models"):
            RemoteSession(ServerSpec(url, api_key_env="LLMCHAT_TEST_KEY"), top_k=3)
        session = RemoteSession(ServerSpec(url, model="m2", api_key_env="LLMCHAT_TEST_KEY"), top_k=3)
        assert SECRET not in repr(session) and "right" not in repr(session)
        with pytest.raises(RemoteError, match="HTTP 500: out of memory"):
            _answer(session)
        with pytest.raises(RemoteError, match="no model 'm3'"):
            RemoteSession(ServerSpec(url, model="m3", api_key_env="LLMCHAT_TEST_KEY"), top_k=3)
    with pytest.raises(RemoteError, match="cannot reach"):
        RemoteSession(ServerSpec(url), top_k=3)  # the server is gone now: connection refused


def test_malformed_chunks_end_the_answer_with_an_error() -> None:
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"data": [{"id": "m", "max_model_len": 4096}]})

    good = {"choices": [{"delta": {"content": "Hi"}, "logprobs": {"content": [{"token": "Hi", "logprob": -0.1}]}}]}

    async def chat(request: Request) -> StreamingResponse:
        async def lines() -> Any:
            yield f"data: {json.dumps(good)}\n\n"
            yield "data: {not json\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    with starlette_server([route("/v1/models", models), route("/v1/chat/completions", chat)]) as url:
        session = RemoteSession(ServerSpec(url), top_k=3)
        assert session.info.context_length == 4096
        events = _answer(session)
    done = events[-1]
    assert done.reason == "error" and "malformed" in done.error and done.text == "Hi"


def test_ollama_native_chat_stream() -> None:
    """Ollama's /api/chat NDJSON with logprobs, as its API documents it, from a real HTTP server."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse

    requests: list[dict[str, Any]] = []

    async def tags(request: Request) -> JSONResponse:
        return JSONResponse({"models": [{"name": "llama3.2:1b"}]})

    def line(text: str, logprob: float, done: bool = False) -> str:
        top = [{"token": text, "logprob": logprob}, {"token": " x", "logprob": logprob - 2}]
        message = {"role": "assistant", "content": text}
        data: dict[str, Any] = {"model": "llama3.2:1b", "message": message, "done": done}
        data["logprobs"] = [{"token": text, "logprob": logprob, "top_logprobs": top}] if text else []
        if done:
            data |= {"done_reason": "stop", "prompt_eval_count": 31, "eval_count": 2}
        return json.dumps(data) + "\n"

    async def chat(request: Request) -> StreamingResponse:
        requests.append(await request.json())

        async def lines() -> Any:
            yield line("Paris", -0.2)
            yield line(".", -0.05)
            yield line("", 0.0, done=True)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    with starlette_server([route("/api/tags", tags), route("/api/chat", chat)]) as url:
        session = RemoteSession(ServerSpec(url, protocol="ollama"), top_k=2)
        events = _answer(session, sampling=SamplingParams(temperature=0, seed=3), max_new_tokens=9)
    steps = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert [s.text for s in steps] == ["Paris", "."] and done.text == "Paris." and done.reason == "eos"
    assert done.prompt_tokens == 31 and done.generated_tokens == 2
    assert math.isclose(steps[0].prob, math.exp(-0.2)) and [t.text for t in steps[0].top] == ["Paris", " x"]
    sent = requests[0]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2 and sent["model"] == "llama3.2:1b"
    assert sent["options"]["temperature"] == 0 and sent["options"]["num_predict"] == 9 and sent["options"]["seed"] == 3


def test_models_add_server_round_trip(llmchat_dirs: dict[str, Path]) -> None:
    def llmchat(*args: str) -> subprocess.CompletedProcess[str]:
        env = os.environ | {"MY_KEY": SECRET}
        command = [sys.executable, "-m", "llmchat", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)

    added = llmchat("models", "add", "big", "--server", "http://127.0.0.1:9/v1", "--model", "Qwen/Qwen3-8B",
                    "--api-key-env", "MY_KEY")  # fmt: skip
    assert added.returncode == 0, added.stderr
    saved = (llmchat_dirs["config"] / "models.toml").read_text(encoding="utf-8")
    assert 'server = "http://127.0.0.1:9/v1"' in saved and 'api_key_env = "MY_KEY"' in saved and SECRET not in saved
    listed = json.loads(llmchat("models", "list", "--json").stdout)
    assert [(m["name"], m["path"], m["format"]) for m in listed] == [("big", "http://127.0.0.1:9/v1", "server")]
    # `run NAME` talks to that server (which is down): the remote session's error, exit 2
    env_run = llmchat("run", "big", "--prompt", "hi")
    assert env_run.returncode == 2 and "cannot reach http://127.0.0.1:9" in env_run.stderr
    assert "Traceback" not in env_run.stderr and SECRET not in env_run.stderr
    bad = llmchat("models", "add", "x", "--server", "http://user:pw@host/")
    assert bad.returncode == 2 and "credentials" in bad.stderr
    assert llmchat("models", "remove", "big").returncode == 0
    assert json.loads(llmchat("models", "list", "--json").stdout) == []


def test_key_is_read_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMCHAT_UNSET_KEY", raising=False)
    with pytest.raises(RemoteError, match="LLMCHAT_UNSET_KEY is not set"):
        RemoteSession(ServerSpec("http://127.0.0.1:9", api_key_env="LLMCHAT_UNSET_KEY"), top_k=3)
    assert "LLMCHAT_UNSET_KEY" not in os.environ


def test_a_key_the_server_quotes_is_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    monkeypatch.setenv("LLMCHAT_TEST_KEY", SECRET)

    async def models(request: Request) -> JSONResponse:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        return JSONResponse({"error": {"message": f"Incorrect API key provided: {key}"}}, status_code=401)

    with starlette_server([route("/v1/models", models)]) as url, pytest.raises(RemoteError) as refused:
        RemoteSession(ServerSpec(url, api_key_env="LLMCHAT_TEST_KEY"), top_k=3)
    assert SECRET not in str(refused.value) and "<the API key>" in str(refused.value)


def test_stop_ends_an_answer_the_server_has_stalled_and_text_without_logprobs_streams() -> None:
    """A server that sends text without logprobs still streams it; one that then stalls is left at
    once when the user stops (the flag is watched, not only checked when a line arrives)."""
    import asyncio
    import threading
    import time

    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"data": [{"id": "m"}]})

    async def chat(request: Request) -> StreamingResponse:
        async def lines() -> Any:
            for word in ("Hello", " there"):
                yield f"data: {json.dumps({'choices': [{'delta': {'content': word}}]})}\n\n"
            await asyncio.sleep(30)  # stalls

        return StreamingResponse(lines(), media_type="text/event-stream")

    cancel = threading.Event()
    with starlette_server([route("/v1/models", models), route("/v1/chat/completions", chat)]) as url:
        session = RemoteSession(ServerSpec(url), top_k=3)
        events = []
        began = time.monotonic()
        for event in session.answer(QUESTION, answer_id="a", mode=CHAT, sampling=GREEDY, cancel=cancel):
            events.append(event)
            if isinstance(event, TokenEvent) and event.index == 1:
                cancel.set()
    assert time.monotonic() - began < 10
    steps = [e for e in events if isinstance(e, TokenEvent)]
    assert [s.text for s in steps] == ["Hello", " there"] and all(math.isnan(s.prob) and not s.top for s in steps)
    done = events[-1]
    assert isinstance(done, Finished) and done.reason == "cancelled" and done.text == "Hello there"
