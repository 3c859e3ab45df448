"""`llmchat models list|add|remove|default|pull`: the registry of models."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from llmchat.cli.common import CLIError
from llmchat.models import (
    DEMO_NAME,
    ModelEntry,
    add_model,
    add_remote_model,
    ensure_demo,
    list_models,
    load_registry,
    pull_hf,
    remove_model,
    set_default,
)

MiB = 1024**2


def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "?"
    return f"{size_bytes / MiB / 1024:.2f} GiB" if size_bytes >= 1024 * MiB else f"{size_bytes / MiB:.1f} MiB"


def _print_table(entries: list[ModelEntry]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # pipes and files get whole lines, not an 80-column wrap
        console = Console(width=10_000)
    table = Table("", "name", "type", "arch", "format", "quant", "size", "path", box=None, caption="* = default")
    for e in entries:
        problem = f"  [red]({e.problem})[/red]" if e.problem else ""
        table.add_row(
            "*" if e.default else "",
            e.name,
            e.type or "?",
            e.architecture or "?",
            e.format,
            e.quantization or "?",
            _size(e.size_bytes),
            str(e.path) + problem,
        )
    console.print(table)


def cmd_models_list(args: argparse.Namespace) -> int:
    entries = list_models()
    if args.json:
        print(json.dumps([asdict(e) | {"path": str(e.path)} for e in entries], ensure_ascii=False))
    elif not entries:
        print("no models yet: `llmchat models pull demo`, `llmchat models add PATH` or `llmchat models pull ORG/NAME`")
    else:
        _print_table(entries)
    return 0


def cmd_models_add(args: argparse.Namespace) -> int:
    if args.server:
        if not args.path:
            raise CLIError("name the remote model: llmchat models add NAME --server URL [--model SERVER_MODEL]")
        server = add_remote_model(args.path, args.server, args.model, args.api_key_env)
        on = f" (model {server.model})" if server.model else ""
        print(f"added {args.path}: {server.url}{on}; chat with `llmchat --model {args.path}`")
        return 0
    if not args.path:
        raise CLIError("give the model's folder or .gguf file: llmchat models add PATH [--name NAME]")
    name, path = add_model(args.path, args.name)
    default = " (the default)" if load_registry().default == name else ""
    print(f"added {name}{default}: {path}")
    return 0


def cmd_models_remove(args: argparse.Namespace) -> int:
    path = remove_model(args.name)
    if isinstance(path, str):
        print(f"removed {args.name} (on {path}) from the list")
    else:
        print(f"removed {args.name} from the list; its files are still at {path}")
    return 0


def cmd_models_default(args: argparse.Namespace) -> int:
    path = set_default(args.name)
    print(f"default model: {args.name} ({path})")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    if args.source == DEMO_NAME:
        load_registry().require_writable()
        result = ensure_demo()
        name = DEMO_NAME
    else:
        result = pull_hf(args.source, args.name)
        name = args.name or args.source
    if result.pulled:
        print(f"pulled {name}: {result.path}")
    else:
        print(f"{name} is already there, nothing to do: {result.path}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list, add, remove and pull models; choose the default")
    actions = p.add_subparsers(dest="models_action", metavar="ACTION", required=True)

    a = actions.add_parser("list", help="the registered models: name, type, architecture, format, size, path")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_models_list)

    a = actions.add_parser(
        "add", help="register a model folder or .gguf file (checked first), or with --server a model on a server"
    )
    a.add_argument("path", nargs="?", metavar="PATH|NAME", help="the model's path; with --server, the name to use")
    a.add_argument("--name", default=None, help="name to use it by (default: the folder or file name)")
    a.add_argument("--server", default=None, metavar="URL", help="an OpenAI-compatible server (vLLM, llama-server…)")
    a.add_argument("--model", default=None, metavar="NAME", help="with --server: the server's model name")
    a.add_argument(
        "--api-key-env", default=None, metavar="VAR", help="with --server: the environment variable with the API key"
    )
    a.set_defaults(func=cmd_models_add)

    a = actions.add_parser("remove", help="forget a model (its files stay)")
    a.add_argument("name")
    a.set_defaults(func=cmd_models_remove)

    a = actions.add_parser("default", help="the model used when none is named")
    a.add_argument("name")
    a.set_defaults(func=cmd_models_default)

    a = actions.add_parser("pull", help=f"download the demo model ({DEMO_NAME}) or a Hugging Face repo (ORG/NAME)")
    a.add_argument("source", metavar="demo|ORG/NAME")
    a.add_argument("--name", default=None, help="name for a Hugging Face model (default: ORG/NAME)")
    a.set_defaults(func=cmd_models_pull)
