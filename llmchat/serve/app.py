"""`llmchat serve`: llmchat's own engine behind the OpenAI HTTP protocol (Starlette on uvicorn).

Routes: `POST /v1/chat/completions` and `POST /v1/completions` (streaming as server-sent events, or
one JSON reply), `GET /v1/models`, `POST /tokenize`, `/detokenize` and `/apply-template`
(llama-server's shapes), `GET /health`, `GET /metrics` (Prometheus text: the KV cache's tokens, capacity, bytes, usage).

The numbers: `logprob` is the log of the raw softmax (temperature 1, nothing cut: what the model
said), as llama-server and Ollama report it. llmchat also sends what the sampling policy made of each
candidate, as an extension field `policy_logprob` next to every `logprob` (null where the policy
cut the token); clients that do not know it ignore it, llmchat's own remote session shows it.
In the legacy completions shape the same numbers travel as `token_policy_logprobs` (one per token,
next to `token_logprobs`) and `top_policy_logprobs` (`{token: policy_logprob}`, next to `top_logprobs`).

One generation at a time: the engine has one KV cache. Requests wait their turn; a conversation
that comes back with its earlier turns reuses the cached prefix (`usage.prompt_tokens_details.
cached_tokens` says how much). A client that disconnects mid-stream stops its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from llmchat.engine.errors import LLMChatError
from llmchat.engine.events import Finished, TokenEvent
from llmchat.engine.prompt import CHAT, COMPLETION, PromptMode, request_text
from llmchat.engine.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's cap; the session is opened with this many candidates per token
FINISH = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context_full": "length"}
_END = object()


class RequestError(Exception):
    """A request llmchat cannot serve as asked: HTTP 400 in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error") -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat request's `messages`, checked (content parts: their text ones, joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError("every message needs a 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: the text ones
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            message["content"] = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise RequestError("a message's 'content' must be a string", "messages")
    return messages


def _logprob(prob: float) -> float | None:
    return math.log(prob) if prob > 0 else None


@dataclass
class Request_:
    """What one request asks for, checked."""

    messages: list[dict[str, Any]]
    mode: PromptMode
    sampling: SamplingParams
    max_tokens: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs
    echo_model: str


@dataclass
class _Counters:
    requests: int = 0
    cancelled: int = 0  # of those, stopped because the client left
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    started: float = field(default_factory=time.time)


