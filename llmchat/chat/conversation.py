"""A conversation as a tree of messages.

Editing a user message or regenerating an answer never overwrites anything: it adds a sibling
branch under the same parent, so every earlier version stays reachable. `current` names the leaf
of the branch on screen; `path()` walks from the root down to it, and that path is what the model
sees. No torch here: the UI and the headless commands load this without it. What a saved
conversation may hold is declared in schema.py; the records saved with an answer are made here.
"""

from __future__ import annotations

import secrets
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, get_args

from llmchat.chat.schema import (
    CONVERSATION,
    CONVERSATION_ID,
    AnswerStats,
    ConversationData,
    ConversationError,
    ConversationFormatError,
    MessageData,
    Mode,
    Role,
    SystemChange,
    TokenRecord,
    parse_iso,
    validate_python,
)

__all__ = [
    "CONVERSATION_ID",
    "INTERRUPTED",
    "Conversation",
    "ConversationError",
    "ConversationFormatError",
    "Message",
    "answer_stats",
    "interrupted_stats",
    "parse_iso",
    "token_record",
]

ROLES: tuple[str, ...] = get_args(Role)
CONVERSATION_MODES: tuple[str, ...] = get_args(Mode)
TITLE_LIMIT = 60
# The finish reason of an answer that never finished: the chat closed, crashed or was killed while
# it streamed. Its text is what had streamed by then (saved from the answer's journal).
INTERRUPTED = "interrupted"


