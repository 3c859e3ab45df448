"""A conversation as a tree of messages.

Editing a user message or regenerating an answer never overwrites anything: it adds a sibling
branch under the same parent, so every earlier version stays reachable. `current` names the leaf
of the branch on screen; `path()` walks from the root down to it, and that path is what the model
sees. Plain standard library only: the UI and the headless commands load this without torch.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, cast, get_args

from llmchat.engine.errors import LLMChatError

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = get_args(Role)
TITLE_LIMIT = 60
CONVERSATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class ConversationError(LLMChatError):
    """An operation on a conversation that its state does not allow (unknown message, wrong role...)."""


class ConversationFormatError(ConversationError):
    """Conversation data (a saved file) does not follow the schema."""


def now_iso() -> str:
    """The current time as ISO 8601 UTC with milliseconds (so quick successive saves still sort)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_iso(text: str) -> datetime:
    """An ISO 8601 timestamp as an aware datetime (a timestamp without zone is taken as UTC)."""
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def new_conversation_id() -> str:
    """Short, filename-safe, sortable by creation time, and unique in practice (random suffix)."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def make_title(text: str, limit: int = TITLE_LIMIT) -> str:
    """A one-line title from a message: whitespace collapsed, cut at a word boundary with '…'."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    cut = line[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,.;:-") + "…"


@dataclass
class Message:
    """One message; `parent` is None for the first message of a branch from the root."""

    id: str
    parent: str | None
    role: Role
    content: str = ""
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    stats: dict[str, Any] | None = None
    tokens: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; optional fields appear only when set."""
        data: dict[str, Any] = {"id": self.id, "parent": self.parent, "role": self.role, "content": self.content}
        for key in ("reasoning", "tool_calls", "stats", "tokens"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "message") -> Message:
        """Checks every field's type; a wrong one raises ConversationFormatError naming it."""
        if not isinstance(data, dict):
            raise ConversationFormatError(f"{where} is not a JSON object")
        message_id = _field(data, "id", str, where)
        where = f"message {message_id!r}"
        role = _field(data, "role", str, where)
        if role not in ROLES:
            raise ConversationFormatError(f"{where} has an unknown role {role!r} (expected one of {', '.join(ROLES)})")
        return cls(
            id=message_id,
            parent=_field(data, "parent", str, where, optional=True),
            role=cast(Role, role),
            content=_field(data, "content", str, where),
            reasoning=_field(data, "reasoning", str, where, optional=True),
            tool_calls=_list_of_objects(data, "tool_calls", where),
            stats=_field(data, "stats", dict, where, optional=True),
            tokens=_list_of_objects(data, "tokens", where),
        )


