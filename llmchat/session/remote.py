"""A model on an OpenAI-compatible server (vLLM, SGLang, llama-server, Ollama, `llmchat serve`) as a session.

The chat and the CLI use it like `LocalSession`: messages in, the same `GenerationEvent`s out. What
the numbers are, honestly:

- Token events come from the stream's `logprobs` with `top_logprobs` (servers cap N at 5–20).
  `TokenEvent.logit` is the server's log-probability (a log-softmax, not a raw logit); `prob` its
  exponential. Whether that is the raw softmax or the distribution after the sampler depends on the
  server (llama-server and Ollama: raw by default; vLLM: its `--logprobs-mode`; `llmchat serve`
  sends both, the after-policy one as `policy_logprob`), so `policy_prob` is only filled where the
  server says which it is, and NaN otherwise. The protocol carries token text, not ids: token ids
  are this session's own numbering of the texts it has seen (`Capabilities.token_ids` is False),
  so the chosen token and its candidates compare as the local engine's do. `entropy` is over the
  top N only (a lower bound of the real one).
- Cache numbers are what the server reports: `usage.prompt_tokens_details.cached_tokens` (vLLM,
  `llmchat serve`) or llama-server's `timings.cache_n`; bytes and memory stay unknown (0).
- A server that cannot be reached, or refuses the request, raises `RemoteError` before any event;
  one that fails after the answer started ends the stream with `Finished(reason="error")`, keeping
  the text so far, so nothing said is lost.

The API key is read from the environment variable the spec names at each request and sent as a
bearer token; it never appears in an error message, a repr, or anything saved.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx

from llmchat.engine.errors import LLMChatError
from llmchat.engine.events import Finished, ForcedPrefix, PrefillDone, TokenEvent, TopToken
from llmchat.engine.prompt import COMPLETION, PromptMode, completion_text
from llmchat.engine.sampling import SamplingParams
from llmchat.session.base import (
    CacheStats,
    Capabilities,
    ServerSpec,
    SessionInfo,
    SessionUnavailable,
    server_host,
)
from llmchat.session.metrics import ServerCache, parse_server_cache

MAX_TOP_LOGPROBS = 20  # what OpenAI's API allows; vLLM's default --max-logprobs, llama-server's cap is higher
# llama-server's own defaults, sent explicitly so that what the status bar says is what the server does
REMOTE_DEFAULT_SAMPLING = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
FINISH_REASONS = {"stop": "eos", "length": "max_new_tokens", "eos": "eos", "cancelled": "cancelled"}


class RemoteError(LLMChatError):
    """The server could not be reached, or refused the request (the message says which, never the key)."""


def _error_text(response: httpx.Response) -> str:
    """The server's own error message (OpenAI's `{"error": {"message": ...}}` or llama-server's), short."""
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, httpx.ResponseNotRead):
        return response.reason_phrase or ""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "")[:300]
    if isinstance(error, str):
        return error[:300]
    detail = data.get("detail") if isinstance(data, dict) else None
    return str(detail or response.reason_phrase or "")[:300]


class _LocalPrompt:
    """The template and tokenizer of a local copy of the server's model (`--tokenizer`): the prompt
    view and the prompt's token count without asking the server."""

    def __init__(self, path: str) -> None:
        from llmchat.engine.chat_template import ChatTemplates, read_special_tokens
        from llmchat.engine.package import open_tokenizer, resolve_path

        target = resolve_path(path)
        self.tokenizer = open_tokenizer(target)
        if target.is_file():
            from llmchat.engine.gguf import GGUFFile

            gguf = GGUFFile(target)
            templates, special = gguf.chat_templates(), gguf.special_tokens()
        else:
            templates, special = ChatTemplates.from_folder(target), read_special_tokens(target)
        self.template = None if templates is None else templates.get(None, tools=False, special_tokens=special)

    def render(self, messages: list[dict[str, Any]], mode: PromptMode) -> str:
        if mode == COMPLETION:
            return completion_text(messages)
        if self.template is None:
            raise SessionUnavailable("the local model given with --tokenizer has no chat template")
        return self.template.render(list(messages), add_generation_prompt=True)


