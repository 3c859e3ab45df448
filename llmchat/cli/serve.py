"""`llmchat serve`: the engine behind the OpenAI protocol, for other clients and llmchat's remote session."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from llmchat.cli.args import add_engine_options, non_negative_int
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
    listening = _listen(args.host, args.port)
    port = listening.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    url = f"http://{host}:{port}/v1"
    print(f"llmchat: serving {session.info.name} at {url} (Ctrl+C stops)", file=sys.stderr, flush=True)
    server.run(sockets=[listening])  # connections made before uvicorn is up wait in the socket's backlog
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one line, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise CLIError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


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
    p.add_argument("--port", type=non_negative_int, default=8000, help="default 8000; 0 picks a free one")
    p.add_argument(
        "--api-key-env",
        dest="api_key_env",
        default=None,
        metavar="VAR",
        help="require the key in this environment variable as a bearer token",
    )
    p.set_defaults(func=cmd_serve)
