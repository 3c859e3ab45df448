"""`llmchat` and its subcommands: the parser (one module per command adds its own) and the entry point.

Every subcommand takes `--json` so it can be scripted and tested. Errors caused by input print one
line (`llmchat: error: ...`) and exit with code 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from llmchat.cli import bench, info, inspect, models, perplexity, run, serve, template, tokenize
from llmchat.cli.args import EXIT_USAGE, Parser, add_engine_options
from llmchat.cli.chat import cmd_chat
from llmchat.cli.common import add_sampling_options, add_server_options
from llmchat.engine.errors import LLMChatError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmchat", description="Chat with local LLMs and watch inference happen.")
    parser.add_argument(
        "--model", dest="chat_model", metavar="MODEL", default=None, help="model for the chat screen (name or path)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="ID",
        help="reopen a saved conversation (default: last)",
    )
    parser.add_argument(
        "--raw",
        dest="chat_raw",
        action="store_true",
        help="completion mode: the transcript is one plain text the model continues, no chat template "
        "(the default for a base model; Alt+M switches)",
    )
    chat = parser.add_argument_group("chat screen sampling (change them live with the keys)")
    add_sampling_options(chat, dest_prefix="chat_")
    add_engine_options(parser.add_argument_group("chat screen engine"), dest_prefix="chat_")
    remote = parser.add_argument_group("chat with a model on a server (--model then names the server's model)")
    add_server_options(remote, dest_prefix="chat_")
    parser.set_defaults(func=cmd_chat)  # bare `llmchat` opens the chat
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (run, inspect, tokenize, template, bench, perplexity, info, models, serve):
        command.add_parser(sub)
    from llmchat.cli import chats  # stdlib only: `chats` needs no torch

    chats.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad argument (one line said already, code 2), or --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func  # bare `llmchat` gets cmd_chat
    try:
        return func(args)
    except LLMChatError as exc:
        print(f"llmchat: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", EXIT_USAGE)  # 1 for a chat that crashed (tui.app.ChatCrashed)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
