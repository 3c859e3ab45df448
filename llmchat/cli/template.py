"""`llmchat template`: render a chat with the model's chat template."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llmchat.cli.common import CLIError, print_json, read_json_file
from llmchat.models import resolve_model


def _parse_var(spec: str) -> tuple[str, Any]:
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise CLIError(f"--var takes NAME=JSON, got {spec!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        raise CLIError(f"--var {name}: {value!r} is not JSON (quote strings: {name}='\"text\"')") from None


def cmd_template(args: argparse.Namespace) -> int:
    from llmchat.engine.chat_template import ChatTemplates, read_special_tokens
    from llmchat.engine.errors import TemplateError
    from llmchat.engine.package import resolve_path

    folder = resolve_path(resolve_model(args.model))
    messages = read_json_file(args.messages)
    if not isinstance(messages, list):
        raise CLIError(f"{args.messages} must hold a JSON list of messages")
    tools = read_json_file(args.tools) if args.tools else None
    variables = dict(_parse_var(v) for v in args.var or ())
    if folder.is_file():  # a GGUF file: templates and special tokens come from its metadata
        from llmchat.engine.gguf import GGUFFile

        gguf = GGUFFile(folder)
        templates, special_tokens = gguf.chat_templates(), gguf.special_tokens()
    else:
        templates, special_tokens = ChatTemplates.from_folder(folder), read_special_tokens(folder)
    if templates is None:
        raise TemplateError(f"{folder} has no chat template")
    template = templates.get(args.name, tools=bool(tools), special_tokens=special_tokens)
    text = template.render(messages, add_generation_prompt=not args.no_generation_prompt, tools=tools, **variables)
    if args.json:
        print_json({"text": text, "template": template.name})
    else:
        sys.stdout.write(text)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("template", help="render a chat with the model's chat template")
    p.add_argument("model", help="folder with tokenizer_config.json (and/or chat_template.jinja/.json)")
    p.add_argument("--messages", required=True, help="JSON file with a list of {role, content} messages")
    p.add_argument("--tools", default=None, help="JSON file with a list of tool schemas")
    p.add_argument("--no-generation-prompt", action="store_true")
    p.add_argument("--var", action="append", help="extra template variable NAME=JSON (repeatable)")
    p.add_argument("--name", default=None, help="named template (default, tool_use, ...)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_template)
