"""Conversations on disk: one JSON file each, written atomically, never clobbering what we cannot read.

A file we cannot read (corrupt, another program's, written by a newer llmchat) is listed with the
reason and left alone: saving over it, or deleting it, is refused, because it may be the only copy
of someone's chat and a newer llmchat may read it fine. Every field is checked against the schema
(schema.py) on every read, so a file that is listed as readable opens.

An answer that was streaming when the process died is in the file up to the last full save and in
its journal (journal.py) after that: reading a conversation replays a journal left behind, and the
next save folds it in and deletes it.
"""

from __future__ import annotations

import builtins
import json
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from llmchat.chat.conversation import CONVERSATION_ID, Conversation
from llmchat.chat.journal import AnswerJournal, journal_path, remove_leftover, replay
from llmchat.chat.schema import (
    CONVERSATION,
    HEADER,
    ConversationError,
    ConversationFormatError,
    parse_iso,
    validate_json,
)
from llmchat.engine.files import fsync_directory, replacing

FORMAT = "llmchat.conversation"
VERSION = 1
SEARCH_SEPARATOR = "\0"  # between messages in a search text: a typed search never contains it
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
class _Entry:
    """What the store keeps of one file it read: enough to list and search it without reading it again."""

    stamps: tuple[tuple[int, int] | None, tuple[int, int] | None]  # the file's and its journal's (mtime, size)
    item: Summary | Unreadable
    order: tuple[float, str] = (0.0, "")  # newest first
    text: str = ""  # title and every message, casefolded, for search


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


def _check_header(format_marker: Any, version: Any) -> None:
    if format_marker != FORMAT:
        raise ConversationFormatError(f"not an llmchat conversation (format is {format_marker!r})")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConversationFormatError(f"unknown version {version!r}")
    if version > VERSION:
        raise ConversationFormatError(f"written by a newer llmchat (version {version})")


def from_file_text(text: str | bytes) -> Conversation:
    """A file's text as a Conversation: marker and version, then the schema, then the tree's own rules.

    One pass parses and validates (pydantic, in Rust); only a file that fails it is read again for
    its marker and version, so that a newer or foreign file is reported as such, not as bad fields.
    """
    try:
        data = validate_json(CONVERSATION, text)
    except ConversationFormatError as problem:
        try:
            header = validate_json(HEADER, text)
        except ConversationFormatError:
            raise problem from None  # not JSON, or not an object: the schema's reason says so
        _check_header(header.get("format"), header.get("version"))
        raise
    _check_header(data.get("format"), data.get("version"))
    return Conversation.from_data(data)


