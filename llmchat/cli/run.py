"""`llmchat run`: answer one prompt, streaming the text (or JSON lines of events)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llmchat.cli.args import positive_int
from llmchat.cli.common import (
    add_model_options,
    add_prompt_options,
    add_sampling_options,
    failed_answer,
    open_session,
    print_json,
    prompt_mode,
    request_messages,
    sampling_from,
)


def event_dict(event: Any) -> dict[str, Any]:
    from dataclasses import asdict

    from llmchat.engine.events import Finished

    data = {"event": type(event).__name__, **asdict(event)}
    if isinstance(event, Finished):
        data["prefill_tokens_per_second"] = event.prefill_tokens_per_second
        data["decode_tokens_per_second"] = event.decode_tokens_per_second
    return data


def cmd_run(args: argparse.Namespace) -> int:
    from llmchat.engine.events import Finished, TokenEvent

    session = open_session(args, top_k=args.top_logprobs)
    events = session.answer(
        request_messages(args),
        answer_id="run",
        mode=prompt_mode(session.info, args),
        sampling=sampling_from(args, session.info.default_sampling),
        max_new_tokens=args.max_new_tokens,
        stop_strings=args.stop or (),
    )
    finished = None
    for event in events:
        if args.json:
            print_json(event_dict(event))
        elif isinstance(event, TokenEvent):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Finished):
            sys.stdout.write(event.tail + "\n")
            print(
                f"[{event.generated_tokens} tokens, stopped by {event.reason}; prefill {event.prefilled_tokens} tok "
                f"at {event.prefill_tokens_per_second:.1f} tok/s (reused {event.reused_tokens}), "
                f"TTFT {event.ttft_seconds:.3f} s, decode {event.decode_tokens_per_second:.1f} tok/s]",
                file=sys.stderr,
            )
        if isinstance(event, Finished):
            finished = event
    return failed_answer(finished)  # a server that failed mid-answer: exit 2, what it said is printed


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="answer one prompt, streaming the text")
    add_model_options(p)
    add_sampling_options(p)
    add_prompt_options(p)
    p.add_argument("--top-logprobs", type=positive_int, default=5, help="alternatives recorded per token in --json")
    p.add_argument("--json", action="store_true", help="one JSON object per event (JSON lines)")
    p.set_defaults(func=cmd_run)