class RemoteSession:
    """One model on one server, through the OpenAI chat-completions protocol (or Ollama's /api/chat)."""

    def __init__(self, spec: ServerSpec, *, top_k: int, timeout: float = 120.0, connect_timeout: float = 5.0) -> None:
        self.spec = spec
        self.base = spec.url.rstrip("/").removesuffix("/v1")
        self._client = httpx.Client(
            base_url=self.base, timeout=httpx.Timeout(timeout, connect=connect_timeout), follow_redirects=False
        )
        self._requested_top_k = max(1, min(top_k, MAX_TOP_LOGPROBS))
        self._last_tokens = 0
        self._last_reused = 0
        self._server_cache: ServerCache | None = None  # from its /metrics after the last answer
        self._metrics_offered = spec.protocol != "ollama"  # until a GET /metrics says otherwise
        self._prompt_texts: dict[str, str] = {}
        self._local = _LocalPrompt(spec.tokenizer) if spec.tokenizer else None
        self._texts: list[str] = []  # this session's token ids: an index into the texts seen
        self._text_ids: dict[str, int] = {}
        self.model_name = spec.model or ""
        context = self._connect()
        # llama-server's and llmchat serve's POST /apply-template + /tokenize: the prompt as the server
        # renders and splits it, for the prompt view without a local tokenizer
        self._server_prompt = self._local is None and self._offers_apply_template()
        self.capabilities = Capabilities(
            top_k=self._requested_top_k,
            probabilities=f"reported by the server (top {self._requested_top_k}; raw softmax on llama-server/Ollama)",
            reread_steps=False,
            # continue from chosen tokens through /v1/completions: needs the prompt as text
            branch_at_token=spec.protocol != "ollama" and (self._local is not None or self._server_prompt),
            kv_cache=True,  # what the server reports: prompt tokens and the part it reused
            memory=False,
            prompt_tokens=self._local is not None or self._server_prompt,
            layer_views=False,
            where=spec.url,
            token_ids=False,
        )
        self.info = SessionInfo(
            name=self.model_name,  # the server's own id (a resumed chat asks for it by this name)
            path=spec.url,
            kind="chat",
            labels=(),
            chat=True,
            context_length=context,
            device="server",
            precision=f"on {server_host(spec.url)}",
            default_sampling=REMOTE_DEFAULT_SAMPLING,
        )

    def __repr__(self) -> str:
        return f"RemoteSession({self.spec.url!r}, model={self.model_name!r})"

    # --- HTTP ----------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        if not self.spec.api_key_env:
            return {}
        key = os.environ.get(self.spec.api_key_env)
        if not key:
            raise RemoteError(f"the API key's environment variable {self.spec.api_key_env} is not set")
        return {"Authorization": f"Bearer {key}"}

    def _failed(self, exc: Exception) -> RemoteError:
        """A transport failure in words (httpx's messages name the URL, never a header)."""
        where = self.base
        if isinstance(exc, httpx.ConnectTimeout):
            return RemoteError(f"cannot reach {where}: the connection timed out")
        if isinstance(exc, httpx.ConnectError):
            reason = str(exc) or "connection refused"
            if "CERTIFICATE" in reason.upper():
                return RemoteError(f"cannot reach {where}: its TLS certificate is not trusted ({reason})")
            return RemoteError(f"cannot reach {where}: {reason}")
        if isinstance(exc, httpx.TimeoutException):
            return RemoteError(f"{where} did not answer in time")
        return RemoteError(f"{where}: {type(exc).__name__}: {exc}")

    def _redacted(self, text: str) -> str:
        """`text` without the API key (a server may quote the key it refused)."""
        key = os.environ.get(self.spec.api_key_env or "") if self.spec.api_key_env else None
        return text.replace(key, "<the API key>") if key else text

    def _refused(self, response: httpx.Response, what: str) -> RemoteError:
        reason = self._redacted(_error_text(response))
        hint = {401: " (check the API key)", 403: " (check the API key)", 404: " (wrong URL or model name?)"}
        return RemoteError(
            f"{self.base} refused {what}: HTTP {response.status_code}"
            + (f": {reason}" if reason else "")
            + hint.get(response.status_code, "")
        )

    def _get_json(self, path: str) -> Any:
        return self._json("GET", path)

    def _json(self, method: str, path: str, **options: Any) -> Any:
        """A request whose answer is JSON; a refusal or anything else is a RemoteError."""
        try:
            response = self._client.request(method, path, headers=self._headers(), **options)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None
        if response.status_code >= 400:
            raise self._refused(response, f"{method} {path}")
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RemoteError(
                f"{self.base}{path} did not answer with JSON: is this an OpenAI-compatible server?"
            ) from None

    def _connect(self) -> int:
        """Check the server and the model; the context length where the server says it (else 0)."""
        if self.spec.protocol == "ollama":
            data = self._get_json("/api/tags")
            names = [m.get("name") for m in data.get("models", []) if isinstance(m, dict)]
        else:
            data = self._get_json("/v1/models")
            entries = [m for m in data.get("data", []) if isinstance(m, dict)] if isinstance(data, dict) else []
            names = [m.get("id") for m in entries]
        names = [str(n) for n in names if n]
        if not self.model_name:
            if len(names) != 1:
                listed = ", ".join(names[:8]) or "none"
                raise RemoteError(f"{self.base} serves {len(names)} models ({listed}): name one with --model")
            self.model_name = names[0]
        elif self.spec.protocol == "ollama" and f"{self.model_name}:latest" in names:
            self.model_name += ":latest"  # Ollama lists a model under its tag
        elif names and self.model_name not in names:
            raise RemoteError(f"{self.base} has no model {self.model_name!r} (it serves: {', '.join(names[:8])})")
        if self.spec.protocol == "ollama":
            return 0
        for entry in entries:
            if entry.get("id") == self.model_name:
                for key in ("max_model_len", "context_length", "n_ctx"):
                    if isinstance(entry.get(key), int):
                        return int(entry[key])
        try:  # llama-server says its context in /props
            props = self._client.get("/props", headers=self._headers(), timeout=5.0)
            n_ctx = props.json().get("default_generation_settings", {}).get("n_ctx") if props.is_success else None
            return int(n_ctx) if isinstance(n_ctx, int) else 0
        except (httpx.HTTPError, json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return 0

    # --- answering -----------------------------------------------------------------------------------

    def _request(
        self,
        messages: list[dict[str, Any]],
        mode: PromptMode,
        sampling: SamplingParams,
        max_new_tokens: int | None,
        stop_strings: Sequence[str],
    ) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model_name, "stream": True}
        if self.spec.protocol == "ollama":
            options = _knobs(sampling)
            if max_new_tokens:
                options["num_predict"] = max_new_tokens
            if stop_strings:
                options["stop"] = list(stop_strings)
            body |= {"logprobs": True, "top_logprobs": self._requested_top_k, "options": options}
            if mode == COMPLETION:
                return "/api/generate", body | {"prompt": completion_text(messages), "raw": True}
            return "/api/chat", body | {"messages": _plain_messages(messages)}
        # top_k, min_p and the penalty are not OpenAI's own API, but vLLM, SGLang, llama-server and llmchat take
        # them; vLLM and SGLang name the penalty repetition_penalty
        body |= _knobs(sampling) | {
            "repetition_penalty": sampling.repetition_penalty,
            "stream_options": {"include_usage": True},
        }
        if max_new_tokens:
            body["max_tokens"] = max_new_tokens
        if stop_strings:
            body["stop"] = list(stop_strings)
        if mode == COMPLETION:
            return "/v1/completions", body | {"prompt": completion_text(messages), "logprobs": self._requested_top_k}
        return "/v1/chat/completions", body | {
            "messages": _plain_messages(messages),
            "logprobs": True,
            "top_logprobs": self._requested_top_k,
        }

    def answer(
        self,
        messages: list[dict[str, Any]],
        *,
        answer_id: str,
        mode: PromptMode,
        sampling: SamplingParams,
        live_sampling: Callable[[], SamplingParams] | None = None,
        cancel: Any = None,
        max_new_tokens: int | None = None,
        answer_prefix: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
    ) -> Iterator[Any]:
        """Stream one answer's events (RemoteError before the first one when the server refuses).

        `answer_prefix` (a branch at a token: this session's ids of the kept tokens and the picked
        one) continues through `/v1/completions`, the prompt rendered as text (the local template,
        or the server's `/apply-template`) with the kept tokens' text after it."""
        prefix_text = ""
        if answer_prefix:
            if not self.capabilities.branch_at_token:
                raise SessionUnavailable(
                    "a server cannot continue an answer from chosen tokens (branch at a token) unless its prompt"
                    " can be rendered as text: start with --tokenizer, or use a server with /apply-template"
                )
            prefix_text = "".join(self.token_text(i) for i in answer_prefix)
            prompt = self._prompt_text(messages, mode) + prefix_text
            left = max(1, max_new_tokens - len(answer_prefix)) if max_new_tokens else None  # the kept ones count
            path, body = self._request(messages, COMPLETION, sampling, left, stop_strings)
            body["prompt"] = prompt
        else:
            if self._local is not None:
                self._prompt_texts[answer_id] = self._local.render(messages, mode)
            path, body = self._request(messages, mode, sampling, max_new_tokens, stop_strings)
        began = time.perf_counter()
        try:
            headers = self._headers()
            context = self._client.stream("POST", path, json=body, headers=headers)
            response = context.__enter__()
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None
        try:
            if response.status_code >= 400:
                response.read()
                raise self._refused(response, "the request")
            reader = _OllamaStream() if self.spec.protocol == "ollama" else _OpenAIStream()
            watching = threading.Event()
            if cancel is not None:  # a stalled server sends no line to check the flag at: close it from here
                threading.Thread(target=_close_on_cancel, args=(cancel, watching, response), daemon=True).start()
            try:
                if answer_prefix:
                    yield ForcedPrefix(tuple(answer_prefix), prefix_text, "", prefix_text)
                yield from self._events(response, reader, began, cancel, tuple(answer_prefix), prefix_text)
            finally:
                watching.set()
        finally:
            context.__exit__(None, None, None)

    def _events(
        self,
        response: httpx.Response,
        reader: _StreamReader,
        began: float,
        cancel: Any,
        prefix: tuple[int, ...] = (),
        prefix_text: str = "",
    ) -> Iterator[Any]:
        steps: list[TokenEvent] = []
        texts: list[str] = []
        pending = ""  # text the server sent without a token's logprobs (joined to the next token)
        first_at: float | None = None
        last_at = began
        reason, error = "", ""
        try:
            for line in response.iter_lines():
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if not line.strip():
                    continue
                try:
                    chunk = reader.parse(line)
                except ValueError as exc:
                    reason, error = "error", self._redacted(f"the server sent a malformed chunk ({exc})")
                    break
                if chunk is None:  # [DONE]
                    break
                now = time.perf_counter()
                for text, entry in chunk.tokens:
                    if entry is None:
                        pending += text
                        continue
                    if first_at is None:
                        first_at = now
                        yield PrefillDone(0, 0, 0, now - began, 0.0, 0, 0)  # counts: in the usage at the end
                    event = _token_event(pending + text, entry, len(prefix) + len(steps), now - last_at, self._id)
                    pending = ""
                    last_at = now
                    steps.append(event)
                    texts.append(event.text)
                    yield event
                if chunk.text_without_logprobs:
                    if first_at is None:
                        first_at = now
                        yield PrefillDone(0, 0, 0, now - began, 0.0, 0, 0)
                    # a server that sends no logprobs (or none for this text): the text streams, unscored
                    index = len(prefix) + len(steps)
                    event = _unscored_event(pending + chunk.text_without_logprobs, index, now - last_at, self._id)
                    pending, last_at = "", now
                    steps.append(event)
                    texts.append(event.text)
                    yield event
                if chunk.finish_reason:
                    reason = FINISH_REASONS.get(chunk.finish_reason, "eos")
                reader.usage.update(chunk.usage)
                if chunk.done:
                    break
        except httpx.TimeoutException:
            reason, error = "error", f"{self.base} stopped sending (timed out mid-answer)"
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if cancel is not None and cancel.is_set():  # the watcher closed the stream: a stop, not a fault
                reason = "cancelled"
            else:
                reason, error = "error", f"the connection to {self.base} broke mid-answer ({type(exc).__name__})"
        if not reason:
            reason, error = "error", f"{self.base} closed the stream before the answer ended"
        usage = reader.usage
        text = prefix_text + "".join(texts) + pending
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        reused = int(usage.get("cached_tokens") or 0)
        generated = int(usage.get("completion_tokens") or len(steps))
        self._last_tokens, self._last_reused = prompt_tokens + generated, reused
        end = time.perf_counter()
        self._server_cache = self._read_metrics()
        ttft = (first_at or end) - began
        yield Finished(
            reason=reason,  # type: ignore[arg-type]
            prompt_tokens=prompt_tokens,
            reused_tokens=reused,
            prefilled_tokens=max(prompt_tokens - reused, 0),
            generated_tokens=generated,
            prefill_seconds=ttft,
            decode_seconds=end - (first_at or end),
            ttft_seconds=ttft,
            text=text,
            tail=pending,
            content=text,
            token_ids=prefix + tuple(step.token_id for step in steps),
            prefix_tokens=len(prefix),
            cache_tokens=self._last_tokens,
            error=error,
        )

    # --- what a server can and cannot show -----------------------------------------------------------

    def prompt_tokens(self, messages: list[dict[str, Any]], mode: PromptMode) -> list[int]:
        return list(self.prompt_view(messages, mode).token_ids)

    def prompt_view(self, messages: list[dict[str, Any]], mode: PromptMode) -> Any:
        """The next request as the local template and tokenizer render it (`--tokenizer`), else as the
        server renders and splits it (`/apply-template` and `/tokenize`, where it has them); `reused`
        is 0: the server's cache is its own."""
        from llmchat.engine.inspector import PromptView

        completion = mode == COMPLETION
        if self._local is not None:
            text = self._local.render(messages, mode)
            ids = self._local.tokenizer.encode(text, add_special_tokens=completion)
            texts = tuple(self._local.tokenizer.decode([i]) for i in ids)
            return PromptView(text, tuple(ids), texts, 0, completion=completion)
        if not self._server_prompt:
            raise SessionUnavailable(
                "the prompt's tokens need --tokenizer (a local copy of the model's tokenizer):"
                f" {server_host(self.spec.url)} has no /apply-template and /tokenize"
            )
        text = self._prompt_text(messages, mode)
        pieces = self._json(
            "POST", "/tokenize", json={"content": text, "add_special": completion, "with_pieces": True}, timeout=10.0
        )
        tokens = pieces.get("tokens") if isinstance(pieces, dict) else None
        if not isinstance(tokens, list) or not all(_is_piece(t) for t in tokens):
            raise SessionUnavailable(f"{server_host(self.spec.url)}'s /tokenize answered in an unknown shape")
        texts = tuple(t["piece"] if isinstance(t.get("piece"), str) else "" for t in tokens)
        return PromptView(text, tuple(t["id"] for t in tokens), texts, 0, completion=completion)

    def _prompt_text(self, messages: list[dict[str, Any]], mode: PromptMode) -> str:
        """The request's prompt as text: the local template's, or the server's own rendering."""
        if self._local is not None:
            return self._local.render(messages, mode)
        return completion_text(messages) if mode == COMPLETION else self._server_text(messages)

    def _server_text(self, messages: list[dict[str, Any]]) -> str:
        reply = self._json("POST", "/apply-template", json={"messages": _plain_messages(messages)}, timeout=10.0)
        prompt = reply.get("prompt") if isinstance(reply, dict) else None
        if not isinstance(prompt, str):
            raise SessionUnavailable(f"{server_host(self.spec.url)}'s /apply-template answered without a prompt")
        return prompt

    def _offers_apply_template(self) -> bool:
        """Whether the server renders a chat prompt for us (asked once, at connect)."""
        if self.spec.protocol == "ollama":
            return False
        try:
            self._server_text([{"role": "user", "content": "Hi"}])
        except LLMChatError:
            return False
        return True

    def prompt_ids(self, answer_id: str | None) -> list[int] | None:
        return None  # the server tokenized the prompt; its ids are not in the protocol

    def _id(self, text: str) -> int:
        """This session's id of a token text (the protocol has no ids)."""
        if text not in self._text_ids:
            self._text_ids[text] = len(self._texts)
            self._texts.append(text)
        return self._text_ids[text]

    def token_text(self, token_id: int) -> str:
        """The text of one of this session's ids (the prompt view's ids are the local tokenizer's)."""
        return self._texts[token_id] if 0 <= token_id < len(self._texts) else ""

    def forget_prompts(self) -> None:
        self._prompt_texts.clear()

    def default_system_prompt(self) -> str | None:
        return None

    def cache_stats(self) -> CacheStats:
        """The last request's tokens as the server counted them, capacity its context (0: unknown);
        what its /metrics page said of its whole KV cache after the answer, where it has one."""
        return CacheStats(self._last_tokens, self.info.context_length, 0, 0, 0, server=self._server_cache)

    def _read_metrics(self) -> ServerCache | None:
        """The server's KV-cache gauges (session/metrics.py), once per answer. A server without the
        page (404: llama-cpp-python, llama-server without --metrics) is not asked again."""
        if not self._metrics_offered:
            return None
        try:
            response = self._client.get("/metrics", headers=self._headers(), timeout=3.0)
        except (httpx.HTTPError, RemoteError):
            return None  # the answer is what counts; the figure stays unknown
        if response.status_code in (404, 405):
            self._metrics_offered = False
            return None
        return parse_server_cache(response.text) if response.is_success else None

    def memory(self) -> Any:
        raise SessionUnavailable(f"the model's memory is on the server ({server_host(self.spec.url)})")

    def _engine_only(self, *_: Any, **__: Any) -> Any:
        raise SessionUnavailable("this needs llmchat's own engine: a server does not expose its logits or layers")

    policy_view = live_policy_view = inside_step = prompt_heatmap = answer_experts = quantization_diff = _engine_only

    def close(self) -> None:
        self._client.close()