class EngineServer:
    """The HTTP side of one LocalSession: parses requests, runs one generation at a time in a thread."""

    def __init__(self, session: Any, *, api_key: str | None = None) -> None:
        self.session = session
        self.api_key = api_key
        self.model_id = session.info.name
        self._turn = threading.Lock()  # one generation at a time; released by the generating thread
        self.counters = _Counters()

    # --- parsing -------------------------------------------------------------------------------------

    def _parse(self, body: Any, mode: PromptMode) -> Request_:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("n", 1) != 1:
            raise RequestError("only n=1 is supported (one answer per request)", "n")
        if mode == CHAT:
            messages = _chat_messages(body)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise RequestError("'prompt' must be a string", "prompt")
            messages = [{"role": "user", "content": prompt}]
        changes: dict[str, Any] = {}
        for name, field_name in (
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("top_k", "top_k"),
            ("min_p", "min_p"),
            ("repetition_penalty", "repetition_penalty"),
            ("repeat_penalty", "repetition_penalty"),
            ("seed", "seed"),
        ):
            value = body.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RequestError(f"'{name}' must be a number", name)
            if name == "top_k" and value < 0:  # vLLM's "-1: off"
                value = 0
            changes[field_name] = value
        try:
            sampling = self.session.info.default_sampling.replace(**changes)
        except (ValueError, TypeError) as exc:
            raise RequestError(str(exc)) from None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise RequestError("'max_tokens' must be a whole number of at least 1", "max_tokens")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("'stop' must be a string or a list of strings", "stop")
        top_logprobs: int | None = None
        if mode == CHAT and body.get("logprobs"):
            top_logprobs = body.get("top_logprobs") or 0
        elif mode == COMPLETION and body.get("logprobs") is not None:
            top_logprobs = body.get("logprobs")
        if top_logprobs is not None and (
            isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20
        ):
            raise RequestError(f"top logprobs must be a whole number in 0..{MAX_TOP_LOGPROBS}", "top_logprobs")
        options = body.get("stream_options") or {}
        return Request_(
            messages=messages,
            mode=mode,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=stop,
            stream=bool(body.get("stream")),
            include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
            top_logprobs=top_logprobs,
            echo_model=str(body.get("model") or self.model_id),
        )

    # --- generating ----------------------------------------------------------------------------------

    async def events(self, req: Request_, cancel: threading.Event) -> AsyncGenerator[Any, None]:
        """The engine's events for `req`, produced by a thread that holds the engine for the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        while not self._turn.acquire(blocking=False):  # wait for the request before this one (a client
            await asyncio.sleep(0.02)  # that leaves while waiting must not take the engine with it)

        def produce() -> None:
            try:
                for event in self.session.answer(
                    req.messages,
                    answer_id="serve-" + uuid.uuid4().hex,
                    mode=req.mode,
                    sampling=req.sampling,
                    cancel=cancel,
                    max_new_tokens=req.max_tokens,
                    stop_strings=req.stop,
                ):
                    if isinstance(event, Finished):
                        self._count(event)
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except Exception as exc:  # a template error, a full context: the client gets it as an error
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                self.session.forget_prompts()  # each request's prompt ids would pile up otherwise
                self._turn.release()
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        threading.Thread(target=produce, daemon=True, name="llmchat-serve").start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()  # a client that went away (or an error): the thread stops at its next step

    def _count(self, done: Finished) -> None:
        self.counters.requests += 1
        self.counters.cancelled += done.reason == "cancelled"
        self.counters.generated_tokens += done.generated_tokens
        self.counters.prompt_tokens += done.prompt_tokens
        self.counters.cached_tokens += done.reused_tokens

    # --- the logprobs shapes -------------------------------------------------------------------------

    def _chat_logprobs(self, event: TokenEvent, n: int) -> dict[str, Any]:
        text = self.session.token_text(event.token_id)
        top = [
            {
                "token": t.text,
                "logprob": _logprob(t.prob),
                "bytes": list(t.text.encode()),
                "policy_logprob": _logprob(t.policy_prob),
            }
            for t in event.top[:n]
        ]
        return {
            "token": text,
            "logprob": _logprob(event.prob),
            "bytes": list(text.encode()),
            "policy_logprob": _logprob(event.policy_prob),
            "top_logprobs": top,
        }

    @staticmethod
    def _usage(done: Finished) -> dict[str, Any]:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.generated_tokens,
            "total_tokens": done.prompt_tokens + done.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": done.reused_tokens},
        }

    # --- the routes ----------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())  # no timing hint of the key

    async def _request(self, request: Request, mode: PromptMode) -> Response:
        if not self._authorized(request):
            return _error("a valid API key is needed (Authorization: Bearer ...)", 401, kind="authentication_error")
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(f"the body is not JSON: {exc}")
        try:
            req = self._parse(body, mode)
        except RequestError as exc:
            return _error(str(exc), param=exc.param)
        if mode == CHAT and not self.session.info.chat:
            return _error(f"{self.model_id} has no chat template (a base model): use /v1/completions", param="messages")
        created, ident = int(time.time()), ("chatcmpl-" if mode == CHAT else "cmpl-") + uuid.uuid4().hex
        if not req.stream:
            return await self._whole(req, ident, created)
        events = self.events(req, threading.Event())
        try:  # the prompt's errors (too long for the context, a template that fails) before the headers
            first = await events.__anext__()
        except LLMChatError as exc:
            return _error(str(exc))
        return StreamingResponse(self._stream(req, ident, created, first, events), media_type="text/event-stream")

    async def _whole(self, req: Request_, ident: str, created: int) -> Response:
        steps: list[TokenEvent] = []
        done: Finished | None = None
        try:
            async for event in self.events(req, threading.Event()):
                if isinstance(event, TokenEvent):
                    steps.append(event)
                elif isinstance(event, Finished):
                    done = event
        except LLMChatError as exc:
            return _error(str(exc))
        assert done is not None
        reason = FINISH.get(done.reason, "stop")
        if req.mode == CHAT:
            message: dict[str, Any] = {"role": "assistant", "content": done.content}
            if done.reasoning:
                message["reasoning_content"] = done.reasoning
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
            if req.top_logprobs is not None:
                choice["logprobs"] = {"content": [self._chat_logprobs(s, req.top_logprobs) for s in steps]}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": done.text, "finish_reason": reason, "logprobs": None}
            if req.top_logprobs is not None:
                choice["logprobs"] = self._legacy_logprobs(steps, req.top_logprobs)
            obj = "text_completion"
        body = {"id": ident, "object": obj, "created": created, "model": req.echo_model, "choices": [choice]}
        return JSONResponse(body | {"usage": self._usage(done)})

    def _legacy_logprobs(self, steps: list[TokenEvent], n: int, at: int = 0) -> dict[str, Any]:
        """The completions endpoint's shape; `at`: the text offset of the first step (a stream's chunk)."""
        texts = [self.session.token_text(s.token_id) for s in steps]
        offsets = []
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [_logprob(s.prob) for s in steps],
            "top_logprobs": [{t.text: _logprob(t.prob) for t in s.top[:n]} for s in steps],
            "text_offset": offsets,
            "token_policy_logprobs": [_logprob(s.policy_prob) for s in steps],
            "top_policy_logprobs": [{t.text: _logprob(t.policy_prob) for t in s.top[:n]} for s in steps],
        }

    async def _stream(
        self, req: Request_, ident: str, created: int, first: Any, events: AsyncGenerator[Any, None]
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per token (its logprobs with it), the finish reason, the usage
        when asked, then [DONE]. `first`: the event already taken from `events` (see _request)."""
        chat = req.mode == CHAT
        head = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created}
        head["model"] = req.echo_model
        sent = {"content": "", "reasoning": "", "text": ""}  # what the chunks carried so far

        def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
            return "data: " + json.dumps(head | {"choices": [choice] if choice else []} | extra) + "\n\n"

        def piece(content: str, reasoning: str = "", event: TokenEvent | None = None) -> dict[str, Any]:
            logprobs = None
            if chat:
                delta: dict[str, Any] = {"content": content}
                if reasoning:
                    delta["reasoning_content"] = reasoning
                if event is not None and req.top_logprobs is not None:
                    logprobs = {"content": [self._chat_logprobs(event, req.top_logprobs)]}
                return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            if event is not None and req.top_logprobs is not None:
                logprobs = self._legacy_logprobs([event], req.top_logprobs, at=len(sent["text"]))
            return {"index": 0, "text": content, "logprobs": logprobs, "finish_reason": None}

        def rest(whole: str, part: str, fallback: str) -> str:
            """What of the answer's `whole` channel the chunks have not carried yet."""
            return whole[len(sent[part]) :] if whole.startswith(sent[part]) else fallback

        if chat:
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        try:
            async for event in _chain(first, events):
                if isinstance(event, TokenEvent):
                    content = event.content if chat else event.text
                    sent["content"] += event.content
                    sent["reasoning"] += event.reasoning
                    sent["text"] += self.session.token_text(event.token_id)
                    yield chunk(piece(content, event.reasoning if chat else "", event))
                elif isinstance(event, Finished):
                    if chat:
                        content = rest(event.content, "content", event.tail)
                        reasoning = rest(event.reasoning, "reasoning", "")
                    else:
                        content, reasoning = event.tail, ""
                    if content or reasoning:
                        yield chunk(piece(content, reasoning))
                    end = piece("")
                    end["finish_reason"] = FINISH.get(event.reason, "stop")
                    if chat:
                        end["delta"] = {}
                    yield chunk(end)
                    if req.include_usage:
                        yield chunk(None, usage=self._usage(event))
        except LLMChatError as exc:  # after the headers are sent: an error event, as vLLM does
            yield "data: " + json.dumps({"error": {"message": str(exc), "type": "invalid_request_error"}}) + "\n\n"
        yield "data: [DONE]\n\n"

    async def chat(self, request: Request) -> Response:
        return await self._request(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._request(request, COMPLETION)

    async def models(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error("a valid API key is needed (Authorization: Bearer ...)", 401, kind="authentication_error")
        entry = {
            "id": self.model_id,
            "object": "model",
            "created": int(self.counters.started),
            "owned_by": "llmchat",
            "max_model_len": self.session.info.context_length,
        }
        return JSONResponse({"object": "list", "data": [entry]})

    async def tokenize(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error("a valid API key is needed (Authorization: Bearer ...)", 401, kind="authentication_error")
        try:
            body = json.loads(await request.body() or b"{}")
            content = body["content"]
            if not isinstance(content, str):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            return _error('send {"content": "text"}', param="content")
        tokenizer = self.session.model.tokenizer
        ids = tokenizer.encode(content, add_special_tokens=bool(body.get("add_special")))
        if body.get("with_pieces"):  # llama-server's shape: each id with its text
            return JSONResponse({"tokens": [{"id": i, "piece": self.session.token_text(i)} for i in ids]})
        return JSONResponse({"tokens": ids})

    async def apply_template(self, request: Request) -> Response:
        """llama-server's `POST /apply-template`: the prompt a chat request renders to, as text (what
        `/tokenize` then splits: a client's prompt view of what the model is given)."""
        if not self._authorized(request):
            return _error("a valid API key is needed (Authorization: Bearer ...)", 401, kind="authentication_error")
        try:
            body = json.loads(await request.body() or b"{}")
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            messages = _chat_messages(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error('send {"messages": [...]}', param="messages")
        except RequestError as exc:
            return _error(str(exc), param=exc.param)
        if not self.session.info.chat:
            return _error(f"{self.model_id} has no chat template (a base model)", param="messages")
        try:
            prompt = request_text(self.session.model, messages, CHAT)
        except LLMChatError as exc:  # a template that fails on these messages
            return _error(str(exc), param="messages")
        return JSONResponse({"prompt": prompt})

    async def detokenize(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error("a valid API key is needed (Authorization: Bearer ...)", 401, kind="authentication_error")
        try:
            tokens = json.loads(await request.body() or b"{}")["tokens"]
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            return _error('send {"tokens": [ids]}', param="tokens")
        vocab = self.session.model.config.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            return _error(f"token ids must be in 0..{vocab - 1}", param="tokens")
        return JSONResponse({"content": self.session.model.tokenizer.decode(tokens)})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        stats = self.session.cache_stats()
        c = self.counters
        lines = []
        for name, kind, value, help_text in (
            ("kv_cache_usage_ratio", "gauge", stats.tokens / stats.capacity if stats.capacity else 0.0,
             "share of the KV cache's positions in use"),
            ("kv_cache_tokens", "gauge", stats.tokens, "positions the KV cache holds now"),
            ("kv_cache_capacity_tokens", "gauge", stats.capacity, "positions the KV cache can hold"),
            ("kv_cache_bytes", "gauge", stats.used_bytes, "bytes holding those positions"),
            ("kv_cache_capacity_bytes", "gauge", stats.capacity_bytes, "bytes of the whole cache"),
            ("requests_total", "counter", c.requests, "answered requests"),
            ("requests_cancelled_total", "counter", c.cancelled, "answers stopped because the client left"),
            ("prompt_tokens_total", "counter", c.prompt_tokens, "prompt tokens of answered requests"),
            ("prompt_tokens_cached_total", "counter", c.cached_tokens, "prompt tokens taken from the KV cache"),
            ("generated_tokens_total", "counter", c.generated_tokens, "generated tokens"),
        ):  # fmt: skip
            lines += [f"# HELP llmchat:{name} {help_text}", f"# TYPE llmchat:{name} {kind}", f"llmchat:{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def _chain(first: Any, rest: AsyncGenerator[Any, None]) -> AsyncIterator[Any]:
    """`first`, then the rest (closing `rest` when the consumer stops early: that cancels the answer)."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


def make_app(session: Any, *, api_key: str | None = None) -> Starlette:
    """The server's routes over `session` (a LocalSession opened with MAX_TOP_LOGPROBS candidates)."""
    server = EngineServer(session, api_key=api_key)
    routes = [
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/tokenize", server.tokenize, methods=["POST"]),
        Route("/detokenize", server.detokenize, methods=["POST"]),
        Route("/apply-template", server.apply_template, methods=["POST"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.server = server
    return app
