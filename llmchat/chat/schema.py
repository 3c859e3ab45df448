"""The conversation file's schema, declared once: what every field may hold, checked on every load.

A file that reads as JSON can still hold anything (`"model": {"name": ["x"]}`, `"path": 5`, a token
record whose top-k entry has a string for an id); before this schema such a file was listed as
readable and crashed the chat later. Each record type is a TypedDict, validated by pydantic in
strict mode (no coercion: "0.5" is not a number, true is not an id), straight from the JSON text.
The same TypedDicts are the types of the records the app builds (`token_record`, `answer_stats`).

Unknown keys are ignored, as version 1 readers always did: a field added later without a version
bump (like `system_changes`) is one an older reader may skip. A change an older reader would
misread bumps `store.VERSION` instead, and files from a newer llmchat are refused before the schema.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    Strict,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)
from typing_extensions import NotRequired, TypedDict  # pydantic needs typing_extensions' TypedDict before 3.12

from llmchat.engine.errors import LLMChatError

CONVERSATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
Role = Literal["system", "user", "assistant", "tool"]
Mode = Literal["chat", "completion"]  # how the model sees the branch (engine.prompt.PROMPT_MODES)


class ConversationError(LLMChatError):
    """An operation on a conversation that its state does not allow (unknown message, wrong role...)."""


class ConversationFormatError(ConversationError):
    """Conversation data (a saved file) does not follow the schema."""


def parse_iso(text: str) -> datetime:
    """An ISO 8601 timestamp as an aware datetime (a timestamp without zone is taken as UTC)."""
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _conversation_id(text: str) -> str:
    if not CONVERSATION_ID.fullmatch(text):
        raise ValueError(f"{text!r} is not a conversation id (letters, digits, '-' and '_'; at most 64)")
    return text


def _iso(text: str) -> str:
    try:
        parse_iso(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    return text


_STRICT = ConfigDict(strict=True, extra="ignore")
Timestamp = Annotated[str, AfterValidator(_iso)]
MessageId = Annotated[str, Field(min_length=1)]
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]  # tokens per second
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Entropy = float  # bits; unbounded: float error can leave -0.0001, a broken model NaN (shown as it is)
# A candidate of the top-k: [token id, text, logit, probability, probability under the policy];
# files from before policies were kept have the first four. JSON arrays arrive as lists: the
# tuple itself is lax about that, its items are strict. A logit may be -inf (a masked token).
TopEntry = (
    Annotated[tuple[StrictInt, StrictStr, StrictFloat, Probability], Strict(False)]
    | Annotated[tuple[StrictInt, StrictStr, StrictFloat, Probability, Probability], Strict(False)]
)
PrefillChunk = Annotated[tuple[Count, Seconds], Strict(False)]  # (tokens, seconds) of one prefill chunk


class TokenRecord(TypedDict):
    """One generated token of a saved answer: what the inspector shows without the model."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: Count
    text: str
    prob: Probability
    rank: Count
    top: list[TopEntry]
    policy_prob: NotRequired[Probability]
    entropy: NotRequired[Entropy]
    policy_entropy: NotRequired[Entropy]
    seconds: NotRequired[Seconds]
    forced: NotRequired[bool]  # picked by the user at a branch, not sampled
    end: NotRequired[bool]  # the step that chose end-of-sequence: not part of the answer's text


class AnswerStats(TypedDict, total=False):
    """An answer's numbers. An interrupted answer (the chat closed mid-answer) has only some."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    tokens: Count
    prompt_tokens: Count
    reused_tokens: Count
    ttft_s: Seconds
    prefill_tok_s: Rate
    decode_tok_s: Rate
    finish_reason: Annotated[str, Field(min_length=1)]
    prefill_chunks: list[PrefillChunk]
    error: str  # why a server's answer was cut off (finish_reason "error"): shown again on resume


class MessageData(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: MessageId
    parent: MessageId | None
    role: Role
    content: str
    reasoning: NotRequired[str | None]
    tool_calls: NotRequired[list[dict[str, Any]] | None]  # as the model wrote them: any JSON objects
    stats: NotRequired[AnswerStats | None]
    tokens: NotRequired[list[TokenRecord] | None]


class ModelData(TypedDict, total=False):
    """Which model the conversation was held with; other keys are kept as they are."""

    __pydantic_config__ = ConfigDict(strict=True, extra="allow")  # type: ignore[misc]
    name: str
    path: Annotated[str, Field(min_length=1)]
    server: Annotated[str, Field(min_length=1)]  # a model on a server: its URL (then there is no path)
    api_key_env: Annotated[str, Field(min_length=1)]  # the environment variable of its API key, never the key
    protocol: Literal["openai", "ollama"]  # how the server is spoken to (absent: OpenAI's)


class SamplingData(TypedDict, total=False):
    """The sampling settings the chat resumes with (the ranges of engine.SamplingParams)."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    temperature: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    top_k: Count
    top_p: Annotated[float, Field(gt=0.0, le=1.0)]
    min_p: Probability
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    seed: int | None