def _knobs(sampling: SamplingParams) -> dict[str, Any]:
    """The sampling policy as llama-server and Ollama name its knobs, every one explicit (a server's own
    defaults differ from what the status bar shows)."""
    knobs: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "repeat_penalty": sampling.repetition_penalty,
    }
    if sampling.seed is not None:
        knobs["seed"] = sampling.seed
    return knobs


def _close_on_cancel(cancel: Any, done: threading.Event, response: httpx.Response) -> None:
    while not done.wait(0.1):
        if cancel.is_set():
            response.close()
            return


def _unscored_event(text: str, index: int, seconds: float, token_id: Callable[[str], int]) -> TokenEvent:
    """Text the server sent without logprobs: shown and kept, its probabilities unknown (NaN)."""
    nan = math.nan
    return TokenEvent(token_id(text), text, index, nan, nan, nan, 0, (), seconds, 0, 0, content=text, entropy=nan)


def _is_piece(token: Any) -> bool:
    """One entry of llama-server's `/tokenize` with pieces: `{"id": int, "piece": str}`."""
    return isinstance(token, dict) and isinstance(token.get("id"), int)


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as the protocol takes it: role and content (and tool fields where present)."""
    keep = ("role", "content", "name", "tool_calls", "tool_call_id")
    return [{k: m[k] for k in keep if k in m and m[k] is not None} for m in messages]


def _policy_prob(entry: dict[str, Any]) -> float:
    """`llmchat serve`'s `policy_logprob`: null where the policy cut the token (0), absent where the
    server does not say (NaN: unknown)."""
    if "policy_logprob" not in entry:
        return math.nan
    value = entry["policy_logprob"]
    return 0.0 if value is None else math.exp(float(value))


def _token_event(
    text: str, entry: dict[str, Any], index: int, seconds: float, token_id: Callable[[str], int]
) -> TokenEvent:
    logprob = float(entry.get("logprob", -math.inf))
    top_entries = [t for t in entry.get("top_logprobs") or [] if isinstance(t, dict)]
    top = []
    for candidate in sorted(top_entries, key=lambda t: -float(t.get("logprob", -math.inf))):
        lp = float(candidate.get("logprob", -math.inf))
        word = str(candidate.get("token", ""))
        policy_prob = _policy_prob(candidate)
        top.append(TopToken(token_id(word), word, lp, math.exp(lp), policy_prob))
    tokens = [t.text for t in top]
    token = str(entry.get("token", text))
    rank = tokens.index(token) if token in tokens else len(top)
    probs = [t.prob for t in top]
    entropy = -sum(p * math.log2(p) for p in probs if p > 0)  # over the top N: a lower bound
    return TokenEvent(
        token_id=token_id(token),
        text=text,
        index=index,
        logit=logprob,
        prob=math.exp(logprob),
        policy_prob=_policy_prob(entry),
        rank=rank,
        top=tuple(top),
        seconds=seconds,
        cache_tokens=0,
        cache_bytes=0,
        content=text,
        entropy=entropy,
    )


# --- the two stream formats ------------------------------------------------------------------------


class _Chunk:
    def __init__(self) -> None:
        self.tokens: list[tuple[str, dict[str, Any] | None]] = []  # (text, logprob entry or None)
        self.text_without_logprobs = ""
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.done = False


class _StreamReader(ABC):
    """One stream format: a line in, a chunk out (None: the stream's end marker); usage gathered."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}

    @abstractmethod
    def parse(self, line: str) -> _Chunk | None: ...


def _usage(data: dict[str, Any]) -> dict[str, Any]:
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    out = {k: usage[k] for k in ("prompt_tokens", "completion_tokens") if isinstance(usage.get(k), int)}
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        out["cached_tokens"] = details["cached_tokens"]
    timings = data.get("timings")  # llama-server
    if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
        out["cached_tokens"] = timings["cache_n"]
        if isinstance(timings.get("prompt_n"), int):
            out.setdefault("prompt_tokens", timings["cache_n"] + timings["prompt_n"])
    return out


class _OpenAIStream(_StreamReader):
    """Server-sent events of chat completions (`delta.content` + `logprobs.content`) or completions
    (`text` + the legacy `logprobs.tokens/token_logprobs/top_logprobs`)."""

    def parse(self, line: str) -> _Chunk | None:
        if line.startswith(":") or line.startswith("event:"):
            return _Chunk()
        if not line.startswith("data:"):
            raise ValueError(f"not an event line: {line[:60]!r}")
        payload = line[5:].strip()
        if payload == "[DONE]":
            return None
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if isinstance(data.get("error"), dict | str):
            message = data["error"].get("message") if isinstance(data["error"], dict) else data["error"]
            raise ValueError(f"the server reported an error: {str(message)[:200]}")
        chunk = _Chunk()
        chunk.usage = _usage(data)
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            chunk.finish_reason = choice.get("finish_reason") or chunk.finish_reason
            delta = choice.get("delta")
            text = (delta.get("content") or "") if isinstance(delta, dict) else str(choice.get("text") or "")
            logprobs = choice.get("logprobs")
            entries = _entries(logprobs)
            if not entries:
                chunk.text_without_logprobs += text
                continue
            pieces = [str(e.get("token", "")) for e in entries]
            if "".join(pieces) != text:  # the text is the truth; a split character, say, goes to the last token
                pieces = [""] * (len(entries) - 1) + [text]
            chunk.tokens += list(zip(pieces, entries, strict=True))
        return chunk


def _entries(logprobs: Any) -> list[dict[str, Any]]:
    """Per-token logprob entries of a chat chunk or a legacy completions chunk, in one shape."""
    if not isinstance(logprobs, dict):
        return []
    if isinstance(logprobs.get("content"), list):
        return [e for e in logprobs["content"] if isinstance(e, dict)]
    tokens, values, tops = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list):
        return []
    out = []
    for i, (token, value) in enumerate(zip(tokens, values, strict=False)):
        top = tops[i] if isinstance(tops, list) and i < len(tops) and isinstance(tops[i], dict) else {}
        listed = [{"token": t, "logprob": lp} for t, lp in top.items()]
        out.append({"token": token, "logprob": value if value is not None else -math.inf, "top_logprobs": listed})
    return out


