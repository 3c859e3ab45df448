"""Conversations on disk: one JSON file each, written atomically, never clobbering what we cannot read.

A file we cannot read (corrupt, another program's, written by a newer llmchat) is listed with the
reason and left alone: saving over it, or deleting it, is refused, because it may be the only copy
of someone's chat and a newer llmchat may read it fine.
"""

from __future__ import annotations

import builtins
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from llmchat.chat.conversation import (
    CONVERSATION_ID,
    Conversation,
    ConversationError,
    ConversationFormatError,
    parse_iso,
)

FORMAT = "llmchat.conversation"
VERSION = 1
LAST = "last"  # stands for the most recently updated conversation wherever an id is expected


class StoreError(ConversationError):
    """A conversation file that is missing, unreadable, or that may not be written."""


@dataclass(frozen=True)
class Summary:
    """What a conversation list shows, without keeping the messages around."""

    id: str
    title: str
    model: str
    updated: str
    turns: int
    path: Path

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "model": self.model, "updated": self.updated, "turns": self.turns}


@dataclass(frozen=True)
class Unreadable:
    """A file in the folder that is not a conversation we can read, and why."""

    path: Path
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": str(self.path), "reason": self.reason}


@dataclass(frozen=True)
class Listing:
    conversations: list[Summary]  # newest first
    unreadable: list[Unreadable]


def default_directory() -> Path:
    """`conversations/` in the user data folder (LLMCHAT_DATA_DIR moves it)."""
    from llmchat.paths import data_dir

    return data_dir() / "conversations"


def to_file_data(conversation: Conversation) -> dict[str, Any]:
    """The whole file: format marker and version first, then the conversation."""
    return {"format": FORMAT, "version": VERSION, **conversation.to_dict()}


def from_file_data(data: Any) -> Conversation:
    """Checks the marker and version, then the schema; problems raise ConversationFormatError."""
    if not isinstance(data, dict):
        raise ConversationFormatError("not a JSON object")
    if data.get("format") != FORMAT:
        raise ConversationFormatError(f"not an llmchat conversation (format is {data.get('format')!r})")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConversationFormatError(f"unknown version {version!r}")
    if version > VERSION:
        raise ConversationFormatError(f"written by a newer llmchat (version {version})")
    return Conversation.from_dict(data)