class SystemChange(TypedDict):
    """The system prompt became `text` after message `after` (the newest message then; None: before any)."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    after: MessageId | None
    text: str


class ConversationData(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    format: NotRequired[Any]  # checked by the store before anything else counts (see FileHeader)
    version: NotRequired[Any]
    id: Annotated[str, AfterValidator(_conversation_id)]
    title: str
    created: Timestamp
    updated: Timestamp
    model: ModelData
    sampling: SamplingData
    system: str
    messages: list[MessageData]
    current: MessageId | None
    mode: NotRequired[Mode]
    system_changes: NotRequired[list[SystemChange]]


class FileHeader(TypedDict):
    """What is checked before the schema: a newer file may follow another one."""

    __pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[misc]
    format: NotRequired[Any]
    version: NotRequired[Any]


class JournalHeader(TypedDict):
    """The first line of a streaming answer's journal (see journal.py)."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    journal: Literal["llmchat.answer-journal"]
    version: Literal[1]
    conversation: str
    message: MessageId


class JournalEntry(TypedDict):
    """One frame of a streaming answer: what it added, and where (lengths of content, reasoning
    and tokens before it), so that replaying it over a file that already holds it changes nothing."""

    __pydantic_config__ = _STRICT  # type: ignore[misc]
    at: Annotated[tuple[Count, Count, Count], Strict(False)]
    content: NotRequired[str]
    reasoning: NotRequired[str]
    tokens: NotRequired[list[TokenRecord]]


T = TypeVar("T")
CONVERSATION = TypeAdapter(ConversationData)
HEADER = TypeAdapter(FileHeader)
JOURNAL_HEADER = TypeAdapter(JournalHeader)
JOURNAL_ENTRY = TypeAdapter(JournalEntry)


def validate_json(adapter: TypeAdapter[T], text: str | bytes) -> T:
    """Parse and validate in one pass; any problem is a ConversationFormatError with a one-line reason."""
    try:
        return adapter.validate_json(text)
    except ValidationError as error:
        raise ConversationFormatError(describe(error)) from None


def validate_python(adapter: TypeAdapter[T], data: Any) -> T:
    """Validate data already in memory (JSON-shaped), with the same one-line reasons."""
    try:
        return adapter.validate_python(data)
    except ValidationError as error:
        raise ConversationFormatError(describe(error)) from None


def describe(error: ValidationError) -> str:
    """The most specific problem as one line: `messages[1].tokens[17].top[3][1]: must be a string, got int`.

    Of a union's alternatives (a 4- or 5-item top-k entry) the one that got furthest is the one meant.
    """
    problems = error.errors(include_url=False)
    best = max(problems, key=lambda p: len(_path(p["loc"])))  # max keeps the first of equals
    path, kind = _path(best["loc"]), best["type"]
    if kind == "json_invalid":
        return f"not valid JSON: {best['ctx'].get('error', best['msg']) if best.get('ctx') else best['msg']}"
    if not path and kind in ("dict_type", "model_type"):
        return "not a JSON object"
    if kind == "missing":
        if isinstance(path[-1], int):  # a top-k entry or a prefill chunk with too few items
            return f"{_format_path(path)} is missing"
        where = _format_path(path[:-1])
        return f"{where + ': ' if where else ''}{path[-1]!r} is missing"
    message = best["msg"]
    message = message[0].lower() + message[1:]
    for long, short in (("input should be", "must be"), ("value error, ", ""), ("a valid array", "a list"),
                        ("a valid dictionary", "an object"), ("a valid ", "a ")):  # fmt: skip
        message = message.replace(long, short)
    message = message.replace("must be a integer", "must be an integer")
    if kind == "literal_error":
        message += f", got {best['input']!r}"
    elif kind.endswith("_type") or kind == "int_from_float":
        message += f", got {_json_type(best['input'])}"
    where = _format_path(path)
    return f"{where}: {message}" if where else message


def _path(loc: tuple[int | str, ...]) -> list[int | str]:
    # A union's alternatives show up in `loc` as their type names ('tuple[int, str, ...]'); a key never has brackets.
    return [part for part in loc if isinstance(part, int) or "[" not in part]


def _format_path(path: list[int | str]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _json_type(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
             tuple: "a list", dict: "an object", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)
