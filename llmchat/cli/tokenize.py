"""`llmchat tokenize`: the token ids of a text (only the model's tokenizer is read)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from llmchat.cli.common import CLIError, print_json, shown
from llmchat.models import resolve_model


def cmd_tokenize(args: argparse.Namespace) -> int:
    from llmchat.engine.package import open_tokenizer

    if (args.text is None) == (args.file is None):
        raise CLIError("give the text either as an argument or with --file (one of them)")
    text = args.text
    if args.file is not None:  # the exact bytes: no newline translation, "\r\n" stays two characters
        try:
            text = Path(args.file).expanduser().read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise CLIError(f"no such file: {args.file}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CLIError(f"cannot read {args.file}: {exc}") from None
    tokenizer = open_tokenizer(resolve_model(args.model))
    ids = tokenizer.encode(text, add_special_tokens=args.special)
    pieces = tokenizer.token_texts(ids)  # the vocabulary's own spelling: 'Ġworld', '▁world', '<0xE4>'
    texts = [tokenizer.token_text(i) for i in ids]  # what each token reads as: ' world'
    if args.json:
        print_json({"ids": ids, "texts": texts, "tokens": pieces})
    else:
        for i, (token_id, readable, piece) in enumerate(zip(ids, texts, pieces)):
            print(f"{i:6d}  {token_id:8d}  {shown(readable)}" + (f"  {shown(piece)}" if args.raw_pieces else ""))
        print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tokenize", help="show the token ids of a text")
    p.add_argument("model", help="model folder or .gguf file (only the tokenizer is read)")
    p.add_argument("text", nargs="?", default=None)
    p.add_argument("--file", default=None, metavar="INPUT", help="read the text from a file (exact UTF-8 bytes)")
    p.add_argument("--special", action="store_true", help="add the special tokens the tokenizer adds (BOS...)")
    p.add_argument(
        "--raw-pieces",
        action="store_true",
        help="also show each token's vocabulary piece as stored ('Ġworld', '▁world', '<0xE4>')",
    )
    p.add_argument("--json", action="store_true", help='{"ids", "texts" (readable), "tokens" (vocabulary pieces)}')
    p.set_defaults(func=cmd_tokenize)
