"""`llmchat serve`: the engine behind the OpenAI protocol, for other clients and llmchat's remote session."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from llmchat.cli.args import add_engine_options, positive_int
from llmchat.cli.common import CLIError


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from llmchat.cli.common import load_model
    from llmchat.serve import MAX_TOP_LOGPROBS, make_app
    from llmchat.session import LocalSession

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise CLIError(f"the API key's environment variable {args.api_key_env} is not set")
    session = LocalSession(load_model(args), top_k=MAX_TOP_LOGPROBS)
    app = make_app(session, api_key=api_key)
    url = f"http://{args.host}:{args.port}/v1"
    print(f"llmchat: serving {session.info.name} at {url} (Ctrl+C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI protocol (chat completions, completions, logprobs, /metrics)",
    )
    p.add_argument("model", nargs="?", default=None, help="registered name, demo, or path (default: the default)")
    add_engine_options(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the model)"
    )
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument(
        "--api-key-env",
        dest="api_key_env",
        default=None,
        metavar="VAR",
        help="require the key in this environment variable as a bearer token",
    )
    p.set_defaults(func=cmd_serve)
