"""The command line: `llmchat` (the chat screen) and its headless subcommands, one module each.

`main` and `build_parser` live in parser.py; they are reached through these two functions so that
importing a command module (`llmchat.cli.chats`, which needs no torch) does not import them all.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The `llmchat` entry point: parse the arguments, run the command, exit status back."""
    from llmchat.cli.parser import main as run

    return run(argv)


def build_parser() -> argparse.ArgumentParser:
    from llmchat.cli.parser import build_parser as build

    return build()
