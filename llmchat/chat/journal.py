"""A streaming answer's journal: what streamed since the last save, appended to a small file beside
the conversation, so that a crash, a closed terminal or `kill -9` in the middle of an answer keeps it.

A full save rewrites the whole conversation file (every token's top-k is in it: half a megabyte for
a 2,000-token answer), too much to repeat every frame. While an answer streams, each frame's new
text and token records go to `.ID.journal` instead, as one JSON line: one write per frame (at most
ten a second), an fsync every few seconds. The next full save of the conversation folds the journal
in (the conversation in memory holds everything) and deletes it. A journal left behind by a process
that died is replayed when the conversation is read, into the answer it names, and that answer is
marked interrupted.

The lines: a header `{"journal": "llmchat.answer-journal", "version": 1, "conversation": ID,
"message": MESSAGE}`, then per frame `{"at": [chars of content, chars of reasoning, tokens],
"content": …, "reasoning": …, "tokens": […]}`. `at` gives the answer's lengths before the frame, so
a frame the file already holds adds nothing twice, and one that does not follow on is not applied.
A torn last line (the process killed mid-write) is dropped.

While it writes, the journal's owner holds an advisory lock on it (POSIX `flock`): a reader that
finds it locked knows the answer is still streaming in another llmchat, so neither marks it
interrupted nor deletes it. (Without `fcntl`, on Windows, every journal counts as left behind.)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from llmchat.chat.conversation import Conversation, Message, interrupted_stats, plain_records
from llmchat.chat.schema import (
    JOURNAL_ENTRY,
    JOURNAL_HEADER,
    ConversationError,
    ConversationFormatError,
    JournalEntry,
    TokenRecord,
    parse_iso,
    validate_json,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

FORMAT = "llmchat.answer-journal"
VERSION = 1
# Each frame reaches the operating system at once (a killed process loses nothing written); an
# fsync, which a power cut needs, is a few milliseconds, so it is done every SYNC_SECONDS at most.
SYNC_SECONDS = 2.0


def journal_path(conversation_file: Path) -> Path:
    """`.ID.journal` beside `ID.json` (hidden, and not a *.json file: listings skip it)."""
    return conversation_file.with_name(f".{conversation_file.stem}.journal")


class AnswerJournal:
    """Appends the frames of one streaming answer; the app feeds it, the next save makes it redundant."""

    def __init__(self, path: Path, conversation_id: str, message: Message) -> None:
        self.path = path
        self.message_id = message.id
        self._conversation_id = conversation_id
        # Not truncated before the lock is ours: the journal may be another llmchat's, streaming.
        self._handle: IO[str] | None = path.open("a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._handle.close()
                raise
        self._at = [0, 0, 0]
        self._synced = time.monotonic()
        self.rebase(message)  # a stale journal is replaced
        self.sync()  # the header is durable: even an answer killed before its first token is marked

    def add(self, content: str = "", reasoning: str = "", tokens: Sequence[TokenRecord] = ()) -> None:
        """One frame's new text and token records (nothing is written for an empty frame)."""
        if self._handle is None or not (content or reasoning or tokens):
            return
        entry: dict[str, Any] = {"at": list(self._at)}
        if content:
            entry["content"] = content
        if reasoning:
            entry["reasoning"] = reasoning
        if tokens:
            entry["tokens"] = list(tokens)
        self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.flush()
        self._at[0] += len(content)
        self._at[1] += len(reasoning)
        self._at[2] += len(tokens)
        if time.monotonic() - self._synced >= SYNC_SECONDS:
            self.sync()

    def rebase(self, message: Message) -> None:
        """Start over from the answer as it is now (just saved whole): the journal holds only what follows."""
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        header = {"journal": FORMAT, "version": VERSION, "conversation": self._conversation_id, "message": message.id}
        self._handle.write(json.dumps(header) + "\n")
        self._handle.flush()
        self._at = [len(message.content), len(message.reasoning or ""), len(message.tokens or ())]

    def sync(self) -> None:
        """Make what was written durable (flushed to disk, not only to the operating system)."""
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        self._synced = time.monotonic()

    def discard(self) -> None:
        """The answer is in the saved file: stop writing and delete the journal."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: no reader takes it for a leftover
        except OSError:  # Windows deletes no open file
            handle.close()
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
        handle.close()


def replay(conversation: Conversation, path: Path) -> Message | None:
    """Apply the journal at `path`, if any, to the answer it names; returns that answer.

    A journal of another conversation, of a message it does not have, or of an answer that
    finished (its stats are saved) is left aside. Unless the journal is still being written (by a
    running llmchat), the answer is marked interrupted.
    """
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    lines = raw.split(b"\n")[:-1]  # what follows the last newline is a torn line, or nothing
    if not lines:
        return None
    try:
        header = validate_json(JOURNAL_HEADER, lines[0])
    except ConversationFormatError:
        return None
    if header["conversation"] != conversation.id:
        return None
    try:
        message = conversation.get(header["message"])
    except ConversationError:
        return None
    if message.role != "assistant" or message.stats is not None:
        return None
    for line in lines[1:]:
        try:
            entry = validate_json(JOURNAL_ENTRY, line)
        except ConversationFormatError:
            break
        if not _apply(message, entry):
            break
    if not held_elsewhere(path):
        message.stats = interrupted_stats(message.tokens)
    with contextlib.suppress(OSError):  # the chat went on after the last save: lists sort by the journal
        written = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="milliseconds")
        if parse_iso(written) > parse_iso(conversation.updated):
            conversation.updated = written
    return message


def _apply(message: Message, entry: JournalEntry) -> bool:
    """Add one frame to the answer; False when it does not follow on from what the answer holds."""
    at_content, at_reasoning, at_tokens = entry["at"]
    content = _follow(message.content, at_content, entry.get("content", ""))
    reasoning = _follow(message.reasoning or "", at_reasoning, entry.get("reasoning", ""))
    tokens = _follow(message.tokens or [], at_tokens, plain_records(entry.get("tokens", [])))
    if content is None or reasoning is None or tokens is None:
        return False
    message.content = content
    message.reasoning = reasoning or message.reasoning
    message.tokens = tokens or message.tokens
    return True


def _follow(held: Any, at: int, added: Any) -> Any:
    """`held` with the part of `added` (which starts at `at`) that it lacks; None for a gap."""
    if at > len(held):
        return None
    return held + added[len(held) - at :] if at + len(added) > len(held) else held


def held_elsewhere(path: Path) -> bool:
    """True while another open journal (a streaming answer, in this llmchat or another) holds the lock."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def remove_leftover(path: Path) -> None:
    """Delete a journal nobody writes any more (its answer was just saved whole). Best effort: one
    that stays is replayed to no effect (its frames are in the file), and goes with the next save."""
    if path.exists() and not held_elsewhere(path):
        with contextlib.suppress(OSError):  # Windows: an open file cannot be deleted
            path.unlink()
