"""Bare `llmchat`: the chat screen."""

from __future__ import annotations

import argparse
import dataclasses

from llmchat.engine.knobs import KNOB
from llmchat.models import resolve_model


def cmd_chat(args: argparse.Namespace) -> int:
    """Bare `llmchat`: open the chat screen on the chosen (or default, or demo) model.

    `--resume [ID|last]` reopens a saved conversation on the model it was held with (unless
    `--model` names another one), with its sampling settings.
    """
    from llmchat.chat.store import ConversationStore
    from llmchat.cli.common import server_spec
    from llmchat.settings import load_settings

    settings, problems = load_settings()
    store = ConversationStore.default()
    conversation = None
    explicit = getattr(args, "chat_model", None)
    spec = explicit or settings.model
    server = server_spec(args, "chat_")
    if args.resume is not None:
        conversation = store.load(store.resolve(args.resume))
        saved_path = conversation.model.get("path")
        from llmchat.tui.app import saved_server

        if explicit is None and server is None and (held := saved_server(conversation)) is not None:
            # a chat held with a server: connect to it again (its key from the same variable)
            server = dataclasses.replace(held, tokenizer=getattr(args, "chat_tokenizer", None))
        elif explicit is None and saved_path:
            spec = saved_path
    path = None if server is not None else resolve_model(spec)
    from llmchat.cli.args import EngineOptions
    from llmchat.tui.app import run_app

    overrides = {knob: value for knob in (*KNOB, "seed") if (value := getattr(args, f"chat_{knob}", None)) is not None}
    engine = EngineOptions.of(args, "chat_")
    run_app(
        path,
        store=store,
        conversation=conversation,
        sampling_overrides=overrides,
        max_new_tokens=getattr(args, "chat_max_new_tokens", None),
        completion=args.chat_raw,
        threads=engine.threads,
        settings=settings,
        settings_problems=problems,
        server=server,
        **engine.load_kwargs(),
    )
    return 0
