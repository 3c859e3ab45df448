"""`llmchat inspect`: per-step next-token data of one answer (token, probabilities, top-k, entropy, rank)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from llmchat.cli import inside
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
    shown,
)
from llmchat.engine.prompt import COMPLETION
from llmchat.session.base import SessionUnavailable


def _sampling_words(params: Any) -> str:
    """The sampling policy in words: the knobs that are on."""
    if params.greedy:
        words = ["greedy (temperature 0)"]
    else:
        words = [f"temperature {params.temperature:g}"]
        if params.top_k:
            words.append(f"top-k {params.top_k}")
        if params.top_p < 1.0:
            words.append(f"top-p {params.top_p:g}")
        if params.min_p > 0.0:
            words.append(f"min-p {params.min_p:g}")
        if params.seed is not None:
            words.append(f"seed {params.seed}")
    if params.repetition_penalty != 1.0:
        words.append(f"repetition penalty {params.repetition_penalty:g}")
    return ", ".join(words)


def _step_dict(event: Any, text: str) -> dict[str, Any]:
    """One decode step as JSON: the chosen token (`text`: its own text, like the candidates') and
    the top-k candidates, most likely first."""
    return {
        "event": "token",
        "index": event.index,
        "id": event.token_id,
        "text": text,
        "emitted": event.text,  # what the stream printed at this step (held back near a stop string)
        "logit": event.logit,
        "prob": event.prob,
        "policy_prob": event.policy_prob,
        "rank": event.rank,
        "entropy": event.entropy,
        "policy_entropy": event.policy_entropy,
        "seconds": event.seconds,
        "top": [
            {"id": t.token_id, "text": t.text, "logit": t.logit, "prob": t.prob, "policy_prob": t.policy_prob}
            for t in event.top
        ],
    }


def _print_step(step: dict[str, Any]) -> None:
    if step["id"] is not None:
        line = f"id {step['id']}  p {step['prob']:.1%}  policy {step['policy_prob']:.1%}  rank {step['rank']}  "
        line += f"H {step['entropy']:.2f} bits (policy {step['policy_entropy']:.2f})  logit {step['logit']:.3f}"
    else:  # a server's numbers: no ids, a logprob for a logit, the entropy of its top N only
        line = f"p {step['prob']:.1%}  rank {step['rank']}  H ≥ {step['entropy']:.2f} bits  logprob {step['logit']:.3f}"
    print(f"{step['index']:4d}  {shown(step['text'])}  {line}  {step['seconds'] * 1000:.1f} ms")
    print("      " + " · ".join(f"{shown(t['text'])} {t['prob']:.1%}" for t in step["top"]))


def _summary(steps: list[dict[str, Any]], reason: str) -> str:
    line = f"{len(steps)} tokens, stopped by {reason}"
    if steps:
        mean = sum(s["entropy"] for s in steps) / len(steps)
        low = min(steps, key=lambda s: s["prob"])
        line += (
            f"; mean entropy {mean:.2f} bits; lowest probability {low['prob']:.1%} "
            f"at step {low['index']} ({shown(low['text'])}" + (f", id {low['id']})" if low["id"] is not None else ")")
        )
    return line


def cmd_inspect(args: argparse.Namespace) -> int:
    from llmchat.engine.events import Finished, TokenEvent

    session = open_session(args, top_k=args.candidates)
    if inside.wanted(args) and not session.capabilities.layer_views:
        raise SessionUnavailable("the layer views need llmchat's own engine: a server does not show its layers")
    messages, mode = request_messages(args), prompt_mode(session.info, args)
    sampling = sampling_from(args, session.info.default_sampling)
    if args.temperature is None:  # reproducible by default: the policy's other knobs stay as given
        sampling = sampling.replace(temperature=0.0)
    if not args.json:
        kind = " (raw: no chat template)" if mode == COMPLETION else ""
        try:
            count = f"{len(session.prompt_tokens(messages, mode))} tokens"
        except SessionUnavailable:
            count = "tokenized on the server"
        print(f"model {session.info.path} · prompt {count}{kind} · sampling: {_sampling_words(sampling)}")
    steps: list[dict[str, Any]] = []
    finished = None
    events = session.answer(
        messages,
        answer_id="inspect",
        mode=mode,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        stop_strings=args.stop or (),
    )
    for event in events:
        if isinstance(event, TokenEvent):
            step = _step_dict(event, session.token_text(event.token_id))
            if not session.capabilities.token_ids:
                step["id"] = None  # a server's protocol has no token ids
            steps.append(step)
            if args.json:
                print_json(step)
            else:
                _print_step(step)
        elif isinstance(event, Finished):
            finished = event
            if event.end_step is not None:  # the step that chose to end the answer (its token is not text)
                end = {**_step_dict(event.end_step, event.end_step.text), "event": "end"}
                if args.json:
                    print_json(end)
                else:
                    print(f"   end-of-sequence chosen at step {end['index']}:")
                    _print_step(end)
            if args.json:
                print_json(
                    {
                        "event": "finished",
                        "reason": event.reason,
                        "prompt_tokens": event.prompt_tokens,
                        "generated_tokens": event.generated_tokens,
                        "text": event.text,
                        "token_ids": list(event.token_ids),
                        "mean_entropy": sum(s["entropy"] for s in steps) / len(steps) if steps else None,
                        "prompt_mode": mode,
                        "sampling": dataclasses.asdict(sampling),
                    }
                )
            else:
                print(_summary(steps, event.reason))
            if inside.wanted(args):
                inside.report(session, session.prompt_ids("inspect") or [], list(event.token_ids), args)
    return failed_answer(finished)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-step next-token data of an answer: token, probability, top-k, entropy, rank",
        description=(
            "Answer one prompt and print, for every generated token, what the model predicted: the token, "
            "its raw probability and its probability under the sampling policy, its rank, the entropy of "
            "both distributions (bits), its logit, the step's time, and the top-k candidates. Decoding is "
            "greedy (temperature 0, reproducible) unless --temperature is given. Note: --top-k here is how "
            "many candidates to show per step; the sampling policy's top-k is --sample-top-k."
        ),
    )
    add_model_options(p)
    add_sampling_options(
        p,
        top_k_flag="--sample-top-k",
        temperature_help="sampling temperature; default 0 (greedy, reproducible) for inspect",
    )
    add_prompt_options(p)
    p.add_argument(
        "--top-k",
        dest="candidates",
        type=positive_int,
        default=5,
        metavar="K",
        help="candidates shown per step (default 5); NOT the sampling top-k, which is --sample-top-k",
    )
    p.add_argument("--json", action="store_true", help="JSON lines: one object per step, then a 'finished' object")
    inside.add_arguments(p)
    p.set_defaults(func=cmd_inspect)