def _field(data: dict[str, Any], key: str, kind: type, where: str, *, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if key not in data:
        raise ConversationFormatError(f"{where} has no {key!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {str: "a string", dict: "an object", list: "a list", int: "an integer"}[kind]
        raise ConversationFormatError(f"{where}: {key!r} must be {expected}, got {type(value).__name__}")
    return value


def _list_of_objects(data: dict[str, Any], key: str, where: str) -> list[dict[str, Any]] | None:
    value = _field(data, key, list, where, optional=True)
    if value is not None and not all(isinstance(item, dict) for item in value):
        raise ConversationFormatError(f"{where}: {key!r} must be a list of objects")
    return cast("list[dict[str, Any]] | None", value)


@dataclass(eq=False)
class Conversation:
    """A chat: settings, a tree of messages (kept in creation order) and the current leaf."""

    id: str = field(default_factory=new_conversation_id)
    title: str = ""
    created: str = field(default_factory=now_iso)
    updated: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    system: str = ""
    messages: list[Message] = field(default_factory=list)
    current: str | None = None

    def __post_init__(self) -> None:
        if not CONVERSATION_ID.fullmatch(self.id):
            raise ConversationFormatError(
                f"conversation id {self.id!r} is not valid (letters, digits, '-' and '_'; at most 64)"
            )
        self.updated = self.updated or self.created
        self._by_id: dict[str, Message] = {}
        for message in self.messages:
            self._index(message)
        if self.current is not None and self.current not in self._by_id:
            raise ConversationFormatError(f"current message {self.current!r} is not in the conversation")

    def _index(self, message: Message) -> None:
        if message.id in self._by_id:
            raise ConversationFormatError(f"message id {message.id!r} appears twice")
        if message.parent is not None and message.parent not in self._by_id:
            raise ConversationFormatError(
                f"message {message.id!r}: parent {message.parent!r} is not an earlier message"
            )
        self._by_id[message.id] = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Conversation) and self.to_dict() == other.to_dict()

    # --- reading the tree ----------------------------------------------------------------------

    def get(self, message_id: str) -> Message:
        """The message with this id; an unknown id is a ConversationError."""
        try:
            return self._by_id[message_id]
        except KeyError:
            raise ConversationError(f"conversation {self.id} has no message {message_id!r}") from None

    def children(self, message_id: str | None) -> list[Message]:
        """Direct replies to a message (None: the roots), oldest first."""
        return [m for m in self.messages if m.parent == message_id]

    def branch_siblings(self, message_id: str) -> list[Message]:
        """The message and its alternatives (same parent), oldest first: the branches to switch between."""
        return self.children(self.get(message_id).parent)

    def sibling_position(self, message_id: str) -> tuple[int, int]:
        """(0-based index among its siblings, number of siblings), for a '2/3' branch indicator."""
        siblings = self.branch_siblings(message_id)
        return [m.id for m in siblings].index(message_id), len(siblings)

    def path(self) -> list[Message]:
        """The messages from the root down to `current`: the branch on screen."""
        chain: list[Message] = []
        message_id = self.current
        while message_id is not None:
            message = self._by_id[message_id]
            chain.append(message)
            message_id = message.parent
        return chain[::-1]

    @property
    def turns(self) -> int:
        """User messages on the current branch."""
        return sum(1 for m in self.path() if m.role == "user")

    def chat_messages(self, *, before: str | None = None) -> list[dict[str, Any]]:
        """The {role, content} list a chat template renders: system prompt first, then the branch.

        Reasoning stays out (templates re-render answers without it). `before` stops at that
        message, for prompting the model to write it (a regenerated answer).
        """
        result: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        for message in self.path():
            if message.id == before:
                break
            entry: dict[str, Any] = {"role": message.role, "content": message.content}
            if message.tool_calls:
                entry["tool_calls"] = message.tool_calls
            result.append(entry)
        return result

    # --- changing the tree ---------------------------------------------------------------------

    def add_message(self, role: Role, content: str = "", *, parent: str | None = None, **fields: Any) -> Message:
        """Append a message under `parent` and make it current (the low-level form of add_user...)."""
        if role not in ROLES:
            raise ConversationError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if parent is not None:
            self.get(parent)
        message = Message(id=self._new_message_id(), parent=parent, role=role, content=content, **fields)
        self._index(message)
        self.messages.append(message)
        self.current = message.id
        if role == "user" and not self.title:
            self.title = make_title(content)
        self.touch()
        return message

    def add_user(self, text: str) -> Message:
        """A new user message after the current one; the first one also names the conversation."""
        return self.add_message("user", text, parent=self.current)

    def add_assistant(
        self,
        content: str = "",
        *,
        reasoning: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        stats: dict[str, Any] | None = None,
        tokens: list[dict[str, Any]] | None = None,
    ) -> Message:
        """A new answer after the current message; usually empty, then filled with `append`."""
        return self.add_message(
            "assistant",
            content,
            parent=self.current,
            reasoning=reasoning,
            tool_calls=tool_calls,
            stats=stats,
            tokens=tokens,
        )

    def add_tool(self, content: str) -> Message:
        """A tool's result after the current message (the answer that called it)."""
        return self.add_message("tool", content, parent=self.current)

    def append(self, message_id: str, content: str = "", reasoning: str = "") -> Message:
        """Add streamed text to a message (an answer being generated)."""
        message = self.get(message_id)
        message.content += content
        if reasoning:
            message.reasoning = (message.reasoning or "") + reasoning
        self.touch()
        return message

    def update(self, message_id: str, **changes: Any) -> Message:
        """Replace fields of a message (content, reasoning, tool_calls, stats, tokens) when it finishes."""
        message = self.get(message_id)
        allowed = {"content", "reasoning", "tool_calls", "stats", "tokens"}
        unknown = set(changes) - allowed
        if unknown:
            raise ConversationError(f"cannot change {', '.join(sorted(unknown))} of a message")
        for key, value in changes.items():
            setattr(message, key, value)
        self.touch()
        return message

    def select(self, message_id: str) -> Message:
        """Show the branch through this message: `current` becomes its most recently added leaf."""
        self.get(message_id)
        below = {message_id}
        newest = message_id
        for message in self.messages:  # creation order: a parent always comes before its children
            if message.parent in below:
                below.add(message.id)
                newest = message.id
        self.current = newest
        return self._by_id[newest]

    def switch_branch(self, message_id: str, step: int) -> Message:
        """Show the sibling `step` places away (-1 previous, +1 next, wrapping around)."""
        siblings = self.branch_siblings(message_id)
        index = [m.id for m in siblings].index(message_id)
        return self.select(siblings[(index + step) % len(siblings)].id)

    def regenerate(self) -> Message:
        """A new, empty answer beside the current one (or to the current user/tool message); it becomes current."""
        if self.current is None:
            raise ConversationError(f"conversation {self.id} has no message to answer")
        message = self._by_id[self.current]
        if message.role == "assistant":
            parent = message.parent
        elif message.role in ("user", "tool"):
            parent = message.id
        else:
            raise ConversationError(f"cannot regenerate after a {message.role} message")
        return self.add_message("assistant", parent=parent)

    def edit_user(self, message_id: str, text: str) -> Message:
        """The edited text as a new user message beside the old one; the new branch becomes current."""
        message = self.get(message_id)
        if message.role != "user":
            raise ConversationError(f"message {message_id!r} is a {message.role} message, not a user message")
        return self.add_message("user", text, parent=message.parent)

    def touch(self) -> None:
        self.updated = now_iso()

    def _new_message_id(self) -> str:
        number = len(self.messages) + 1
        while f"m{number}" in self._by_id:
            number += 1
        return f"m{number}"

    # --- plain data ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The conversation's fields as JSON data (the store adds the format marker and version)."""
        return {
            "id": self.id,
            "title": self.title,
            "created": self.created,
            "updated": self.updated,
            "model": self.model,
            "sampling": self.sampling,
            "system": self.system,
            "messages": [m.to_dict() for m in self.messages],
            "current": self.current,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        """Validates the schema; any problem is a ConversationFormatError with a one-line reason."""
        where = "conversation"
        conversation_id = _field(data, "id", str, where)
        for key in ("created", "updated"):
            stamp = _field(data, key, str, where)
            try:
                parse_iso(stamp)
            except ValueError:
                raise ConversationFormatError(f"{key!r} is not an ISO 8601 time: {stamp!r}") from None
        raw_messages = _field(data, "messages", list, where)
        messages = [Message.from_dict(m, f"messages[{i}]") for i, m in enumerate(raw_messages)]
        return cls(
            id=conversation_id,
            title=_field(data, "title", str, where),
            created=data["created"],
            updated=data["updated"],
            model=_field(data, "model", dict, where),
            sampling=_field(data, "sampling", dict, where),
            system=_field(data, "system", str, where),
            messages=messages,
            current=_field(data, "current", str, where, optional=True),
        )


def token_record(event: Any, *, forced: bool = False, end: bool = False) -> dict[str, Any]:
    """What a saved answer keeps of each generated token (from an engine TokenEvent), for inspection."""
    record = {
        "id": event.token_id,
        "text": event.text,
        "prob": event.prob,
        "policy_prob": event.policy_prob,
        "rank": event.rank,
        "entropy": round(event.entropy, 4),
        "policy_entropy": round(event.policy_entropy, 4),
        "seconds": round(event.seconds, 5),
        "top": [[t.token_id, t.text, t.logit, t.prob, t.policy_prob] for t in event.top],
    }
    if forced:
        record["forced"] = True  # picked by the user at a branch, not sampled
    if end:
        record["end"] = True  # the step that chose end-of-sequence: not part of the answer's text
    return record


def answer_stats(finished: Any) -> dict[str, Any]:
    """The per-answer numbers worth keeping (from an engine Finished event)."""
    return {
        "tokens": finished.generated_tokens,
        "prompt_tokens": finished.prompt_tokens,
        "reused_tokens": finished.reused_tokens,
        "ttft_s": round(finished.ttft_seconds, 4),
        "prefill_tok_s": round(finished.prefill_tokens_per_second, 2),
        "decode_tok_s": round(finished.decode_tokens_per_second, 2),
        "finish_reason": finished.reason,
        # the request's timeline: (tokens, seconds) per prefill chunk; decode steps are in the tokens
        "prefill_chunks": [[tokens, round(seconds, 5)] for tokens, seconds in finished.prefill_chunks],
    }