def now_iso() -> str:
    """The current time as ISO 8601 UTC with milliseconds (so quick successive saves still sort)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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
    stats: AnswerStats | None = None
    tokens: list[TokenRecord] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; optional fields appear only when set."""
        data: dict[str, Any] = {"id": self.id, "parent": self.parent, "role": self.role, "content": self.content}
        for key in ("reasoning", "tool_calls", "stats", "tokens"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        return data

    @property
    def empty(self) -> bool:
        """Nothing came of it: no text, reasoning or tool call (an answer interrupted before its first token)."""
        return not (self.content or self.reasoning or self.tool_calls)

    @classmethod
    def from_data(cls, data: MessageData) -> Message:
        """A message from schema-checked data (the schema's fixed-size arrays arrive as tuples)."""
        stats, tokens = data.get("stats"), data.get("tokens")
        if stats is not None and "prefill_chunks" in stats:
            stats["prefill_chunks"] = [list(chunk) for chunk in stats["prefill_chunks"]]  # type: ignore[misc]
        return cls(
            id=data["id"],
            parent=data["parent"],
            role=data["role"],
            content=data["content"],
            reasoning=data.get("reasoning"),
            tool_calls=data.get("tool_calls"),
            stats=stats,
            tokens=plain_records(tokens) if tokens is not None else None,
        )


def plain_records(records: list[TokenRecord]) -> list[TokenRecord]:
    """Checked token records as the app makes them: the schema gives fixed-size arrays as tuples."""
    for record in records:
        record["top"] = [list(entry) for entry in record["top"]]  # type: ignore[misc]
    return records


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
    # Where the system prompt was set or changed, oldest first (see set_system); empty for a file
    # from before they were kept, whose prompt counts as set at the start.
    system_changes: list[SystemChange] = field(default_factory=list)
    # How the model sees the branch: "chat" (its chat template) or "completion" (one plain text it
    # continues; a base model has no template). The same names as engine.prompt.PROMPT_MODES.
    mode: str = "chat"

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
        for change in self.system_changes:
            if change["after"] is not None and change["after"] not in self._by_id:
                raise ConversationFormatError(f"a system prompt change follows {change['after']!r}, not a message")

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
        message, for prompting the model to write it (a regenerated answer). An answer with no text
        and no tool call (interrupted before its first token, or failed) is left out: the model must
        never be shown an empty turn as its own. The user turns on either side of it become one, so
        the roles still alternate (Gemma's and Mistral's templates refuse two user turns in a row).
        """
        result: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        joiner = "" if self.mode == "completion" else "\n\n"  # completion: the transcript as it was typed
        for message in self.path():
            if message.id == before:
                break
            if message.role == "assistant" and not message.content and not message.tool_calls:
                continue
            if message.role == "user" and result and result[-1]["role"] == "user":
                result[-1] = {"role": "user", "content": result[-1]["content"] + joiner + message.content}
                continue
            entry: dict[str, Any] = {"role": message.role, "content": message.content}
            if message.tool_calls:
                entry["tool_calls"] = message.tool_calls
            result.append(entry)
        return result

    def system_prompts(self) -> list[tuple[int, str]]:
        """Where the system prompt took effect on the current branch: (index in `path()`, text), in order.

        A change applies from the first message created after it; one made after the branch's last
        message has index len(path()). A file without its changes (or whose last change is not the
        current prompt: edited by hand) has only its prompt, at 0. An empty text is a removal.
        """
        changes = self.system_changes
        if not changes or changes[-1]["text"] != self.system:
            return [(0, self.system)] if self.system else []
        order = {m.id: i for i, m in enumerate(self.messages)}  # creation order
        path = self.path()
        latest: dict[int, str] = {}  # index in the path → the text in force when that message came
        for change in changes:
            after = -1 if change["after"] is None else order[change["after"]]
            index = next((i for i, m in enumerate(path) if order[m.id] > after), len(path))
            latest[index] = change["text"]
        result: list[tuple[int, str]] = []
        in_force = ""
        for index in sorted(latest):
            if latest[index] != in_force:
                result.append((index, latest[index]))
                in_force = latest[index]
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
        """A new, empty answer beside the current one (or to the current user/tool message); it becomes current.

        An answer with nothing in it that did not run its course (interrupted or stopped before its
        first token, or failed) is reused instead: beside the new one it would be an empty branch
        ‹1/2› with nothing to go back to. (An empty answer the model ended itself is a result: it stays.)
        """
        if self.current is None:
            raise ConversationError(f"conversation {self.id} has no message to answer")
        message = self._by_id[self.current]
        unfinished = message.stats is None or message.stats.get("finish_reason") in (INTERRUPTED, "cancelled", "error")
        if message.role == "assistant" and message.empty and unfinished and not self.children(message.id):
            message.stats = message.tokens = None
            self.touch()
            return message
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

    def set_system(self, text: str) -> None:
        """Change the system prompt from the next message on, and remember where (the export shows it there)."""
        if text == self.system:
            return
        after = self.messages[-1].id if self.messages else None  # the newest message, on whatever branch
        changes = self.system_changes
        if not changes and self.system:  # set before changes were kept: as far as we know, from the start
            changes.append({"after": None, "text": self.system})
        if changes and changes[-1]["after"] == after:
            changes.pop()  # changed again before any message: the earlier text never applied
        if text != (changes[-1]["text"] if changes else ""):
            changes.append({"after": after, "text": text})
        self.system = text
        self.touch()

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
        data: dict[str, Any] = {
            "id": self.id,
            "title": self.title,
            "created": self.created,
            "updated": self.updated,
            "model": self.model,
            "sampling": self.sampling,
            "system": self.system,
            "messages": [m.to_dict() for m in self.messages],
            "current": self.current,
            "mode": self.mode,
        }
        if self.system_changes:
            data["system_changes"] = self.system_changes
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Conversation:
        """Validates the schema; any problem is a ConversationFormatError with a one-line reason."""
        return cls.from_data(validate_python(CONVERSATION, data))

    @classmethod
    def from_data(cls, data: ConversationData) -> Conversation:
        """A conversation from schema-checked data; the tree's own rules (parents before children,
        unique ids, `current` a message) are checked as it is built."""
        return cls(
            id=data["id"],
            title=data["title"],
            created=data["created"],
            updated=data["updated"],
            model=dict(data["model"]),
            sampling=dict(data["sampling"]),
            system=data["system"],
            messages=[Message.from_data(m) for m in data["messages"]],
            current=data["current"],
            mode=data.get("mode", "chat"),  # files written before modes existed are chats
            system_changes=list(data.get("system_changes", [])),
        )


def _float32(values: list[float]) -> list[float]:
    """Float32 numbers (logits, probabilities) in 8 significant digits, 9 where 8 do not read back.

    The engine's logits and probabilities are float32; as doubles they print with 17 digits
    (0.8323073983192444), while 8 give the same float32 for all but about 1 in 100 (Python prints a
    double's shortest form: 0.83230740 comes out as 0.8323074). A saved answer's token records are
    a third smaller for it, and lose nothing. The float32 rounding of the whole list is done by
    `array` in C: this runs for every streamed token (about 35 µs for one with its top-8).
    """
    targets = array("f", values)
    short = [f"{value:.8g}" for value in values]
    check = array("f", map(float, short))
    return [
        float(text) if back == target else float(f"{value:.9g}")
        for text, back, target, value in zip(short, check, targets, values)
    ]


def token_record(event: Any, *, forced: bool = False, end: bool = False) -> TokenRecord:
    """What a saved answer keeps of each generated token (from an engine TokenEvent), for inspection.

    The one place a record is made; schema.TokenRecord says what one holds, the token view reads it.
    """
    numbers = [event.prob, event.policy_prob]
    for candidate in event.top:
        numbers += (candidate.logit, candidate.prob, candidate.policy_prob)
    numbers = _float32(numbers)
    probabilities = numbers[:2] + numbers[3::3] + numbers[4::3]
    if not all(0.0 <= p <= 1.0 for p in probabilities):  # a NaN or a rounding past 1: the schema refuses those
        numbers = [n if i > 1 and i % 3 == 2 else min(n, 1.0) if n > 0.0 else 0.0 for i, n in enumerate(numbers)]
    record: TokenRecord = {
        "id": event.token_id,
        "text": event.text,
        "prob": numbers[0],
        "policy_prob": numbers[1],
        "rank": event.rank,
        "entropy": round(event.entropy, 4),
        "policy_entropy": round(event.policy_entropy, 4),
        "seconds": max(round(event.seconds, 5), 0.0),
        "top": [
            [t.token_id, t.text, *numbers[i : i + 3]]  # type: ignore[list-item]
            for t, i in zip(event.top, range(2, len(numbers), 3))
        ],
    }
    if event.policy_prob != event.policy_prob:  # NaN: a server that does not say what its sampler made of it
        del record["policy_prob"]  # absent, read back as unknown (not as "cut", which 0 would say)
        record["top"] = [entry[:4] for entry in record["top"]]
    if forced:
        record["forced"] = True  # picked by the user at a branch, not sampled
    if end:
        record["end"] = True  # the step that chose end-of-sequence: not part of the answer's text
    return record


def answer_stats(finished: Any) -> AnswerStats:
    """The per-answer numbers worth keeping (from an engine Finished event), and why it was cut off."""
    stats: AnswerStats = {
        "tokens": finished.generated_tokens,
        "prompt_tokens": finished.prompt_tokens,
        "reused_tokens": finished.reused_tokens,
        "ttft_s": round(finished.ttft_seconds, 4),
        "prefill_tok_s": round(finished.prefill_tokens_per_second, 2),
        "decode_tok_s": round(finished.decode_tokens_per_second, 2),
        "finish_reason": finished.reason,
        # the request's timeline: (tokens, seconds) per prefill chunk; decode steps are in the tokens
        "prefill_chunks": [[tokens, round(seconds, 5)] for tokens, seconds in finished.prefill_chunks],  # type: ignore[list-item]
    }
    if finished.reason == "error" and finished.error:
        stats["error"] = finished.error
    return stats


def interrupted_stats(records: list[TokenRecord] | None) -> AnswerStats:
    """The stats of an answer that never finished: how many tokens it got, and that it was interrupted."""
    return {"tokens": sum(1 for r in records or () if not r.get("end")), "finish_reason": INTERRUPTED}
