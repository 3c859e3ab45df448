"""`llmchat chats ...`: list, show, search, export, rename and delete saved conversations.

"last" stands for the most recently updated conversation wherever an ID is asked for. The
conversation folder is `conversations/` in the data folder (LLMCHAT_DATA_DIR moves it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llmchat.chat.conversation import parse_iso
from llmchat.chat.store import ConversationStore, StoreError, Summary
from llmchat.chat.transcript import to_markdown, to_text


def _store() -> ConversationStore:
    return ConversationStore.default()


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False))


def _local_time(stamp: str) -> str:
    return parse_iso(stamp).astimezone().strftime("%Y-%m-%d %H:%M")


def _print_table(summaries: list[Summary]) -> None:
    if not summaries:
        return
    id_width = max(len(s.id) for s in summaries)
    model_width = min(max(len(s.model) for s in summaries), 32)
    print(f"{'ID':<{id_width}}  {'UPDATED':<16}  {'TURNS':>5}  {'MODEL':<{model_width}}  TITLE")
    for s in summaries:
        print(f"{s.id:<{id_width}}  {_local_time(s.updated):<16}  {s.turns:>5}  {s.model:<{model_width}}  {s.title}")


def cmd_list(args: argparse.Namespace) -> int:
    store = _store()
    listing = store.list()
    if args.json:
        _print_json(
            {
                "directory": str(store.directory),
                "conversations": [s.to_dict() for s in listing.conversations],
                "unreadable": [u.to_dict() for u in listing.unreadable],
            }
        )
        return 0
    if not listing.conversations and not listing.unreadable:
        print(f"no conversations in {store.directory}", file=sys.stderr)
    _print_table(listing.conversations)
    if listing.unreadable:
        print(f"\nunreadable files (left untouched, {len(listing.unreadable)}):")
        for item in listing.unreadable:
            print(f"  {item.path}: {item.reason}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    found = _store().search(args.text)
    if args.json:
        _print_json([s.to_dict() for s in found])
    elif found:
        _print_table(found)
    else:
        print(f"no conversation mentions {args.text!r}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    conversation = _store().load(args.id)
    if args.json:
        _print_json(
            {
                "id": conversation.id,
                "title": conversation.title,
                "model": conversation.model,
                "system": conversation.system,
                "system_changes": conversation.system_changes,  # where it was set: after which message
                "messages": [m.to_dict() for m in conversation.path()],
            }
        )
    else:
        sys.stdout.write(to_text(conversation))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = _store()
    text = store.raw_text(args.id) if args.format == "json" else to_markdown(store.load(args.id))
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out).expanduser()
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise StoreError("not deleting without confirmation: stdin is not a terminal (pass --yes)")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_delete(args: argparse.Namespace) -> int:
    store = _store()
    conversation = store.deletable(args.id)
    if not args.yes and not _confirm(f"delete conversation {conversation.id} ({conversation.title!r})?"):
        print("not deleted", file=sys.stderr)
        return 1
    store.delete(conversation.id)
    if args.json:
        _print_json({"deleted": conversation.id})
    else:
        print(f"deleted {conversation.id}", file=sys.stderr)
    return 0


def cmd_rename(args: argparse.Namespace) -> int:
    conversation = _store().rename(args.id, args.title)
    if args.json:
        _print_json({"id": conversation.id, "title": conversation.title})
    else:
        print(f"renamed {conversation.id} to {conversation.title!r}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    """Register `chats` and its subcommands on the main parser's subparsers."""
    chats = sub.add_parser("chats", help="saved conversations: list, show, search, export, rename, delete")
    commands = chats.add_subparsers(dest="chats_command", metavar="ACTION", required=True)
    id_help = 'conversation id, or "last" for the most recently updated one'

    p = commands.add_parser("list", help="saved conversations, newest first, and files that cannot be read")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("search", help="conversations whose title or messages contain a text (any case)")
    p.add_argument("text")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = commands.add_parser("show", help="print the current branch of a conversation")
    p.add_argument("id", help=id_help)
    p.add_argument("--json", action="store_true", help="the branch's messages as JSON")
    p.set_defaults(func=cmd_show)

    p = commands.add_parser("export", help="write a conversation as Markdown or as its JSON file")
    p.add_argument("id", help=id_help)
    p.add_argument("--format", choices=("md", "json"), default="md")
    p.add_argument("--out", default=None, help="file to write (default: standard output)")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("rename", help="give a conversation a new title")
    p.add_argument("id", help=id_help)
    p.add_argument("title")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rename)

    p = commands.add_parser("delete", help="delete a conversation (asks first unless --yes)")
    p.add_argument("id", help=id_help)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_delete)