class _OllamaStream(_StreamReader):
    """Ollama's native NDJSON (`/api/chat`, `/api/generate`): `message.content` or `response`, and
    `logprobs: [{token, logprob, top_logprobs}]` when asked for."""

    def parse(self, line: str) -> _Chunk | None:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("error"):
            raise ValueError(f"the server reported an error: {str(data['error'])[:200]}")
        chunk = _Chunk()
        message = data.get("message")
        text = str(message.get("content") or "") if isinstance(message, dict) else str(data.get("response") or "")
        entries = [e for e in data.get("logprobs") or [] if isinstance(e, dict)]
        if entries:
            pieces = [str(e.get("token", "")) for e in entries]
            if "".join(pieces) != text:
                pieces = [""] * (len(entries) - 1) + [text]
            chunk.tokens = list(zip(pieces, entries, strict=True))
        else:
            chunk.text_without_logprobs = text
        if data.get("done"):
            chunk.done = True
            chunk.finish_reason = {"length": "length"}.get(str(data.get("done_reason")), "stop")
            if isinstance(data.get("prompt_eval_count"), int):
                chunk.usage["prompt_tokens"] = data["prompt_eval_count"]
            if isinstance(data.get("eval_count"), int):
                chunk.usage["completion_tokens"] = data["eval_count"]
        return chunk