def read_conversation(path: Path) -> Conversation:
    """One file as a Conversation, with a journal left beside it replayed; anything wrong is a
    ConversationFormatError with the reason alone."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConversationFormatError(f"cannot read: {exc.strerror or exc}") from None
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConversationFormatError(f"cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    conversation = from_file_text(text)
    if conversation.id != path.stem:
        raise ConversationFormatError(f"its id {conversation.id!r} does not match the file name")
    replay(conversation, journal_path(path))
    return conversation


class ConversationStore:
    """The conversation files in one folder (created on the first save)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        # (mtime, size) of files this store wrote or read whole: a save over one of them need not
        # read it again to know it is a conversation it may replace.
        self._known: dict[Path, tuple[int, int]] = {}
        # Each file's summary and search text, read again only when the file or its journal changes:
        # reading and checking 40 files of 29 MB takes 0.6 s (2 cores), which the chat's start and every
        # Ctrl+O paid on the UI thread; a listing that finds nothing changed takes 1 ms.
        self._catalog: dict[Path, _Entry] = {}
        self._catalog_lock = threading.Lock()  # the chat lists in a thread and on the UI thread

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

    def _entries(self) -> builtins.list[_Entry]:
        """Every file's entry, newest first (unreadable ones last); only new or changed files are read."""
        files = self._files()
        with self._catalog_lock:
            for path in set(self._catalog) - set(files):
                del self._catalog[path]
            for path in files:
                stamps = (_stamp(path), _stamp(journal_path(path)))
                entry = self._catalog.get(path)
                if entry is None or entry.stamps != stamps:
                    self._catalog[path] = self._read_entry(path, stamps)
            entries = [self._catalog[path] for path in files]
        return sorted(entries, key=lambda e: (isinstance(e.item, Unreadable), e.order))

    def _read_entry(self, path: Path, stamps: tuple[tuple[int, int] | None, tuple[int, int] | None]) -> _Entry:
        try:
            conversation = read_conversation(path)
        except ConversationFormatError as exc:
            return _Entry(stamps, Unreadable(path, str(exc)))
        self._remember(path, stamps[0])
        text = SEARCH_SEPARATOR.join([conversation.title, *(m.content for m in conversation.messages)]).casefold()
        return _Entry(stamps, self._summary(conversation), _newest_first(conversation), text)

    def list(self) -> Listing:
        """Summaries of the readable conversations, newest first, and the unreadable files with reasons."""
        entries = self._entries()
        readable = [e.item for e in entries if isinstance(e.item, Summary)]
        return Listing(readable, [e.item for e in entries if isinstance(e.item, Unreadable)])

    def search_texts(self) -> dict[str, str]:
        """Each readable conversation's title and messages (every branch), casefolded, by id."""
        return {e.item.id: e.text for e in self._entries() if isinstance(e.item, Summary)}

    def search(self, text: str) -> builtins.list[Summary]:  # `list` here is the method
        """Conversations whose title or any message (on any branch) contains `text`, ignoring case."""
        needle = text.casefold()
        return [e.item for e in self._entries() if isinstance(e.item, Summary) and needle in e.text]

    def last(self) -> Conversation | None:
        """The most recently updated readable conversation, if any."""
        newest = next((e.item for e in self._entries() if isinstance(e.item, Summary)), None)
        return self.load(newest.id) if newest is not None else None

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
        stamp = _stamp(path)
        try:
            conversation = read_conversation(path)
        except ConversationFormatError as exc:
            raise StoreError(f"{path}: {exc}") from None
        self._remember(path, stamp)
        return conversation

    def raw_text(self, conversation_id: str) -> str:
        """The file exactly as stored (after checking it is a readable conversation); with a journal
        left beside it, the file as the next save will write it, the journal folded in."""
        conversation = self.load(conversation_id)
        path = self.path_for(conversation.id)
        if journal_path(path).exists():
            return json.dumps(to_file_data(conversation), ensure_ascii=False) + "\n"
        return path.read_text(encoding="utf-8")

    # --- writing -------------------------------------------------------------------------------

    def save(self, conversation: Conversation) -> Path:
        """Write atomically (files.replacing: a private temp file beside it, fsynced, renamed over it)."""
        path = self.path_for(conversation.id)
        self._refuse_if_unreadable(path, "overwrite")
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            with replacing(path, private=True) as temp, temp.open("w", encoding="utf-8") as handle:
                json.dump(to_file_data(conversation), handle, ensure_ascii=False)  # one line: token records are bulky
                handle.write("\n")
        except (TypeError, ValueError, OSError) as exc:
            raise StoreError(f"cannot save {path}: {exc}") from exc
        self._remember(path, _stamp(path))
        remove_leftover(journal_path(path))  # the file holds all of it now (a live journal is kept)
        return path

    def start_journal(self, conversation: Conversation, message_id: str) -> AnswerJournal | None:
        """A journal for an answer about to stream, beside the file this store just saved with it
        (so a crash leaves the answer marked interrupted); None when that file is not its save
        (the save failed: a journal would have nothing to be replayed into)."""
        file = self.path_for(conversation.id)
        stamp = _stamp(file)
        if stamp is None or self._known.get(file) != stamp:
            return None
        path = journal_path(file)
        try:
            return AnswerJournal(path, conversation.id, conversation.get(message_id))
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None

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
        journal_path(path).unlink(missing_ok=True)
        self._known.pop(path, None)
        fsync_directory(self.directory)
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
        stamp = _stamp(path)
        if stamp is None or self._known.get(path) == stamp:
            return
        try:
            read_conversation(path)
        except ConversationFormatError as exc:
            raise StoreError(
                f"will not {action} {path}: the file there cannot be read ({exc}); move it away first"
            ) from None
        self._remember(path, stamp)

    def _remember(self, path: Path, stamp: tuple[int, int] | None) -> None:
        """`path` was read or written whole as it was at `stamp` (taken before reading)."""
        if stamp is not None:
            self._known[path] = stamp

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


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


def _newest_first(conversation: Conversation) -> tuple[float, str]:
    updated: datetime = parse_iso(conversation.updated)
    return (-updated.timestamp(), conversation.id)