def read_conversation(path: Path) -> Conversation:
    """One file as a Conversation; anything wrong is a ConversationFormatError with the reason alone."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversationFormatError(f"cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConversationFormatError(f"not valid JSON: {exc}") from None
    conversation = from_file_data(data)
    if conversation.id != path.stem:
        raise ConversationFormatError(f"its id {conversation.id!r} does not match the file name")
    return conversation


class ConversationStore:
    """The conversation files in one folder (created on the first save)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    @classmethod
    def default(cls) -> ConversationStore:
        return cls(default_directory())

    def path_for(self, conversation_id: str) -> Path:
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise StoreError(f"{conversation_id!r} is not a conversation id")
        return self.directory / f"{conversation_id}.json"

    # --- reading -------------------------------------------------------------------------------

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.json") if not p.name.startswith(".") and p.is_file())

    def _scan(self) -> Iterator[Conversation | Unreadable]:
        for path in self._files():
            try:
                yield read_conversation(path)
            except ConversationFormatError as exc:
                yield Unreadable(path, str(exc))

    def _readable(self) -> list[Conversation]:
        conversations = [c for c in self._scan() if isinstance(c, Conversation)]
        return sorted(conversations, key=_newest_first)

    def list(self) -> Listing:
        """Summaries of the readable conversations, newest first, and the unreadable files with reasons."""
        items = list(self._scan())
        readable = sorted((c for c in items if isinstance(c, Conversation)), key=_newest_first)
        unreadable = [u for u in items if isinstance(u, Unreadable)]
        return Listing([self._summary(c) for c in readable], unreadable)

    def search(self, text: str) -> builtins.list[Summary]:  # `list` here is the method
        """Conversations whose title or any message (on any branch) contains `text`, ignoring case."""
        needle = text.casefold()
        return [
            self._summary(c)
            for c in self._readable()
            if needle in c.title.casefold() or any(needle in m.content.casefold() for m in c.messages)
        ]

    def last(self) -> Conversation | None:
        """The most recently updated readable conversation, if any."""
        readable = self._readable()
        return readable[0] if readable else None

    def resolve(self, conversation_id: str) -> str:
        """The id itself, or for "last" the id of the most recently updated conversation."""
        if conversation_id != LAST:
            return conversation_id
        last = self.last()
        if last is None:
            raise StoreError(f"no conversations in {self.directory}")
        return last.id

    def load(self, conversation_id: str) -> Conversation:
        """The conversation with this id (or "last"); a missing or unreadable file is a StoreError."""
        path = self.path_for(self.resolve(conversation_id))
        if not path.is_file():
            raise StoreError(f"no conversation {conversation_id!r} in {self.directory}")
        try:
            return read_conversation(path)
        except ConversationFormatError as exc:
            raise StoreError(f"{path}: {exc}") from None

    def raw_text(self, conversation_id: str) -> str:
        """The file exactly as stored (after checking it is a readable conversation)."""
        conversation = self.load(conversation_id)
        return self.path_for(conversation.id).read_text(encoding="utf-8")

    # --- writing -------------------------------------------------------------------------------

    def save(self, conversation: Conversation) -> Path:
        """Write atomically: a temp file in the same folder, fsynced, renamed over the old file."""
        path = self.path_for(conversation.id)
        self._refuse_if_unreadable(path, "overwrite")
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=self.directory, prefix=f".{conversation.id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(to_file_data(conversation), handle, ensure_ascii=False)  # one line: token records are bulky
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, path)
        except BaseException as exc:
            Path(temp_name).unlink(missing_ok=True)
            if isinstance(exc, (TypeError, ValueError, OSError)):
                raise StoreError(f"cannot save {path}: {exc}") from exc
            raise
        _fsync_directory(self.directory)
        return path

    def deletable(self, conversation_id: str) -> Conversation:
        """The conversation a delete would remove (to confirm with the user); refuses unreadable files."""
        path = self.path_for(self.resolve(conversation_id))
        if not path.is_file():
            raise StoreError(f"no conversation {conversation_id!r} in {self.directory}")
        self._refuse_if_unreadable(path, "delete")
        return read_conversation(path)

    def delete(self, conversation_id: str) -> Conversation:
        """Remove a conversation file; refuses for a file it cannot read. Returns what was deleted."""
        conversation = self.deletable(conversation_id)
        path = self.path_for(conversation.id)
        try:
            path.unlink()
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc.strerror or exc}") from None
        _fsync_directory(self.directory)
        return conversation

    def rename(self, conversation_id: str, title: str) -> Conversation:
        """Give a conversation a new title. `updated` stays: the list order follows chatting, not naming."""
        new_title = " ".join(title.split())
        if not new_title:
            raise StoreError("the new title is empty")
        conversation = self.load(conversation_id)
        conversation.title = new_title
        self.save(conversation)
        return conversation

    def _refuse_if_unreadable(self, path: Path, action: str) -> None:
        if not path.exists():
            return
        try:
            read_conversation(path)
        except ConversationFormatError as exc:
            raise StoreError(
                f"will not {action} {path}: the file there cannot be read ({exc}); move it away first"
            ) from None

    def _summary(self, conversation: Conversation) -> Summary:
        name = conversation.model.get("name")
        return Summary(
            id=conversation.id,
            title=conversation.title,
            model=name if isinstance(name, str) else "",
            updated=conversation.updated,
            turns=conversation.turns,
            path=self.path_for(conversation.id),
        )


def _newest_first(conversation: Conversation) -> tuple[float, str]:
    updated: datetime = parse_iso(conversation.updated)
    return (-updated.timestamp(), conversation.id)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; Windows has no directory handles to fsync)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
